//! `cargo xtask bench`: issuance throughput, memory, steady-state writes and rotation latency of the
//! operator on a real control plane. Numbers only; the `--check` mode asserts correctness (all Ready,
//! zero idle writes), never time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use envtest::ControlPlane;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use scim_token_operator::api::{ScimDirectory, ScimDirectorySpec};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct Options {
    pub n: usize,
    /// Concurrency of the benchmark's own client (creates, and the floor's writes).
    pub client_concurrency: usize,
    pub idle: Duration,
    pub rotations: usize,
    pub release: bool,
    /// Assert correctness (all Ready, zero idle writes) and fail otherwise.
    pub check: bool,
    /// Extra flags for the operator (e.g. `--concurrency 32`).
    pub operator_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            n: 1000,
            client_concurrency: 16,
            idle: Duration::from_secs(120),
            rotations: 100,
            release: false,
            check: false,
            operator_args: vec![],
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
            "--idle-secs" => o.idle = Duration::from_secs(value()?.parse()?),
            "--rotations" => o.rotations = value()?.parse()?,
            "--release" => o.release = true,
            "--check" => o.check = true,
            "--" => o.operator_args.extend(it.by_ref().cloned()),
            other => bail!("unknown bench option {other}\n{}", crate::USAGE),
        }
    }
    ensure!(o.n > 0 && o.rotations <= o.n, "--rotations must not exceed --n");
    Ok(o)
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let root = envtest::workspace_root();
    let bin = crate::build_operator(&root, o.release)?;
    println!("==> starting the control plane");
    let cp = ControlPlane::start().await?;
    let client = cp.client().await;
    let ns = "bench";
    let floor_ns = "bench-floor";
    for name in [ns, floor_ns] {
        cp.kubectl().args(["create", "namespace", name]).output()?;
    }
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), ns);
    let log = cp.tmp_dir().join("operator.log");
    let mut operator = start_operator(&cp, &bin, ns, &log, &o.operator_args)?;
    wait_leader(&operator.1).await?;

    // 1. Mass issuance through the operator.
    println!("==> creating {} directories (client concurrency {})", o.n, o.client_concurrency);
    let started = Instant::now();
    create_directories(&dirs, o.n, o.client_concurrency).await?;
    let created = started.elapsed();
    wait_all_ready(&dirs, o.n, Duration::from_secs(60 + o.n as u64)).await?;
    let issuance = started.elapsed();
    let operator_rss_issue = peak_rss_kib(operator.0.id());

    // The floor: the minimum writes the job needs, with a plain client at the same concurrency.
    let floor_dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), floor_ns);
    create_directories(&floor_dirs, o.n, o.client_concurrency).await?;
    let floor = floor_writes(&client, floor_ns, o.n, o.client_concurrency).await?;

    // 2. Silence while idle, counted by the API server, not by the operator.
    settle().await;
    let before = write_counts(&client).await?;
    println!("==> idle for {:?}", o.idle);
    tokio::time::sleep(o.idle).await;
    let idle_writes = diff(&before, &write_counts(&client).await?);

    // ... and across a restart.
    let before = write_counts(&client).await?;
    crate::terminate(&mut operator.0);
    operator = start_operator(&cp, &bin, ns, &log, &o.operator_args)?;
    wait_leader(&operator.1).await?;
    wait_reconciled(&operator.1, o.n).await?;
    tokio::time::sleep(o.idle.min(Duration::from_secs(30))).await;
    let restart_writes = diff(&before, &write_counts(&client).await?);
    let operator_rss = peak_rss_kib(operator.0.id()).max(operator_rss_issue);
    let apiserver_rss = apiserver_pid(&cp).map(peak_rss_kib).unwrap_or(0);

    // 3. Rotation latency: patch -> a watch sees the Secret with the new token.
    let latencies = rotation_latencies(&client, ns, o.rotations).await?;
    crate::terminate(&mut operator.0);

    let report = Report {
        n: o.n,
        created,
        issuance,
        floor,
        operator_rss_kib: operator_rss,
        apiserver_rss_kib: apiserver_rss,
        idle_writes,
        restart_writes,
        idle: o.idle,
        latencies,
    };
    report.print();
    if o.check {
        ensure!(report.idle_writes.values().all(|v| *v == 0.0), "writes while idle: {:?}", report.idle_writes);
        ensure!(
            report.restart_writes.values().all(|v| *v == 0.0),
            "writes across a restart: {:?}",
            report.restart_writes
        );
        println!("bench check: all {} Ready, zero writes while idle and across a restart", o.n);
    }
    Ok(())
}

