//! The processes of the benchmark: the verifier under test, its floor, the helper binaries and the
//! tools located by the hack/ scripts. Every child is ended when dropped, also when the benchmark
//! fails midway.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use envtest::ControlPlane;

use crate::bench::{http_get, poll};

/// The helper binaries of `xtask/src/bin/`.
pub(super) struct Helpers {
    /// `verify-floor`: the HTTP and gRPC floors.
    pub floor: PathBuf,
    /// `verify-memprobe`: what takes the memory.
    pub memprobe: PathBuf,
    /// `verify-load`: the gRPC load generator (and HTTP's in `--check`).
    pub load: PathBuf,
}

/// Builds the helpers with the operator's profile: a debug load generator would measure itself.
pub(super) fn build_helpers(root: &Path, release: bool) -> anyhow::Result<Helpers> {
    println!(
        "==> building verify-floor, verify-memprobe and verify-load ({})",
        if release { "release" } else { "debug" }
    );
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--locked", "--package", "xtask"]).args([
        "--bin",
        "verify-floor",
        "--bin",
        "verify-memprobe",
        "--bin",
        "verify-load",
    ]);
    if release {
        cmd.arg("--release");
    }
    ensure!(cmd.current_dir(root).status().context("running cargo build")?.success(), "building the helpers failed");
    let target: PathBuf = std::env::var("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|_| root.join("target"));
    let dir = target.join(if release { "release" } else { "debug" });
    Ok(Helpers {
        floor: dir.join("verify-floor"),
        memprobe: dir.join("verify-memprobe"),
        load: dir.join("verify-load"),
    })
}

/// Runs an installer script that prints the path of its tool (installing it on first use).
pub(super) fn locate(root: &Path, script: &str, args: &[&str]) -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(root.join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {script}"))?;
    ensure!(out.status.success(), "{script} failed");
    let path = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(!path.is_empty(), "{script} printed no path");
    Ok(path.into())
}

pub(super) fn version(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().context("asking a tool for its version")?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    Ok(String::from_utf8_lossy(&text).trim().replace("nginx version: ", ""))
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(super) async fn wait_port(port: u16) -> anyhow::Result<()> {
    poll(&format!("a listener on port {port}"), Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await
}

/// A child process ended (SIGTERM, then SIGKILL) when dropped, also when the benchmark fails midway.
pub(super) struct Guard<T: AsChild>(pub T);

pub(super) trait AsChild {
    fn child(&mut self) -> &mut Child;
}

impl AsChild for Child {
    fn child(&mut self) -> &mut Child {
        self
    }
}

impl AsChild for (Child, u16) {
    fn child(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl<T: AsChild> Drop for Guard<T> {
    fn drop(&mut self) {
        let child = self.0.child();
        if matches!(child.try_wait(), Ok(None)) {
            crate::terminate(child);
        }
    }
}

/// The floors (`verify-floor`): HTTP on `http_port`, gRPC on `grpc_port`.
pub(super) struct Floor {
    _process: Guard<Child>,
    pub http_port: u16,
    pub grpc_port: u16,
}

impl Floor {
    pub async fn start(bin: &Path) -> anyhow::Result<Floor> {
        let (http_port, grpc_port) = (free_port()?, free_port()?);
        let child = Command::new(bin)
            .args([format!("127.0.0.1:{http_port}"), format!("127.0.0.1:{grpc_port}")])
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let floor = Floor { _process: Guard(child), http_port, grpc_port };
        wait_port(http_port).await?;
        wait_port(grpc_port).await?;
        Ok(floor)
    }
}

/// `scim-token-operator verify` on loopback ports of its own.
pub(super) struct Verifier {
    process: Guard<Child>,
    pub port: u16,
    pub grpc_port: u16,
    metrics_port: u16,
}

impl Verifier {
    /// `header_timeout` is passed as `VERIFY_HEADER_READ_TIMEOUT` (an environment variable: a verifier
    /// without the flag ignores it, and can be measured by the same harness).
    pub fn start(
        cp: &ControlPlane,
        bin: &Path,
        ns: &str,
        log: &Path,
        header_timeout: Duration,
    ) -> anyhow::Result<Verifier> {
        let (port, grpc_port, metrics_port) = (free_port()?, free_port()?, free_port()?);
        let log = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .args(["verify", "--namespace", ns])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("KUBECONFIG", cp.kubeconfig_path())
            .env("RUST_LOG", "info")
            .env("VERIFY_HEADER_READ_TIMEOUT", format!("{}s", header_timeout.as_secs()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} verify", bin.display()))?;
        Ok(Verifier { process: Guard(child), port, grpc_port, metrics_port })
    }

    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Ready (its initial list is in) with `n` directories in its index.
    pub async fn wait_ready(&self, n: usize) -> anyhow::Result<()> {
        let port = self.metrics_port;
        poll("the verifier's index", Duration::from_secs(300), || async {
            let ready = http_get(port, "/readyz").is_some_and(|r| r.split_whitespace().nth(1) == Some("200"));
            ready
                && http_get(port, "/metrics").is_some_and(|m| {
                    m.lines()
                        .find(|l| l.starts_with("scim_token_verifier_directories "))
                        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                        .is_some_and(|count| count >= n as f64)
                })
        })
        .await
    }
}
