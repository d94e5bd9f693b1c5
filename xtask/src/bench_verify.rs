//! `cargo xtask bench-verify`: the verifier (`scim-token-operator verify`) measured on a real control
//! plane with a real HTTP load generator (oha, `hack/oha.sh`), all on loopback:
//!
//! 1. throughput and latency of `/verify` against its **floor** (`verify-floor`, the same axum and
//!    tokio answering 200 without work), at peak and at half of the verifier's peak (open loop,
//!    `oha -q` with latency correction);
//! 2. nginx `auth_request` → verifier against the same nginx proxying without auth, to the floor as
//!    upstream (the config is the e2e test's `tests/peers/nginx.conf.template`);
//! 3. the verifier's memory with N directories indexed (issued by the operator, as `cargo xtask
//!    bench` does), next to a verifier with nothing to index;
//! 4. how soon a rotation reaches the verifier: from the new token in the Secret (and the new hash in
//!    the status) to its first 200, and to the old token's first 401.
//!
//! Correctness is asserted in every mode, never time: each load run must get only the expected status
//! (200 for the valid token, 401 for an unknown one), and before the load every one of the N tokens
//! is checked (200 naming its directory) with N unknown tokens (401). A broken verifier fails the
//! benchmark instead of producing a good number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use envtest::ControlPlane;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use scim_token_operator::api::ScimDirectory;
use scim_token_operator::token::{Token, TokenHash};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::bench::{create_directories, http_get, peak_rss_kib, poll, start_operator, wait_all_ready, wait_leader};

#[derive(Debug, Clone)]
pub struct Options {
    pub n: usize,
    /// Concurrency of the benchmark's own creates.
    pub client_concurrency: usize,
    /// Length of each load run.
    pub load: Duration,
    /// Connections the load generator keeps open.
    pub connections: usize,
    /// Alternating floor/verifier peak runs (the median of each is reported): a shared machine's load
    /// drifts, and whichever ran first would otherwise pay for it.
    pub rounds: usize,
    pub rotations: usize,
    pub release: bool,
    /// Print the correctness verdict (asserted in every mode) as the check line of the test command.
    pub check: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            n: 1000,
            client_concurrency: 16,
            load: Duration::from_secs(20),
            connections: 32,
            rounds: 3,
            rotations: 100,
            release: false,
            check: false,
        }
    }
}

pub fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--n" => o.n = value()?.parse()?,
            "--client-concurrency" => o.client_concurrency = value()?.parse()?,
            "--load-secs" => o.load = Duration::from_secs(value()?.parse()?),
            "--connections" => o.connections = value()?.parse()?,
            "--rounds" => o.rounds = value()?.parse()?,
            "--rotations" => o.rotations = value()?.parse()?,
            "--release" => o.release = true,
            "--check" => o.check = true,
            other => bail!("unknown bench-verify option {other}\n{}", crate::USAGE),
        }
    }
    ensure!(o.n > 0 && o.rotations <= o.n, "--rotations must not exceed --n");
    ensure!(
        o.load >= Duration::from_secs(1) && o.connections > 0 && o.rounds > 0,
        "--load-secs, --connections and --rounds must be positive"
    );
    Ok(o)
}

const NS: &str = "bench";
/// The light-load rate (requests/s), for latency without the machine's CPU in the way.
const LIGHT: f64 = 1000.0;