struct Report {
    n: usize,
    created: Duration,
    issuance: Duration,
    floor: Duration,
    operator_rss_kib: u64,
    apiserver_rss_kib: u64,
    idle_writes: BTreeMap<String, f64>,
    restart_writes: BTreeMap<String, f64>,
    idle: Duration,
    latencies: Vec<Duration>,
}

impl Report {
    fn print(&self) {
        let pct = |p: f64| -> Duration {
            if self.latencies.is_empty() {
                return Duration::ZERO;
            }
            let mut l = self.latencies.clone();
            l.sort();
            l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1]
        };
        let total = |m: &BTreeMap<String, f64>| m.values().sum::<f64>() as i64;
        println!("\n| measure | value |\n| --- | --- |");
        println!("| directories | {} |", self.n);
        println!("| create calls done (bench client) | {:.1} s |", self.created.as_secs_f64());
        println!(
            "| all Ready (operator) | {:.1} s ({:.0}/s) |",
            self.issuance.as_secs_f64(),
            self.n as f64 / self.issuance.as_secs_f64()
        );
        println!(
            "| floor: {} Secret creates + {} status patches (plain client) | {:.1} s ({:.0}/s) |",
            self.n,
            self.n,
            self.floor.as_secs_f64(),
            self.n as f64 / self.floor.as_secs_f64()
        );
        println!("| ratio operator / floor | {:.2} |", self.issuance.as_secs_f64() / self.floor.as_secs_f64());
        println!("| operator peak RSS | {:.1} MiB |", self.operator_rss_kib as f64 / 1024.0);
        println!("| kube-apiserver peak RSS | {:.1} MiB |", self.apiserver_rss_kib as f64 / 1024.0);
        // The breakdown by verb and resource, only when there is something to break down.
        let detail = |w: &BTreeMap<String, f64>| if w.is_empty() { String::new() } else { format!(" {w:?}") };
        println!("| writes while idle ({:?}) | {}{} |", self.idle, total(&self.idle_writes), detail(&self.idle_writes));
        println!("| writes across a restart | {}{} |", total(&self.restart_writes), detail(&self.restart_writes));
        println!(
            "| rotation latency p50 / p99 ({} rotations) | {:.0} ms / {:.0} ms |",
            self.latencies.len(),
            pct(0.5).as_secs_f64() * 1000.0,
            pct(0.99).as_secs_f64() * 1000.0
        );
    }
}

pub(crate) fn start_operator(
    cp: &ControlPlane,
    bin: &Path,
    ns: &str,
    log: &Path,
    extra: &[String],
) -> anyhow::Result<(Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(bin)
        .args(["run", "--namespace", ns, "--lease-namespace", ns, "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("RUST_LOG", "info")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok((child, port))
}

pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

pub(crate) async fn wait_leader(port: &u16) -> anyhow::Result<()> {
    poll("operator leadership", Duration::from_secs(60), || async {
        http_get(*port, "/metrics").is_some_and(|m| m.contains("scim_token_operator_leader 1"))
    })
    .await
}

/// Waits until the operator has reconciled at least `n` times since it started (its initial pass).
async fn wait_reconciled(port: &u16, n: usize) -> anyhow::Result<()> {
    poll("initial reconciliation after restart", Duration::from_secs(300), || async {
        http_get(*port, "/metrics")
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("scim_token_operator_reconcile_duration_seconds_count"))
                    .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            })
            .is_some_and(|count| count >= n as f64)
    })
    .await
}

