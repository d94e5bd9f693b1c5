//! Project tasks: `cargo xtask demo [--once]`, `cargo xtask bench [...]`, `cargo xtask bench-verify [...]` and
//! `cargo xtask chaos [...]` (crash safety under faults, docs/reliability.md), `cargo xtask image` (the
//! container image as an OCI archive, without a Docker engine) and `cargo xtask cluster up|down` (a real
//! single-node cluster on this machine); `--help` on each.
//!
//! `demo` is the operator's main job end to end on a fresh machine: it builds (or finds) a local
//! kube-apiserver + etcd, installs the CRD, runs the operator, applies an example with the real
//! kubectl, prints the directory's status and Secret name, and keeps everything running until Ctrl-C.
//! `demo --node` does the same as it runs in a cluster (`demo_node.rs`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use envtest::ControlPlane;

mod bench;
mod bench_verify;
mod chaos;
mod cluster;
mod demo_node;
mod image;

/// Project tasks.
#[derive(clap::Parser)]
#[command(bin_name = "cargo xtask")]
enum Task {
    /// The operator's main job end to end on a local control plane, kept running until Ctrl-C
    Demo {
        /// Exit after the example is Ready (used by the test command)
        #[arg(long)]
        once: bool,
        /// As it runs in a cluster: the image (`cargo xtask image`) on a real node (`cargo xtask cluster
        /// up`), installed with the Helm chart (needs root, like `cargo xtask cluster`)
        #[arg(long)]
        node: bool,
        /// With --node: this image archive instead of building one with `cargo xtask image`
        #[arg(long, value_name = "ARCHIVE", requires = "node")]
        image: Option<std::path::PathBuf>,
    },
    Bench(bench::Options),
    BenchVerify(bench_verify::Options),
    Chaos(chaos::Options),
    Image(image::Options),
    Cluster(cluster::Options),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match <Task as clap::Parser>::parse() {
        Task::Demo { once, node: false, .. } => demo(once).await,
        Task::Demo { once, node: true, image } => demo_node::run(once, image).await,
        Task::Bench(o) => bench::run(usable("bench", o.validate())).await,
        Task::BenchVerify(o) => bench_verify::run(usable("bench-verify", o.validate())).await,
        Task::Chaos(o) => chaos_main(usable("chaos", o.validate())).await,
        Task::Image(o) => image::run(&o),
        Task::Cluster(o) => cluster::run(o).await,
    }
}

/// Options that contradict each other are a usage error of the task, reported as clap reports its own.
fn usable<T>(task: &str, validated: anyhow::Result<T>) -> T {
    validated.unwrap_or_else(|e| {
        let mut command = <Task as clap::CommandFactory>::command();
        command.build();
        let task = command.find_subcommand_mut(task).expect("a task of this command");
        task.error(clap::error::ErrorKind::ValueValidation, e).exit()
    })
}

/// `--idle-secs 10`: whole seconds.
pub(crate) fn secs(s: &str) -> Result<Duration, String> {
    s.parse().map(Duration::from_secs).map_err(|_| format!("{s:?} is not a whole number of seconds"))
}