/// The run with the median throughput.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs.swap_remove(runs.len() / 2)
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let root = envtest::workspace_root();
    let bin = crate::build_operator(&root, o.release)?;
    let (floor_bin, probe_bin) = build_helpers(&root, o.release)?;
    let oha = locate(&root, "hack/oha.sh", &[])?;
    let nginx = locate(&root, "hack/test-peers.sh", &["--nginx"])?;
    let tools = Tools {
        oha: version(Command::new(&oha).arg("--version"))?,
        nginx: version(Command::new(&nginx).arg("-v"))?,
        connections: o.connections,
        load: o.load,
    };
    println!("==> {} and {}", tools.oha, tools.nginx);

    println!("==> starting the control plane");
    let cp = ControlPlane::start().await?;
    let client = cp.client().await;
    cp.kubectl().args(["create", "namespace", NS]).output()?;
    let tmp = cp.tmp_dir().to_path_buf();

    // The verifier's fixed cost: one watching a namespace without directories.
    let empty = {
        let verifier = Verifier::start(&cp, &bin, "bench-empty", &tmp.join("verifier-empty.log"))?;
        verifier.wait_ready(0).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        Memory::of(verifier.pid())
    };

    // N directories, issued by the operator (their statuses are the operator's, as in production).
    let log = tmp.join("operator.log");
    // Rotations may follow issuance within seconds in a short run: the default minimum interval
    // between two issues of one directory (1m) would hold them back.
    let operator_args = ["--min-issue-interval".to_owned(), "1s".to_owned()];
    let mut operator = Guard(start_operator(&cp, &bin, NS, &log, &operator_args)?);
    wait_leader(&operator.0.1).await?;
    println!("==> creating {} directories, issued by the operator", o.n);
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), NS);
    let started = Instant::now();
    create_directories(&dirs, o.n, o.client_concurrency).await?;
    wait_all_ready(&dirs, o.n, Duration::from_secs(60 + o.n as u64)).await?;
    let issuance = started.elapsed();
    let mut tokens = read_tokens(&client, o.n).await?;

    // The verifier, started once all are issued: its initial list holds all N (as after a restart).
    println!("==> starting the verifier");
    let started = Instant::now();
    let verifier = Verifier::start(&cp, &bin, NS, &tmp.join("verifier.log"))?;
    verifier.wait_ready(o.n).await?;
    let sync = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let synced = Memory::of(verifier.pid());

    println!("==> checking all {} tokens and {} unknown ones", o.n, o.n);
    let sweep = sweep(verifier.port, &tokens).await?;

    let floor_port = free_port()?;
    let floor = Guard(
        Command::new(&floor_bin)
            .arg(format!("127.0.0.1:{floor_port}"))
            .spawn()
            .with_context(|| format!("starting {}", floor_bin.display()))?,
    );
    wait_port(floor_port).await?;
    let nginx_port = free_port()?;
    let nginx = start_nginx(&root, &nginx, &tmp.join("nginx"), nginx_port, verifier.port, floor_port, o.connections)?;
    wait_port(nginx_port).await?;

    let valid = tokens.values().next().context("no tokens")?.clone();
    let unknown = Token::generate().expose().to_owned();
    let floor_url = format!("http://127.0.0.1:{floor_port}/verify");
    let verifier_url = format!("http://127.0.0.1:{}/verify", verifier.port);
    let plain_url = format!("http://127.0.0.1:{nginx_port}/plain/v2/Users");
    let auth_url = format!("http://127.0.0.1:{nginx_port}/auth/v2/Users");
    let load = Load { oha, duration: o.load, connections: o.connections };

    let load_before = loadavg();
    let (mut floor_peaks, mut verifier_peaks) = (vec![], vec![]);
    for round in 1..=o.rounds {
        floor_peaks.push(load.run(&format!("floor, peak (round {round})"), &floor_url, &valid, None, 200)?);
        let what = format!("verifier, valid token, peak (round {round})");
        verifier_peaks.push(load.run(&what, &verifier_url, &valid, None, 200)?);
    }
    let ratios: Vec<f64> = floor_peaks.iter().zip(&verifier_peaks).map(|(f, v)| v.rps / f.rps).collect();
    let (floor_peak, verifier_peak) = (median(floor_peaks), median(verifier_peaks));
    let verifier_unknown = load.run("verifier, unknown token, peak", &verifier_url, &unknown, None, 401)?;
    let half = (verifier_peak.rps / 2.0).round().max(1.0);
    let verifier_half = load.run("verifier, valid token, half of its peak", &verifier_url, &valid, Some(half), 200)?;
    let floor_half = load.run("floor, the same rate", &floor_url, &valid, Some(half), 200)?;
    let verifier_light = load.run("verifier, valid token, light load", &verifier_url, &valid, Some(LIGHT), 200)?;
    let floor_light = load.run("floor, light load", &floor_url, &valid, Some(LIGHT), 200)?;
    let plain_peak = load.run("nginx without auth, peak", &plain_url, &valid, None, 200)?;
    let auth_peak = load.run("nginx auth_request, peak", &auth_url, &valid, None, 200)?;
    let auth_unknown = load.run("nginx auth_request, unknown token, peak", &auth_url, &unknown, None, 401)?;
    let nginx_half = (auth_peak.rps / 2.0).round().max(1.0);
    let plain_half = load.run("nginx without auth, half of auth's peak", &plain_url, &valid, Some(nginx_half), 200)?;
    let auth_half = load.run("nginx auth_request, half of its peak", &auth_url, &valid, Some(nginx_half), 200)?;
    let loaded = Memory::of(verifier.pid());
    let load_after = loadavg();
    drop(nginx);
    drop(floor);

    println!("==> {} rotations, one at a time", o.rotations);
    let rotations = rotations(&client, verifier.port, &mut tokens, o.rotations).await?;
    let rotated = Memory::of(verifier.pid());
    drop(verifier);
    crate::terminate(&mut operator.0.0);

    println!("==> what takes the memory: the index built by verify-memprobe, one process per variant");
    let mut probes = vec![];
    let variants = [
        ("full", "any"),
        ("full", "paged"),
        ("full", "streaming"),
        ("slim", "any"),
        ("slim", "paged"),
        ("slim", "streaming"),
    ];
    for (kind, list) in variants {
        // A diagnosis, not a measure of the verifier: a variant the API server cannot serve is reported
        // and skipped.
        match probe(&cp, &probe_bin, kind, list, o.n).await {
            Ok(p) => probes.push(p),
            Err(e) => println!("    {kind} {list}: failed: {e:#}"),
        }
    }

    let report = Report {
        n: o.n,
        tools,
        issuance,
        sync,
        empty,
        synced,
        loaded,
        rotated,
        sweep,
        floor_peak,
        verifier_peak,
        verifier_unknown,
        half,
        verifier_half,
        floor_half,
        verifier_light,
        floor_light,
        ratios,
        plain_peak,
        auth_peak,
        auth_unknown,
        nginx_half,
        plain_half,
        auth_half,
        rotations,
        probes,
        loadavg: (load_before, load_after),
    };
    report.print();
    if o.check {
        println!(
            "bench-verify check: all {n} tokens 200 and {n} unknown 401 one by one; every load run answered only \
             200 (valid) or 401 (unknown), directly and through nginx; {r} rotations reached the verifier",
            n = o.n,
            r = o.rotations
        );
    }
    Ok(())
}

