//! Project tasks: `cargo xtask demo [--once]`, `cargo xtask bench [...]` and `cargo xtask bench-verify [...]`.
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

pub(crate) const USAGE: &str = "usage:
  cargo xtask demo [--once]
      --once  exit after the example is Ready (used by the test command)
  cargo xtask bench [--n N] [--client-concurrency C] [--idle-secs S] [--rotations R] [--release] [--check] [-- OPERATOR FLAGS]
      defaults: --n 1000 --client-concurrency 16 --idle-secs 120 --rotations 100; see BENCHMARKS.md
  cargo xtask bench-verify [--n N] [--client-concurrency C] [--load-secs S] [--connections C] [--rotations R] [--release] [--check]
      the verifier under oha (hack/oha.sh) and behind nginx auth_request;
      defaults: --n 1000 --client-concurrency 16 --load-secs 20 --connections 32 --rotations 100; see BENCHMARKS.md";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["demo"] => demo(false).await,
        ["demo", "--once"] => demo(true).await,
        ["bench", ..] => bench::run(bench::parse(&args[1..])?).await,
        ["bench-verify", ..] => bench_verify::run(bench_verify::parse(&args[1..])?).await,
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
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

    if once {
        terminate(&mut operator);
        step("done (--once)");
        return Ok(());
    }
    println!(
        "\nTry it:\n  export KUBECONFIG={kc}\n  kubectl get scimdir -n {ns}\n  kubectl get secret {secret} -n {ns} -o jsonpath='{{.data.token}}' | base64 -d | sha256sum\n  kubectl annotate scimdir acme -n {ns} scim.tokenops.dev/rotate=\"$(date +%s)\" --overwrite   # rotate\n  kubectl patch scimdir acme -n {ns} --type merge -p '{{\"spec\":{{\"rotationGeneration\":1}}}}'   # rotate declaratively\n\nOperator log: {log}\nPress Ctrl-C to stop the operator and the control plane.",
        kc = cp.kubeconfig_path().display(),
        log = log_path.display(),
    );
    tokio::signal::ctrl_c().await?;
    terminate(&mut operator);
    step("stopped");
    Ok(())
}

/// Builds the operator binary with cargo and returns its path.
pub(crate) fn build_operator(root: &Path, release: bool) -> anyhow::Result<std::path::PathBuf> {
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
