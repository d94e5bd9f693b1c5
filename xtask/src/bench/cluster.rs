//! What every benchmark configuration shares: starting the operator, waiting on the cluster through
//! watches (never polling LISTs, which would load the API server being measured), the API server's
//! own write counters, and process memory.
#![allow(unsafe_code)] // libc (sysconf) has no safe wrapper here: each call carries its SAFETY note

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use envtest::ControlPlane;
use futures::{StreamExt, TryStreamExt, stream};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use scim_token_operator::api::{ScimDirectory, ScimDirectorySpec};
use serde::de::DeserializeOwned;

pub(crate) fn start_operator(
    cp: &ControlPlane,
    bin: &Path,
    ns: &str,
    log: &Path,
    extra: &[String],
) -> anyhow::Result<(Child, u16)> {
    let port = free_port()?;
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

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The value of the first sample of `metric` (a name, or a name with its label set) at a metrics port.
pub(crate) fn metric_value(port: u16, metric: &str) -> Option<f64> {
    http_get(port, "/metrics")?
        .lines()
        .filter(|l| l.starts_with(metric))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

pub(crate) async fn wait_leader(port: &u16) -> anyhow::Result<()> {
    poll("operator leadership", Duration::from_secs(60), || async {
        http_get(*port, "/metrics").is_some_and(|m| m.contains("scim_token_operator_leader 1"))
    })
    .await
}

/// Waits until the reconcile counter `metric` at `port` reaches `n` (a controller's initial pass).
pub(crate) async fn wait_reconciled(port: u16, metric: &str, n: usize) -> anyhow::Result<()> {
    poll("initial reconciliation after restart", Duration::from_secs(300 + n as u64 / 10), || async {
        metric_value(port, metric).is_some_and(|count| count >= n as f64)
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

pub(crate) fn directory_name(i: usize) -> String {
    format!("tenant-{i:05}")
}

pub(crate) fn new_directory(i: usize) -> ScimDirectory {
    ScimDirectory::new(
        &directory_name(i),
        ScimDirectorySpec { token_expires_in: Some("90d".into()), ..ScimDirectorySpec::default() },
    )
}

pub(crate) async fn create_directories(api: &Api<ScimDirectory>, n: usize, concurrency: usize) -> anyhow::Result<()> {
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move { create(&api, &new_directory(i)).await.map(|_| ()) }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Retries a request on a transport error: under a 10,000-object burst on two shared cores, the API
/// server now and then drops a connection, and one lost request must not end a half-hour run.
pub(crate) async fn retrying<T, F, Fut>(mut request: F) -> kube::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match request().await {
            Err(kube::Error::Api(e)) => return Err(kube::Error::Api(e)),
            Err(_) if attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            other => return other,
        }
    }
}

/// Creates `object`, retrying on transport errors; a retried create that finds the object (its first
/// attempt landed, the answer was lost) returns the object found.
pub(crate) async fn create<K>(api: &Api<K>, object: &K) -> kube::Result<K>
where
    K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut retried = false;
    let name = object.meta().name.clone().unwrap_or_default();
    let name = name.as_str();
    retrying(|| {
        let first = !retried;
        retried = true;
        async move {
            match api.create(&PostParams::default(), object).await {
                Err(kube::Error::Api(e)) if e.code == 409 && !first => api.get(name).await,
                other => other,
            }
        }
    })
    .await
}

/// Waits until `n` objects are Ready, through one watch.
pub(crate) async fn wait_all_ready(api: &Api<ScimDirectory>, n: usize, timeout: Duration) -> anyhow::Result<()> {
    wait_ready(api, n, timeout, |d| d.ready_condition().is_some_and(|c| c.status == "True")).await
}

/// Waits until `n` objects satisfy `ready`, through one watch.
pub(crate) async fn wait_ready<K>(
    api: &Api<K>,
    n: usize,
    timeout: Duration,
    ready: fn(&K) -> bool,
) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut seen = std::collections::HashSet::new();
    // Watch errors (a dropped connection) are retried with backoff, not fatal: the watch resumes.
    let mut events = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .filter_map(|o| std::future::ready(o.ok()))
    );
    let wait = async {
        while let Some(o) = events.next().await {
            let name = o.meta().name.clone().unwrap_or_default();
            if ready(&o) {
                seen.insert(name);
            } else {
                seen.remove(&name);
            }
            if seen.len() >= n {
                return Ok(());
            }
        }
        bail!("the watch ended")
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(result) => result,
        Err(_) => bail!("only {}/{n} Ready after {timeout:?}", seen.len()),
    }
}

/// Write requests the API server has served, by resource (`resource` or `resource/subresource`), from
/// its own `apiserver_request_total`: what a controller claims about its writes is not evidence.
pub(crate) async fn write_counts(client: &kube::Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = retrying(|| async {
        let req = http::Request::get("/metrics").body(Vec::new()).expect("a valid request");
        client.request_text(req).await
    })
    .await
    .context("reading the API server's /metrics")?;
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
        let key = match get("subresource").filter(|s| !s.is_empty()) {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        };
        let value: f64 = line.split_whitespace().last().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry(key).or_default() += value;
    }
    Ok(out)
}

/// Differences per resource. Leases are left out: leader election renews its Lease by design (every
/// few seconds), the one write an idle operator makes.
pub(crate) fn diff(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut d: BTreeMap<String, f64> = after
        .iter()
        .filter(|(k, _)| k.as_str() != "leases")
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect();
    d.retain(|_, v| *v != 0.0);
    d
}

/// Peak resident set (VmHWM) of a process, in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Current resident set (VmRSS) of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// Current resident set of a process split into anonymous memory (heap, stacks) and file-backed pages
/// (mostly the binary's own code and read-only data), in KiB.
pub(crate) fn rss_split_kib(pid: u32) -> (u64, u64) {
    (proc_status_kib(pid, "RssAnon:"), proc_status_kib(pid, "RssFile:"))
}

/// CPU time (user + system) a process has used so far, in seconds.
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, may hold spaces): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a constant of the system.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / per_sec)
}

/// CPU seconds used so far by the controller (if any), kube-apiserver and etcd.
pub(crate) fn cpu_snapshot(cp: &ControlPlane, controller: Option<u32>) -> [Option<f64>; 3] {
    [controller.and_then(cpu_secs), cp.apiserver_pid().and_then(cpu_secs), cp.etcd_pid().and_then(cpu_secs)]
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn apiserver_pid(cp: &ControlPlane) -> Option<u32> {
    let port = cp.server_url().rsplit(':').next()?.to_owned();
    let want = format!("--secure-port={port}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(PathBuf::from("/proc").join(pid.to_string()).join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("kube-apiserver") && cmdline.split('\0').any(|a| a == want)).then_some(pid)
    })
}