/// Builds the floor responder and the memory probe (`xtask/src/bin/`) with the operator's profile.
fn build_helpers(root: &Path, release: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    println!("==> building verify-floor and verify-memprobe ({})", if release { "release" } else { "debug" });
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--package", "xtask", "--bin", "verify-floor", "--bin", "verify-memprobe"]);
    if release {
        cmd.arg("--release");
    }
    ensure!(cmd.current_dir(root).status().context("running cargo build")?.success(), "building the helpers failed");
    let target: PathBuf = std::env::var("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|_| root.join("target"));
    let dir = target.join(if release { "release" } else { "debug" });
    Ok((dir.join("verify-floor"), dir.join("verify-memprobe")))
}

/// One memory probe (`verify-memprobe KIND LIST`): peak and current RSS with the index complete.
struct Probe {
    kind: &'static str,
    list: &'static str,
    memory: Memory,
    millis: u64,
}

async fn probe(
    cp: &ControlPlane,
    bin: &Path,
    kind: &'static str,
    list: &'static str,
    n: usize,
) -> anyhow::Result<Probe> {
    let run = tokio::process::Command::new(bin)
        .args([kind, list, NS])
        .env("KUBECONFIG", cp.kubeconfig_path())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .context("verify-memprobe did not finish within 300 s")?
        .context("running verify-memprobe")?;
    ensure!(out.status.success(), "verify-memprobe {kind} {list} failed");
    let text = String::from_utf8(out.stdout)?;
    let field = |key: &str| -> anyhow::Result<u64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .with_context(|| format!("no {key} in verify-memprobe's output {text:?}"))
    };
    ensure!(field("directories")? == n as u64, "verify-memprobe {kind} {list} indexed {text}");
    let memory = Memory { peak_kib: field("peak_kib")?, rss_kib: field("rss_kib")?, ..Memory::default() };
    println!("    {kind} {list}: {}", memory.show());
    Ok(Probe { kind, list, memory, millis: field("millis")? })
}

