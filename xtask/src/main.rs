//! Project tasks: `cargo xtask demo [--once]`, `cargo xtask bench [...]`, `cargo xtask bench-verify [...]` and
//! `cargo xtask chaos [...]` (crash safety under faults, docs/reliability.md).
//!
//! `demo` is the operator's main job end to end on a fresh machine: it builds (or finds) a local
//! kube-apiserver + etcd, installs the CRD, runs the operator, applies an example with the real
//! kubectl, prints the directory's status and Secret name, and keeps everything running until Ctrl-C.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use envtest::ControlPlane;

mod bench;
mod bench_verify;
mod chaos;

pub(crate) const USAGE: &str = "usage:
  cargo xtask demo [--once]
      --once  exit after the example is Ready (used by the test command)
  cargo xtask bench [--n N] [--runs K] [--peer eso] [--only operator,floor,eso,eso-matched] [--client-concurrency C] [--idle-secs S] [--rotations R] [--restarts K] [--release] [--check] [-- OPERATOR FLAGS]
      the operator, the honest floor and (--peer eso, built by hack/eso.sh) External Secrets Operator, K runs each, interleaved;
      defaults: --n 1000 --runs 3 --client-concurrency 16 --idle-secs 60 --rotations 300 --restarts 1; see BENCHMARKS.md
  cargo xtask bench-verify [--n N] [--client-concurrency C] [--load-secs S] [--connections C] [--grpc-connections K] [--rounds R] [--rotations R] [--release] [--check]
      the verifier's HTTP endpoint under oha (hack/oha.sh), behind nginx auth_request, and its gRPC service under
      verify-load, each against its floor; --check: correctness only, verify-load for HTTP too (no oha);
      defaults: --n 1000 --client-concurrency 16 --load-secs 20 --connections 32 --grpc-connections 2 --rounds 3 --rotations 100; see BENCHMARKS.md
  XTASK_OPERATOR_BIN=PATH: run that prebuilt scim-token-operator instead of building one";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["demo"] => demo(false).await,
        ["demo", "--once"] => demo(true).await,
        ["bench", ..] => bench::run(bench::parse(&args[1..])?).await,
        ["bench-verify", ..] => bench_verify::run(bench_verify::parse(&args[1..])?).await,
        ["chaos", ..] => chaos_main(&args[1..]).await,
        _ => {
            eprintln!("{USAGE}\n{}", chaos::USAGE);
            std::process::exit(2);
        }
    }
}

/// `cargo xtask chaos`: prints the table and fails if any invariant is broken.
async fn chaos_main(args: &[String]) -> anyhow::Result<()> {
    let options = chaos::parse(args)?;
    let bin = build_operator(&envtest::workspace_root(), options.release)?;
    let report = chaos::run(&options, &bin).await?;
    report.print();
    let violations = report.violations();
    if !violations.is_empty() {
        bail!("seed {}: {} invariants broken:\n- {}", options.seed, violations.len(), violations.join("\n- "));
    }
    println!("chaos: every invariant holds (seed {})", options.seed);
    Ok(())
}