/// `cargo xtask chaos`: prints the table and fails if any invariant is broken.
async fn chaos_main(options: chaos::Options) -> anyhow::Result<()> {
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
    let verify_addr = std::net::SocketAddr::from(([127, 0, 0, 1], verify_port));
    let loop_result = whole_loop(&|| cp.kubectl(), ns, &secret, verify_addr).await;
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
async fn whole_loop(kubectl: &dyn Fn() -> Command, ns: &str, secret: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let token = secret_token(kubectl, ns, secret)?;
    let answer = wait_answer(addr, &token, 200).await.context("the verifier did not accept the Secret's token")?;
    step("a SCIM request with the Secret's token, as the proxy's auth request (GET /verify/scim/v2/Users)");
    println!("  {answer}");
    step("kubectl annotate scimdir acme scim.tokenops.dev/rotate=demo (an imperative rotation)");
    run_kubectl(kubectl(), &["annotate", "scimdir", "acme", "-n", ns, "scim.tokenops.dev/rotate=demo", "--overwrite"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let rotated = loop {
        let now = secret_token(kubectl, ns, secret)?;
        if now != token {
            break now;
        }
        if Instant::now() > deadline {
            bail!("the token was not rotated within 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let old = wait_answer(addr, &token, 401).await.context("the verifier kept accepting the rotated-out token")?;
    let new = wait_answer(addr, &rotated, 200).await.context("the verifier did not accept the new token")?;
    step("the same request after the rotation");
    println!("  old token: {old}\n  new token: {new}");
    Ok(())
}

/// The token in the Secret (never printed: only its hash is).
fn secret_token(kubectl: &dyn Fn() -> Command, ns: &str, secret: &str) -> anyhow::Result<String> {
    let json = kubectl_output(kubectl(), &["get", "secret", secret, "-n", ns, "-o", "json"])?;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_str(&json)?;
    let bytes = secret.data.and_then(|d| d.get("token").cloned()).context("the Secret has no token")?;
    Ok(String::from_utf8(bytes.0)?)
}

/// Asks the verifier until it answers `want` (10 s at most); returns a one-line summary of the answer.
async fn wait_answer(addr: SocketAddr, token: &str, want: u16) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((status, headers)) = verify_request(addr, token)
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
fn verify_request(addr: SocketAddr, token: &str) -> anyhow::Result<(u16, Vec<String>)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
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
    run_kubectl(cp.kubectl(), args)
}

fn kubectl_out(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    kubectl_output(cp.kubectl(), args)
}

/// `kubectl ARGS` (a command set up for its cluster), its output discarded.
fn run_kubectl(mut kubectl: Command, args: &[&str]) -> anyhow::Result<()> {
    let status = kubectl.args(args).stdout(Stdio::null()).status().context("running kubectl")?;
    if !status.success() {
        bail!("kubectl {} failed", args.join(" "));
    }
    Ok(())
}

fn kubectl_output(mut kubectl: Command, args: &[&str]) -> anyhow::Result<String> {
    let out = kubectl.args(args).output().context("running kubectl")?;
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn try_parse(args: &[&str]) -> Result<Task, clap::Error> {
        Task::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
    }

    fn parse(args: &[&str]) -> Task {
        try_parse(args).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Task::command().debug_assert();
    }

    #[test]
    fn the_test_commands_invocations_parse() {
        assert!(matches!(parse(&["demo", "--once"]), Task::Demo { once: true, node: false, image: None }));
        assert!(matches!(
            parse(&["demo", "--node", "--once", "--image", "x.tar"]),
            Task::Demo { once: true, node: true, image: Some(_) }
        ));
        assert!(try_parse(&["demo", "--image", "x.tar"]).is_err(), "--image without --node");
        let Task::Bench(b) =
            parse(&["bench", "--n", "50", "--runs", "1", "--idle-secs", "10", "--rotations", "10", "--check"])
        else {
            panic!("not bench")
        };
        assert_eq!(
            (b.n, b.runs, b.idle, b.rotations, b.restarts, b.check),
            (50, 1, Duration::from_secs(10), 10, 1, true)
        );
        assert!(b.peer.is_none() && b.only.is_empty() && b.operator_args.is_empty() && !b.release);
        let Task::BenchVerify(v) =
            parse(&["bench-verify", "--n", "50", "--load-secs", "2", "--rounds", "1", "--rotations", "5", "--check"])
        else {
            panic!("not bench-verify")
        };
        assert_eq!(
            (v.n, v.load, v.rounds, v.rotations, v.connections, v.check),
            (50, Duration::from_secs(2), 1, 5, 32, true)
        );
    }

    #[test]
    fn operator_flags_follow_a_double_dash() {
        let Task::Bench(b) = parse(&["bench", "--peer", "eso", "--only", "operator,eso", "--", "--concurrency", "32"])
        else {
            panic!("not bench")
        };
        assert_eq!(b.peer, Some(bench::Peer::Eso));
        assert_eq!(b.only, ["operator", "eso"]);
        assert_eq!(b.operator_args, ["--concurrency", "32"]);
        assert_eq!(b.floor_concurrency(), 16 + 32);
    }

    #[test]
    fn contradictions_and_unknown_values_are_refused() {
        for args in [&["bench", "--only", "nope"][..], &["bench", "--peer", "vault"], &["bench", "--idle-secs", "1.5"]]
        {
            assert!(try_parse(args).is_err(), "{args:?}");
        }
        let Task::Bench(b) = parse(&["bench", "--n", "10", "--rotations", "11"]) else { panic!("not bench") };
        assert!(b.validate().is_err());
        let Task::Chaos(c) = parse(&[
            "chaos",
            "--leader-kills",
            "0",
            "--standby-kills",
            "0",
            "--apiserver-restarts",
            "0",
            "--etcd-restarts",
            "0",
            "--pauses",
            "0",
        ]) else {
            panic!("not chaos")
        };
        assert!(c.validate().is_err(), "a chaos run without a fault");
    }

    #[test]
    fn chaos_defaults_are_the_command_lines() {
        let o = chaos::Options::default();
        assert_eq!((o.n, o.rotations, o.counts.leader_kills, o.counts.leader_pauses), (1000, 300, 20, 1));
        assert_eq!(
            (o.max_restart_delay, o.racing_percent, o.converge_timeout),
            (Duration::from_secs(20), 5, Duration::from_secs(300))
        );
        let Task::Chaos(c) = parse(&["chaos", "--seed", "7", "--max-restart-delay", "2.5"]) else {
            panic!("not chaos")
        };
        assert_eq!((c.seed, c.max_restart_delay), (7, Duration::from_millis(2500)));
    }
}