/// Runs an installer script that prints the path of its tool (installing it on first use).
fn locate(root: &Path, script: &str, args: &[&str]) -> anyhow::Result<PathBuf> {
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

fn version(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().context("asking a tool for its version")?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    Ok(String::from_utf8_lossy(&text).trim().replace("nginx version: ", ""))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    poll(&format!("a listener on port {port}"), Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await
}

/// A child process ended (SIGTERM, then SIGKILL) when dropped, also when the benchmark fails midway.
struct Guard<T: AsChild>(T);

trait AsChild {
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

struct Verifier {
    process: Guard<Child>,
    port: u16,
    metrics_port: u16,
}

impl Verifier {
    fn start(cp: &ControlPlane, bin: &Path, ns: &str, log: &Path) -> anyhow::Result<Verifier> {
        let (port, metrics_port) = (free_port()?, free_port()?);
        let log = std::fs::File::create(log)?;
        let mut cmd = Command::new(bin);
        cmd.args(["verify", "--namespace", ns]).args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ]);
        // Newer verifiers also serve Envoy's gRPC protocol, by default on 0.0.0.0:8082: keep it off
        // shared ports (two verifiers run here, and other work may hold 8082).
        if has_flag(bin, "--grpc-listen")? {
            cmd.args(["--grpc-listen", &format!("127.0.0.1:{}", free_port()?)]);
        }
        let child = cmd
            .env("KUBECONFIG", cp.kubeconfig_path())
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} verify", bin.display()))?;
        Ok(Verifier { process: Guard(child), port, metrics_port })
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Ready (its initial list is in) with `n` directories in its index.
    async fn wait_ready(&self, n: usize) -> anyhow::Result<()> {
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

fn has_flag(bin: &Path, flag: &str) -> anyhow::Result<bool> {
    let out = Command::new(bin).args(["verify", "--help"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(flag))
}

/// Every directory's token (from its Secret), by directory name.
async fn read_tokens(client: &kube::Client, n: usize) -> anyhow::Result<BTreeMap<String, String>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let mut tokens = BTreeMap::new();
    for s in secrets.list(&ListParams::default()).await? {
        let name = s.metadata.name.clone().unwrap_or_default();
        let (Some(dir), Some(token)) = (name.strip_suffix("-scim-token"), token_of(&s)) else { continue };
        tokens.insert(dir.to_owned(), token);
    }
    ensure!(tokens.len() == n, "{} token Secrets for {n} directories", tokens.len());
    Ok(tokens)
}

fn token_of(s: &Secret) -> Option<String> {
    let bytes = &s.data.as_ref()?.get("token")?.0;
    String::from_utf8(bytes.clone()).ok()
}

/// Memory of a process: resident now and at its peak.
#[derive(Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    peak_kib: u64,
    /// Of `rss_kib`: anonymous memory (heap, stacks) and file-backed pages (the binary's code).
    anon_kib: u64,
    file_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kib: field("VmRSS:"),
            peak_kib: peak_rss_kib(pid),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
        }
    }

    fn show(&self) -> String {
        let split = if self.anon_kib + self.file_kib > 0 {
            format!("; now {:.1} anon + {:.1} file", mib(self.anon_kib), mib(self.file_kib))
        } else {
            String::new()
        };
        format!("{:.1} MiB ({:.1} MiB){split}", mib(self.rss_kib), mib(self.peak_kib))
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A minimal HTTP/1.1 keep-alive client for the checks between load runs (one request at a time).
struct Http {
    port: u16,
    conn: Option<BufReader<tokio::net::TcpStream>>,
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl Http {
    fn new(port: u16) -> Http {
        Http { port, conn: None }
    }

    async fn verify(&mut self, token: &str, expected: Option<&str>) -> anyhow::Result<Answer> {
        let mut request = format!("GET /verify HTTP/1.1\r\nHost: verifier\r\nAuthorization: Bearer {token}\r\n");
        if let Some(expected) = expected {
            request.push_str(&format!("X-Scim-Expected-Directory: {expected}\r\n"));
        }
        request.push_str("\r\n");
        // One retry on a fresh connection: a kept-alive one may have been closed by the server.
        match self.exchange(&request).await {
            Ok(answer) => Ok(answer),
            Err(_) => {
                self.conn = None;
                self.exchange(&request).await
            }
        }
    }

    async fn exchange(&mut self, request: &str) -> anyhow::Result<Answer> {
        if self.conn.is_none() {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.set_nodelay(true)?;
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().expect("connected");
        conn.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        ensure!(conn.read_line(&mut line).await? > 0, "connection closed");
        let status: u16 = line.split_whitespace().nth(1).context("no status")?.parse()?;
        let mut headers = vec![];
        loop {
            line.clear();
            ensure!(conn.read_line(&mut line).await? > 0, "connection closed in the headers");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').context("malformed header")?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let answer = Answer { status, headers };
        let length: usize = answer.header("content-length").map(str::parse).transpose()?.unwrap_or(0);
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await?;
        if answer.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            self.conn = None;
        }
        Ok(answer)
    }
}

struct Sweep {
    allowed: usize,
    refused: usize,
}

/// Every token, bound to its own directory: 200 naming it; as many unknown tokens: 401.
async fn sweep(port: u16, tokens: &BTreeMap<String, String>) -> anyhow::Result<Sweep> {
    let mut http = Http::new(port);
    let mut sweep = Sweep { allowed: 0, refused: 0 };
    for (name, token) in tokens {
        let a = http.verify(token, Some(&format!("{NS}/{name}"))).await?;
        ensure!(
            a.status == 200
                && a.header("x-scim-directory-namespace") == Some(NS)
                && a.header("x-scim-directory-name") == Some(name.as_str()),
            "{name}'s token: {} {:?}",
            a.status,
            a.headers
        );
        sweep.allowed += 1;
    }
    for _ in 0..tokens.len() {
        let a = http.verify(Token::generate().expose(), None).await?;
        ensure!(a.status == 401, "an unknown token got {}", a.status);
        sweep.refused += 1;
    }
    Ok(sweep)
}

/// nginx from the e2e test's template: `/auth/` is a tenant location (auth_request → the verifier,
/// bound to the first directory), `/plain/` the same proxying without auth; the floor is upstream.
fn start_nginx(
    root: &Path,
    nginx: &Path,
    prefix: &Path,
    port: u16,
    verifier_port: u16,
    floor_port: u16,
    connections: usize,
) -> anyhow::Result<Guard<Child>> {
    std::fs::create_dir_all(prefix)?;
    let peers = root.join("tests/peers");
    let tenant = std::fs::read_to_string(peers.join("tenant-location.conf.template"))?
        .replace("{{TENANT}}", "auth")
        .replace("{{DIRECTORY_NAMESPACE}}", NS)
        .replace("{{DIRECTORY_NAME}}", "tenant-00000");
    let plain = r#"
        # The benchmark's comparison: the same proxying to the same upstream, without auth_request.
        location /plain/ {
            proxy_pass http://scim_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header Authorization "";
        }
"#;
    let prefix_str = prefix.to_str().context("non-UTF-8 path")?;
    let mut conf = std::fs::read_to_string(peers.join("nginx.conf.template"))?
        .replace("{{PREFIX}}", prefix_str)
        .replace("{{LISTEN}}", &format!("127.0.0.1:{port}"))
        .replace("{{VERIFIER}}", &format!("127.0.0.1:{verifier_port}"))
        .replace("{{SCIM_SERVER}}", &format!("127.0.0.1:{floor_port}"))
        .replace("{{TENANT_LOCATIONS}}", &(tenant + plain));
    // Three changes for a load run, each required to apply (a changed template fails here instead of
    // silently benchmarking another config): no access log (a disk write per request, the same on
    // both routes), enough client connections, and as many idle upstream connections kept alive as
    // the load generator opens, so that neither route reconnects to its upstream per request.
    for (from, to) in [
        (format!("access_log {prefix_str}/access.log combined;"), "access_log off;".to_owned()),
        ("worker_connections 256;".to_owned(), "worker_connections 4096;".to_owned()),
        ("keepalive 8;".to_owned(), format!("keepalive {};", connections.max(8))),
    ] {
        ensure!(conf.contains(&from), "tests/peers/nginx.conf.template no longer has `{from}`");
        conf = conf.replace(&from, &to);
    }
    ensure!(!conf.contains("{{"), "an unfilled placeholder is left in the nginx config");
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(format!("{prefix_str}/"))
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", nginx.display()))?;
    Ok(Guard(child))
}

struct Load {
    oha: PathBuf,
    duration: Duration,
    connections: usize,
}

/// One oha run: its throughput, latency and answers.
#[derive(Clone, Default)]
struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
    responses: u64,
}

impl Run {
    fn show_latency(&self) -> String {
        format!("{} / {}", ms(self.p50), ms(self.p99))
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

impl Load {
    /// Runs oha for the configured time (`rate`: open loop at that many requests/s, with latency
    /// correction) and asserts every answer was `want`.
    fn run(&self, what: &str, url: &str, token: &str, rate: Option<f64>, want: u16) -> anyhow::Result<Run> {
        let mut cmd = Command::new(&self.oha);
        cmd.args(["--no-tui", "--output-format", "json"])
            .args(["-z", &format!("{}s", self.duration.as_secs())])
            .args(["-c", &self.connections.to_string()])
            .args(["-H", &format!("Authorization: Bearer {token}")]);
        if let Some(rate) = rate {
            cmd.args(["-q", &format!("{rate}"), "--latency-correction"]);
        }
        let out = cmd.arg(url).stderr(Stdio::inherit()).output().context("running oha")?;
        ensure!(out.status.success(), "oha failed on {what}");
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("oha's JSON for {what}"))?;
        let statuses: BTreeMap<String, u64> = serde_json::from_value(v["statusCodeDistribution"].clone())?;
        let errors: BTreeMap<String, u64> = serde_json::from_value(v["errorDistribution"].clone())?;
        let responses: u64 = statuses.values().sum();
        // The correctness check: only the expected status, and no error but the requests in flight
        // when the run's time was up.
        ensure!(
            responses > 0 && statuses.keys().all(|s| *s == want.to_string()),
            "{what}: expected only {want}, got {statuses:?}"
        );
        ensure!(errors.keys().all(|e| e.contains("deadline")), "{what}: errors {errors:?}");
        let seconds = |key: &str| -> anyhow::Result<Duration> {
            let s = v["latencyPercentiles"][key].as_f64().with_context(|| format!("no {key} in oha's JSON"))?;
            Ok(Duration::from_secs_f64(s))
        };
        let run = Run {
            rps: responses as f64 / v["summary"]["total"].as_f64().context("no summary.total")?,
            p50: seconds("p50")?,
            p99: seconds("p99")?,
            responses,
        };
        let rate = rate.map(|r| format!(" (offered {r:.0}/s)")).unwrap_or_default();
        println!(
            "    {what}{rate}: {:.0} req/s, p50/p99 {}, {} answers all {want}",
            run.rps,
            run.show_latency(),
            run.responses
        );
        Ok(run)
    }
}

#[derive(Default)]
struct Rotations {
    /// New token in the Secret (seen by the benchmark's watch) → its first 200.
    new_from_secret: Vec<Duration>,
    /// New hash in the status (seen by the benchmark's watch) → the new token's first 200.
    new_from_status: Vec<Duration>,
    /// New token in the Secret → the old token's first 401.
    old_from_secret: Vec<Duration>,
    /// Rotation requested (spec patch) → the old token's first 401, the whole path.
    old_from_patch: Vec<Duration>,
}

enum Seen {
    Secret(String, String, Instant),
    Status(String, String, Instant),
}

/// Rotates `count` directories one at a time and times when the verifier's answers change. Both
/// tokens are polled on keep-alive connections every millisecond (the resolution).
async fn rotations(
    client: &kube::Client,
    port: u16,
    tokens: &mut BTreeMap<String, String>,
    count: usize,
) -> anyhow::Result<Rotations> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), NS);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    let (synced_tx, mut synced) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watch_secrets = {
        let (tx, synced_tx) = (tx.clone(), synced_tx.clone());
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(secrets, watcher::Config::default()));
            while let Ok(Some(e)) = events.try_next().await {
                match e {
                    watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                        let (name, token) = (s.metadata.name.clone().unwrap_or_default(), token_of(&s));
                        let _ = tx.send(Seen::Secret(name, token.unwrap_or_default(), Instant::now()));
                    }
                    watcher::Event::InitDone => {
                        let _ = synced_tx.send(());
                    }
                    _ => {}
                }
            }
        })
    };
    let watch_dirs = tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(dirs.clone(), watcher::Config::default()));
        while let Ok(Some(e)) = events.try_next().await {
            match e {
                watcher::Event::Apply(d) | watcher::Event::InitApply(d) => {
                    let hash = d.status.as_ref().and_then(|s| s.token_hash.clone()).unwrap_or_default();
                    let _ = tx.send(Seen::Status(d.metadata.name.clone().unwrap_or_default(), hash, Instant::now()));
                }
                watcher::Event::InitDone => {
                    let _ = synced_tx.send(());
                }
                _ => {}
            }
        }
    });
    for _ in 0..2 {
        synced.recv().await.context("a watch ended before its initial list")?;
    }

    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), NS);
    let mut out = Rotations::default();
    for i in 0..count {
        let name = format!("tenant-{i:05}");
        let secret = format!("{name}-scim-token");
        let old = tokens.get(&name).with_context(|| format!("no token for {name}"))?.clone();
        let old_hash = TokenHash::of_bytes(old.as_bytes()).to_string();
        while rx.try_recv().is_ok() {} // events from before this rotation
        let patched = Instant::now();
        let old_refused = tokio::spawn(first(port, old.clone(), 401, 200));
        dirs.patch(&name, &PatchParams::default(), &Patch::Merge(json!({ "spec": { "rotationGeneration": 1 } })))
            .await?;
        let (mut in_secret, mut in_status, mut new_accepted) = (None, None, None);
        let deadline = patched + Duration::from_secs(60);
        while in_secret.is_none() || in_status.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let seen = tokio::time::timeout(remaining, rx.recv())
                .await
                .with_context(|| format!("no new token for {name} within 60s"))?
                .context("a watch ended")?;
            match seen {
                Seen::Secret(s, token, at) if s == secret && token != old && in_secret.is_none() => {
                    new_accepted = Some(tokio::spawn(first(port, token.clone(), 200, 401)));
                    tokens.insert(name.clone(), token);
                    in_secret = Some(at);
                }
                Seen::Status(d, hash, at) if d == name && !hash.is_empty() && hash != old_hash => {
                    in_status.get_or_insert(at);
                }
                _ => {}
            }
        }
        let (in_secret, in_status) = (in_secret.expect("seen"), in_status.expect("seen"));
        let accepted = new_accepted.expect("spawned").await??;
        let refused = old_refused.await??;
        out.new_from_secret.push(accepted.saturating_duration_since(in_secret));
        out.new_from_status.push(accepted.saturating_duration_since(in_status));
        out.old_from_secret.push(refused.saturating_duration_since(in_secret));
        out.old_from_patch.push(refused - patched);
    }
    watch_secrets.abort();
    watch_dirs.abort();
    Ok(out)
}