pub(crate) async fn poll<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub(crate) async fn create_directories(api: &Api<ScimDirectory>, n: usize, concurrency: usize) -> anyhow::Result<()> {
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let d = ScimDirectory::new(
                    &format!("tenant-{i:05}"),
                    ScimDirectorySpec { token_expires_in: Some("90d".into()), ..ScimDirectorySpec::default() },
                );
                api.create(&PostParams::default(), &d).await.map(|_| ())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Waits until `n` directories are Ready, through one watch: polling LISTs of thousands of objects
/// would load the API server and distort the very time being measured.
pub(crate) async fn wait_all_ready(api: &Api<ScimDirectory>, n: usize, timeout: Duration) -> anyhow::Result<()> {
    let mut ready = std::collections::HashSet::new();
    let mut events = std::pin::pin!(watcher(api.clone(), watcher::Config::default()).applied_objects());
    let wait = async {
        while let Some(d) = events.try_next().await? {
            let name = d.metadata.name.clone().unwrap_or_default();
            if d.ready_condition().is_some_and(|c| c.status == "True") {
                ready.insert(name);
            } else {
                ready.remove(&name);
            }
            if ready.len() >= n {
                return Ok(());
            }
        }
        bail!("the watch ended")
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(result) => result,
        Err(_) => bail!("only {}/{n} Ready after {timeout:?}", ready.len()),
    }
}

/// N Secret creates + N status patches, what issuing needs at minimum, without an operator.
async fn floor_writes(client: &kube::Client, ns: &str, n: usize, concurrency: usize) -> anyhow::Result<Duration> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let (secrets, dirs) = (secrets.clone(), dirs.clone());
            async move {
                let name = format!("tenant-{i:05}");
                let token = scim_token_operator::token::Token::generate();
                let secret = Secret {
                    metadata: kube::api::ObjectMeta { name: Some(format!("{name}-scim-token")), ..Default::default() },
                    data: Some([("token".to_owned(), ByteString(token.expose().as_bytes().to_vec()))].into()),
                    ..Default::default()
                };
                secrets.create(&PostParams::default(), &secret).await?;
                let status = json!({ "status": { "tokenHash": token.hash().to_string() } });
                dirs.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await.map(|_| ())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(started.elapsed())
}

/// Lets in-flight work (Event series, trailing reconciles) finish before counting.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(5)).await;
}

/// Write requests the API server has served, by resource, for the resources the operator writes.
/// Leases are left out: leader election renews its Lease by design (every few seconds), which is
/// the one write an idle operator makes; the benchmark runs with it on and reports it separately.
async fn write_counts(client: &kube::Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let labels = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap_or(line.len())];
        let get = |k: &str| {
            labels.split("\",").find_map(|kv| kv.strip_prefix(&format!("{k}=\"")).map(|v| v.trim_end_matches('"')))
        };
        let (Some(verb), Some(resource)) = (get("verb"), get("resource")) else { continue };
        if !matches!(verb, "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION") {
            continue;
        }
        if !matches!(resource, "scimdirectories" | "secrets" | "events" | "leases") {
            continue;
        }
        let value: f64 = line.split_whitespace().last().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry(resource.to_owned()).or_default() += value;
    }
    Ok(out)
}

/// Differences per resource, leases reported under their own key.
fn diff(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut d: BTreeMap<String, f64> = after
        .iter()
        .filter(|(k, _)| k.as_str() != "leases")
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect();
    d.retain(|_, v| *v != 0.0);
    d
}

async fn rotation_latencies(client: &kube::Client, ns: &str, count: usize) -> anyhow::Result<Vec<Duration>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let reader = secrets.clone();
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), ns);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, Instant)>();
    let watch = tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(secrets, watcher::Config::default()).applied_objects());
        while let Ok(Some(s)) = events.try_next().await {
            let hash = hash_of(&s);
            let _ = tx.send((s.metadata.name.unwrap_or_default(), hash, Instant::now()));
        }
    });
    let mut latencies = vec![];
    for i in 0..count {
        let name = format!("tenant-{i:05}");
        let secret = format!("{name}-scim-token");
        while rx.try_recv().is_ok() {} // events from before this rotation
        let old = hash_of(&reader.get(&secret).await?);
        let patched = Instant::now();
        dirs.patch(&name, &PatchParams::default(), &Patch::Merge(json!({ "spec": { "rotationGeneration": 1 } })))
            .await?;
        let deadline = patched + Duration::from_secs(60);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (s, h, at) = tokio::time::timeout(remaining, rx.recv())
                .await
                .with_context(|| format!("no new Secret for {name} within 60s"))?
                .context("watch ended")?;
            if s == secret && h != old {
                latencies.push(at - patched);
                break;
            }
        }
    }
    watch.abort();
    Ok(latencies)
}

fn hash_of(s: &Secret) -> String {
    s.metadata.annotations.as_ref().and_then(|a| a.get("scim.tokenops.dev/token-hash").cloned()).unwrap_or_default()
}

/// Peak resident set (VmHWM) of a process, in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn apiserver_pid(cp: &ControlPlane) -> Option<u32> {
    let port = cp.server_url().rsplit(':').next()?.to_owned();
    let want = format!("--secure-port={port}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(PathBuf::from("/proc").join(pid.to_string()).join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("kube-apiserver") && cmdline.split('\0').any(|a| a == want)).then_some(pid)
    })
}