async fn demo(once: bool) -> anyhow::Result<()> {
    let root = envtest::workspace_root();
    let operator_bin = build_operator(&root, false)?;

    step("starting a local control plane (kube-apiserver + etcd; the first run builds them from Go modules)");
    let cp = ControlPlane::start().await?;
    println!("  API server {} (CRDs from crds/ installed)", cp.server_url());

    let ns = "demo";
    kubectl(&cp, &["create", "namespace", ns])?;
    let log_path = cp.tmp_dir().join("operator.log");
    step(&format!("running the operator (log: {})", log_path.display()));
    let log = std::fs::File::create(&log_path)?;
    let mut operator = Command::new(&operator_bin)
        .args(["run", "--lease-namespace", ns, "--metrics-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", cp.kubeconfig_path())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", operator_bin.display()))?;

    let example = root.join("examples/basic.yaml");
    step(&format!("kubectl apply -f {}", example.strip_prefix(&root).unwrap_or(&example).display()));
    kubectl(&cp, &["apply", "-n", ns, "-f", path_str(&example)?])?;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = kubectl_out(
            &cp,
            &["get", "scimdir", "acme", "-n", ns, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"],
        )?;
        if out.trim() == "True" {
            break;
        }
        if let Some(exit) = operator.try_wait()? {
            bail!("the operator exited with {exit}; see {}", log_path.display());
        }
        if Instant::now() > deadline {
            bail!("the directory did not become Ready within 60s; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    step("the directory is Ready");
    print!("{}", kubectl_out(&cp, &["get", "scimdir", "-n", ns])?);
    println!();
    print!("{}", kubectl_out(&cp, &["get", "scimdir", "acme", "-n", ns, "-o", "jsonpath={.status}"])?);
    println!("\n");
    let secret = kubectl_out(&cp, &["get", "scimdir", "acme", "-n", ns, "-o", "jsonpath={.status.secretName}"])?;
    println!("Secret: {ns}/{secret} (key `token`; the plaintext is only in the Secret)");

    // The other half: the verifier authenticates the identity provider's requests by hash.
    let verifier_log_path = cp.tmp_dir().join("verifier.log");
    let verify_port = free_port()?;
    step(&format!("running the verifier on 127.0.0.1:{verify_port} (log: {})", verifier_log_path.display()));
    let verifier_log = std::fs::File::create(&verifier_log_path)?;
    let mut verifier = Command::new(&operator_bin)
        .args(["verify", "--namespace", ns, "--listen", &format!("127.0.0.1:{verify_port}")])
        .args(["--grpc-listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", cp.kubeconfig_path())
        .stdout(verifier_log.try_clone()?)
        .stderr(verifier_log)
        .spawn()
        .with_context(|| format!("starting {} verify", operator_bin.display()))?;
    let loop_result = whole_loop(&cp, ns, &secret, verify_port).await;
    if loop_result.is_err() || once {
        terminate(&mut verifier);
        terminate(&mut operator);
    }
    loop_result.with_context(|| format!("see {} and {}", log_path.display(), verifier_log_path.display()))?;

    if once {
        step("done (--once)");
        return Ok(());
    }
    println!(
        "\nTry it:\n  export KUBECONFIG={kc}\n  kubectl get scimdir -n {ns}\n  kubectl get secret {secret} -n {ns} -o jsonpath='{{.data.token}}' | base64 -d | sha256sum\n  TOKEN=$(kubectl get secret {secret} -n {ns} -o jsonpath='{{.data.token}}' | base64 -d)\n  curl -i -H \"Authorization: Bearer $TOKEN\" http://127.0.0.1:{verify_port}/verify/scim/v2/Users   # what a proxy asks: 200 + X-Scim-Directory-*\n  kubectl annotate scimdir acme -n {ns} scim.tokenops.dev/rotate=\"$(date +%s)\" --overwrite   # rotate: the curl above now gets 401\n  kubectl patch scimdir acme -n {ns} --type merge -p '{{\"spec\":{{\"rotationGeneration\":1}}}}'   # rotate declaratively\n  kubectl patch scimdir acme -n {ns} --type merge -p '{{\"spec\":{{\"rotationOverlap\":\"10m\"}}}}'   # then the previous token keeps working 10 min after a rotation\n\nOperator log: {log}\nVerifier log: {vlog}\nPress Ctrl-C to stop the operator, the verifier and the control plane.",
        kc = cp.kubeconfig_path().display(),
        log = log_path.display(),
        vlog = verifier_log_path.display(),
    );
    tokio::signal::ctrl_c().await?;
    terminate(&mut verifier);
    terminate(&mut operator);
    step("stopped");
    Ok(())
}

/// The loop the verifier closes: a request with the Secret's token is authenticated (as the proxy's
/// auth request sees it), a rotation replaces the token, and the old one is refused at once.
async fn whole_loop(cp: &ControlPlane, ns: &str, secret: &str, port: u16) -> anyhow::Result<()> {
    let token = secret_token(cp, ns, secret)?;
    let answer = wait_answer(port, &token, 200).await.context("the verifier did not accept the Secret's token")?;
    step("a SCIM request with the Secret's token, as the proxy's auth request (GET /verify/scim/v2/Users)");
    println!("  {answer}");
    step("kubectl annotate scimdir acme scim.tokenops.dev/rotate=demo (an imperative rotation)");
    kubectl(cp, &["annotate", "scimdir", "acme", "-n", ns, "scim.tokenops.dev/rotate=demo", "--overwrite"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let rotated = loop {
        let now = secret_token(cp, ns, secret)?;
        if now != token {
            break now;
        }
        if Instant::now() > deadline {
            bail!("the token was not rotated within 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let old = wait_answer(port, &token, 401).await.context("the verifier kept accepting the rotated-out token")?;
    let new = wait_answer(port, &rotated, 200).await.context("the verifier did not accept the new token")?;
    step("the same request after the rotation");
    println!("  old token: {old}\n  new token: {new}");
    Ok(())
}

/// The token in the Secret (never printed: only its hash is).
fn secret_token(cp: &ControlPlane, ns: &str, secret: &str) -> anyhow::Result<String> {
    let json = kubectl_out(cp, &["get", "secret", secret, "-n", ns, "-o", "json"])?;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_str(&json)?;
    let bytes = secret.data.and_then(|d| d.get("token").cloned()).context("the Secret has no token")?;
    Ok(String::from_utf8(bytes.0)?)
}

/// Asks the verifier until it answers `want` (10 s at most); returns a one-line summary of the answer.
async fn wait_answer(port: u16, token: &str, want: u16) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((status, headers)) = verify_request(port, token)
            && status == want
        {
            let hash = scim_token_operator::token::TokenHash::of_bytes(token.as_bytes());
            let shown: Vec<&str> = headers
                .iter()
                .map(String::as_str)
                .filter(|h| {
                    let h = h.to_ascii_lowercase();
                    h.starts_with("x-scim-directory-") || h.starts_with("www-authenticate")
                })
                .collect();
            return Ok(format!("token {hash}: {status} {}", shown.join("; ")));
        }
        if Instant::now() > deadline {
            bail!("no {want} from the verifier within 10s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One HTTP/1.0 request to the verifier; returns the status and the header lines.
fn verify_request(port: u16, token: &str) -> anyhow::Result<(u16, Vec<String>)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(stream, "GET /verify/scim/v2/Users HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n")?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).context("no status")?;
    Ok((status, lines.map(str::to_owned).collect()))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Builds the operator binary with cargo and returns its path.
pub(crate) fn build_operator(root: &Path, release: bool) -> anyhow::Result<std::path::PathBuf> {
    // Measures a binary built elsewhere (another release profile) with the same harness and helpers.
    if let Some(bin) = std::env::var_os("XTASK_OPERATOR_BIN") {
        step(&format!("using the prebuilt operator {}", Path::new(&bin).display()));
        return Ok(bin.into());
    }
    step(&format!("building the operator ({})", if release { "release" } else { "debug" }));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--package", "scim-token-operator", "--bin", "scim-token-operator"]);
    if release {
        cmd.arg("--release");
    }
    if !cmd.current_dir(root).status().context("running cargo build")?.success() {
        bail!("building the operator failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|_| root.join("target"));
    Ok(target.join(if release { "release" } else { "debug" }).join("scim-token-operator"))
}

fn step(what: &str) {
    println!("==> {what}");
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<()> {
    let status = cp.kubectl().args(args).stdout(Stdio::null()).status().context("running kubectl")?;
    if !status.success() {
        bail!("kubectl {} failed", args.join(" "));
    }
    Ok(())
}

fn kubectl_out(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let out = cp.kubectl().args(args).output().context("running kubectl")?;
    if !out.status.success() {
        bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn terminate(child: &mut std::process::Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