/// Polls the verifier with `token` until it answers `want` (and only `want` or `before` meanwhile);
/// returns when the first `want` arrived.
async fn first(port: u16, token: String, want: u16, before: u16) -> anyhow::Result<Instant> {
    let mut http = Http::new(port);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = http.verify(&token, None).await?.status;
        if status == want {
            return Ok(Instant::now());
        }
        ensure!(status == before, "the verifier answered {status} during a rotation (expected {before} or {want})");
        ensure!(Instant::now() < deadline, "the verifier did not answer {want} within 60s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Tools {
    oha: String,
    nginx: String,
    connections: usize,
    load: Duration,
}

struct Report {
    n: usize,
    tools: Tools,
    issuance: Duration,
    sync: Duration,
    empty: Memory,
    synced: Memory,
    loaded: Memory,
    rotated: Memory,
    sweep: Sweep,
    floor_peak: Run,
    verifier_peak: Run,
    verifier_unknown: Run,
    half: f64,
    verifier_half: Run,
    floor_half: Run,
    verifier_light: Run,
    floor_light: Run,
    /// Verifier / floor peak throughput, per round.
    ratios: Vec<f64>,
    plain_peak: Run,
    auth_peak: Run,
    auth_unknown: Run,
    nginx_half: f64,
    plain_half: Run,
    auth_half: Run,
    rotations: Rotations,
    probes: Vec<Probe>,
    /// The machine's load average (1 min) before and after the load runs: other work shares the cores.
    loadavg: (String, String),
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

fn pct(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut s = samples.to_vec();
    s.sort();
    s[((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1]
}

impl Report {
    fn print(&self) {
        let t = &self.tools;
        println!(
            "\nLoad: {}, {} connections, {} s per run, all on loopback; nginx {} (one worker).",
            t.oha,
            t.connections,
            t.load.as_secs(),
            t.nginx
        );
        println!(
            "Machine: {} cores; 1-minute load average {} before the load runs, {} after.",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.loadavg.0,
            self.loadavg.1
        );
        println!("\n| measure | value |\n| --- | --- |");
        println!("| directories (issued by the operator) | {} in {:.1} s |", self.n, self.issuance.as_secs_f64());
        println!("| verifier start → ready with all indexed | {:.2} s |", self.sync.as_secs_f64());
        println!(
            "| correctness: one by one | {} valid tokens → 200 naming their directory, {} unknown → 401 |",
            self.sweep.allowed, self.sweep.refused
        );
        println!("| verifier RSS now (peak): nothing to index | {} |", self.empty.show());
        println!("| verifier RSS now (peak): {} indexed | {} |", self.n, self.synced.show());
        println!("| verifier RSS now (peak): after the load runs | {} |", self.loaded.show());
        println!("| verifier RSS now (peak): after the rotations | {} |", self.rotated.show());

        let ratio = self.verifier_peak.rps / self.floor_peak.rps;
        println!("\n| load run | requests/s | p50 / p99 | answers |\n| --- | --- | --- | --- |");
        let row = |what: &str, r: &Run, status: u16| {
            println!("| {what} | {:.0} | {} | {} × {status} |", r.rps, r.show_latency(), r.responses);
        };
        row("floor (axum, no work), peak (median run)", &self.floor_peak, 200);
        row("verifier, valid token, peak (median run)", &self.verifier_peak, 200);
        row("verifier, unknown token, peak", &self.verifier_unknown, 401);
        row(&format!("verifier at {:.0}/s (half its peak)", self.half), &self.verifier_half, 200);
        row(&format!("floor at {:.0}/s", self.half), &self.floor_half, 200);
        row(&format!("verifier at {LIGHT:.0}/s (light load)"), &self.verifier_light, 200);
        row(&format!("floor at {LIGHT:.0}/s"), &self.floor_light, 200);
        row("nginx → floor, no auth, peak", &self.plain_peak, 200);
        row("nginx auth_request → verifier, then → floor, peak", &self.auth_peak, 200);
        row("nginx auth_request, unknown token, peak", &self.auth_unknown, 401);
        row(&format!("nginx no auth at {:.0}/s", self.nginx_half), &self.plain_half, 200);
        row(&format!("nginx auth_request at {:.0}/s (half its peak)", self.nginx_half), &self.auth_half, 200);

        let r = &self.rotations;
        let line = |what: &str, s: &[Duration]| {
            println!("| {what} | {} / {} | {} |", ms(pct(s, 0.5)), ms(pct(s, 0.99)), ms(pct(s, 1.0)));
        };
        println!("\n| rotation ({} of them) | p50 / p99 | max |\n| --- | --- | --- |", r.new_from_secret.len());
        line("new token in the Secret → its first 200", &r.new_from_secret);
        line("new hash in the status → new token's first 200", &r.new_from_status);
        line("new token in the Secret → old token's first 401", &r.old_from_secret);
        line("rotation requested → old token's first 401 (operator + verifier)", &r.old_from_patch);

        println!(
            "\n| memory probe: deserialized, initial list | RSS with the index complete (peak) | time to index |\n| --- | --- | --- |"
        );
        for p in &self.probes {
            println!("| {} ScimDirectory, {} | {} | {} ms |", p.kind, p.list, p.memory.show(), p.millis);
        }

        let goal = |met: bool| if met { "met" } else { "missed" };
        let visible = pct(&r.new_from_secret, 0.99).max(pct(&r.old_from_secret, 0.99));
        println!("\n| goal | measured | |\n| --- | --- | --- |");
        let rounds: Vec<String> = self.ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| throughput ≥ 0.8 × the floor | {ratio:.2} × (medians; per round {}) | {} |",
            rounds.join(", "),
            goal(ratio >= 0.8)
        );
        println!(
            "| p99 ≤ 1 ms at half of peak | {} at {:.0}/s | {} |",
            ms(self.verifier_half.p99),
            self.half,
            goal(self.verifier_half.p99 <= Duration::from_millis(1))
        );
        println!(
            "| RSS ≤ 16 MiB with {} indexed | {:.1} MiB now, {:.1} MiB peak | {} |",
            self.n,
            mib(self.loaded.rss_kib),
            mib(self.rotated.peak_kib),
            goal(self.rotated.peak_kib <= 16 * 1024)
        );
        println!(
            "| rotation visible ≤ 1 s at p99 | {} (p99, Secret → new 200 or old 401) | {} |",
            ms(visible),
            goal(visible <= Duration::from_secs(1))
        );
        // Signed: on a noisy machine the route with auth can come out faster at a low rate.
        let added = |a: &Run, b: &Run| format!("{:+.2} ms", (a.p50.as_secs_f64() - b.p50.as_secs_f64()) * 1000.0);
        println!(
            "| (context) nginx auth_request adds | {} at p50 at {:.0}/s; throughput {:.2} × no auth | |",
            added(&self.auth_half, &self.plain_half),
            self.nginx_half,
            self.auth_peak.rps / self.plain_peak.rps
        );
    }
}
