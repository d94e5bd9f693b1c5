//! `cargo xtask bench`: issuance time, memory, writes per directory, steady-state writes and rotation
//! latency of the operator on a real control plane, next to an honest floor and (with `--peer eso`)
//! External Secrets Operator's Password generator. Every configuration runs `--runs` times, interleaved
//! in one invocation, and is reported as median and spread. Numbers only; `--check` asserts
//! correctness (all Ready, one status write per directory, zero writes while idle and across a
//! restart), never time.

mod cluster;
mod eso;
mod floor;
mod operator;
mod report;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use envtest::ControlPlane;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams};
use scim_token_operator::api::ScimDirectory;

pub(crate) use cluster::{
    create_directories, http_get, peak_rss_kib, poll, start_operator, wait_all_ready, wait_leader,
};

/// `cargo xtask bench`; see BENCHMARKS.md.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Issuance time, memory, CPU, writes and rotation latency of the operator next to an honest floor and (--peer eso) External Secrets Operator; every configuration --runs times, interleaved (BENCHMARKS.md)",
    after_help = "XTASK_OPERATOR_BIN=PATH: run that prebuilt scim-token-operator instead of building one"
)]
pub struct Options {
    /// Directories per run
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Concurrency of the benchmark's own client (creates, and the floor's writes)
    #[arg(long, default_value_t = 16)]
    pub client_concurrency: usize,
    /// Seconds the operator is left idle after its first run, its writes counted
    #[arg(long = "idle-secs", value_name = "S", default_value = "60", value_parser = crate::secs)]
    pub idle: Duration,
    /// Rotations, one at a time, for the rotation latency (first run)
    #[arg(long, default_value_t = 300)]
    pub rotations: usize,
    /// How many times the operator is restarted after its first run (each restart's writes and peak
    /// RSS measured): a restart re-lists and re-reconciles everything, so its peak has a spread too
    #[arg(long, default_value_t = 1)]
    pub restarts: usize,
    /// How many times each configuration runs (interleaved), for a median and a spread
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also run External Secrets Operator's Password generator (hack/eso.sh builds it)
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    /// Run only these configurations; all when not given
    #[arg(long, value_delimiter = ',', value_parser = ["operator", "floor", "eso", "eso-matched"])]
    pub only: Vec<String>,
    /// Build the operator with --release
    #[arg(long)]
    pub release: bool,
    /// Assert correctness (all Ready, one status write per directory, zero writes while idle and
    /// across a restart) and fail otherwise; never time
    #[arg(long)]
    pub check: bool,
    /// Extra flags for the operator (e.g. `-- --concurrency 32`)
    #[arg(last = true, value_name = "OPERATOR FLAGS")]
    pub operator_args: Vec<String>,
}

/// The peer a user would pick instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// External Secrets Operator's Password generator
    Eso,
}

impl Options {
    pub fn validate(self) -> anyhow::Result<Self> {
        ensure!(self.n > 0 && self.rotations <= self.n, "--rotations must not exceed --n");
        ensure!(self.runs > 0, "--runs must be at least 1");
        ensure!(self.restarts > 0, "--restarts must be at least 1");
        Ok(self)
    }

    /// The floor has as many requests in flight as the operator's run at most: the benchmark's
    /// concurrent creates plus the operator's concurrent reconciles (`--concurrency`, 16 by default).
    pub(crate) fn floor_concurrency(&self) -> usize {
        let operator = self
            .operator_args
            .iter()
            .position(|a| a == "--concurrency")
            .and_then(|i| self.operator_args.get(i + 1)?.parse().ok())
            .or_else(|| self.operator_args.iter().find_map(|a| a.strip_prefix("--concurrency=")?.parse().ok()))
            .unwrap_or(16);
        self.client_concurrency + operator
    }
}

/// One thing being measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Config {
    Operator,
    Floor,
    Eso(eso::Settings),
}

impl Config {
    fn slug(self) -> &'static str {
        match self {
            Config::Operator => "operator",
            Config::Floor => "floor",
            Config::Eso(eso::Settings::Defaults) => "eso",
            Config::Eso(eso::Settings::Matched) => "eso-matched",
        }
    }
}

/// One run of one configuration.
#[derive(Debug, Default)]
pub(crate) struct Sample {
    /// First create until a watch has seen all N Ready.
    pub issuance: Duration,
    /// Peak RSS of the controller process, and its RSS before the first create (KiB).
    pub peak_rss_kib: Option<u64>,
    pub start_rss_kib: Option<u64>,
    /// The controller's RSS once issuance has settled, as anonymous and file-backed KiB: the binary's
    /// pages count against the memory goal too, and no heap change moves them.
    pub end_rss_split_kib: Option<(u64, u64)>,
    /// Writes the API server served from the first create until 5 s after all Ready, by resource;
    /// the benchmark's own N creates included.
    pub writes: BTreeMap<String, f64>,
    /// CPU seconds used while issuing (first create until all Ready) by the controller, kube-apiserver
    /// and etcd: on two shared cores, what a configuration costs the API server shows here.
    pub cpu_secs: [Option<f64>; 3],
}

/// Steady state, measured once per controller (first run).
#[derive(Debug, Default)]
pub(crate) struct Steady {
    pub idle: BTreeMap<String, f64>,
    /// Writes across every restart, summed.
    pub restart: BTreeMap<String, f64>,
    /// Peak RSS of each restarted process.
    pub restart_peak_rss_kib: Vec<u64>,
}

/// Long enough for ESO's defaults (client QPS 50, one reconcile at a time) to finish.
pub(crate) fn ready_timeout(n: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(500) * n as u32
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let root = envtest::workspace_root();
    let bin = crate::build_operator(&root, o.release)?;
    println!("==> starting the control plane");
    let cp = ControlPlane::start().await?;
    let client = cp.client().await;
    let peer = if o.peer == Some(Peer::Eso) { Some(eso::Eso::prepare(&root, &cp)?) } else { None };
    let mut configs = vec![Config::Operator, Config::Floor];
    if peer.is_some() {
        configs.extend([Config::Eso(eso::Settings::Defaults), Config::Eso(eso::Settings::Matched)]);
    }
    if !o.only.is_empty() {
        configs.retain(|c| o.only.iter().any(|s| s == c.slug()));
        ensure!(!configs.is_empty(), "--only {}: no such configuration", o.only.join(","));
    }

    let mut samples: BTreeMap<Config, Vec<Sample>> = BTreeMap::new();
    let mut steady: BTreeMap<Config, Steady> = BTreeMap::new();
    let mut latencies = vec![];
    for round in 0..o.runs {
        // Interleaved, and each round starts with a different configuration: neither a warm-up nor a
        // store grown by earlier runs favours one of them.
        let mut order = configs.clone();
        order.rotate_left(round % configs.len());
        for config in order {
            let ns = format!("{}-{}", config.slug(), round + 1);
            println!("==> run {}/{}: {} (namespace {ns}, N = {})", round + 1, o.runs, config.slug(), o.n);
            let out = cp.kubectl().args(["create", "namespace", &ns]).output()?;
            ensure!(out.status.success(), "creating namespace {ns}: {}", String::from_utf8_lossy(&out.stderr));
            let first = round == 0;
            let log = cp.tmp_dir().join(format!("{ns}.log"));
            let sample = match config {
                Config::Operator => {
                    let rotations = if first { o.rotations } else { 0 };
                    let (sample, st, lat) = operator::run(&cp, &bin, &ns, &log, &o, first, rotations).await?;
                    latencies.extend(lat);
                    if let Some(st) = st {
                        steady.insert(config, st);
                    }
                    sample
                }
                Config::Floor => floor_sample(&cp, &client, &ns, &o).await?,
                Config::Eso(settings) => {
                    let eso = peer.as_ref().expect("ESO configurations only run with the peer");
                    let (sample, st) = eso.run(&cp, settings, &ns, &log, &o, first).await?;
                    if let Some(st) = st {
                        steady.insert(config, st);
                    }
                    sample
                }
            };
            println!(
                "    all Ready in {:.1} s{}{}",
                sample.issuance.as_secs_f64(),
                sample.peak_rss_kib.map(|k| format!(", peak RSS {:.1} MiB", k as f64 / 1024.0)).unwrap_or_default(),
                sample.cpu_secs[1].map(|s| format!(", kube-apiserver {s:.1} s CPU")).unwrap_or_default()
            );
            samples.entry(config).or_default().push(sample);
            clean_up(&client, &cp, config, &ns).await?;
        }
    }
    let apiserver_rss = cluster::apiserver_pid(&cp).map(cluster::peak_rss_kib).unwrap_or(0);

    let report = report::Report { n: o.n, runs: o.runs, idle: o.idle, samples, steady, latencies, apiserver_rss };
    report.print();
    if o.check {
        report.check()?;
    }
    Ok(())
}

async fn floor_sample(cp: &ControlPlane, client: &kube::Client, ns: &str, o: &Options) -> anyhow::Result<Sample> {
    let before = cluster::write_counts(client).await?;
    let cpu_before = cluster::cpu_snapshot(cp, None);
    let issuance = floor::run(client, ns, o.n, o.floor_concurrency()).await?;
    let cpu_secs = cpu_used(cpu_before, cluster::cpu_snapshot(cp, None));
    settle().await;
    let writes = cluster::diff(&before, &cluster::write_counts(client).await?);
    Ok(Sample { issuance, writes, cpu_secs, ..Sample::default() })
}

fn cpu_used(before: [Option<f64>; 3], after: [Option<f64>; 3]) -> [Option<f64>; 3] {
    std::array::from_fn(|i| Some(after[i]? - before[i]?))
}

/// Runs `work` and returns what it returned with the writes the API server served meanwhile.
pub(crate) async fn writes_during<T>(
    client: &kube::Client,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, BTreeMap<String, f64>)> {
    let before = cluster::write_counts(client).await?;
    let out = work.await?;
    Ok((out, cluster::diff(&before, &cluster::write_counts(client).await?)))
}

/// Times a mass issuance (the benchmark's creates alongside a watch until all N are Ready), then
/// counts its writes once in-flight work has settled. `pid` is the controller's process.
pub(crate) async fn measure_issuance(
    cp: &ControlPlane,
    client: &kube::Client,
    pid: u32,
    create: impl std::future::Future<Output = anyhow::Result<()>>,
    ready: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Sample> {
    let start_rss = cluster::rss_kib(pid);
    let ((issuance, cpu_secs), writes) = writes_during(client, async {
        let started = std::time::Instant::now();
        let cpu_before = cluster::cpu_snapshot(cp, Some(pid));
        let (created, ready) = tokio::join!(create, ready);
        created.context("creating the objects")?;
        ready.context("waiting for all Ready")?;
        let issuance = started.elapsed();
        let cpu_secs = cpu_used(cpu_before, cluster::cpu_snapshot(cp, Some(pid)));
        settle().await;
        Ok((issuance, cpu_secs))
    })
    .await?;
    Ok(Sample {
        issuance,
        peak_rss_kib: Some(cluster::peak_rss_kib(pid)),
        start_rss_kib: Some(start_rss),
        end_rss_split_kib: Some(cluster::rss_split_kib(pid)),
        writes,
        cpu_secs,
    })
}

/// Lets in-flight work (Event series, trailing reconciles) finish before counting.
pub(crate) async fn settle() {
    tokio::time::sleep(Duration::from_secs(5)).await;
}

/// Deletes what a run created, so that later runs (and ESO's cluster-wide watches) start from the
/// same store size. The controller is stopped by then. Deleting 10,000 objects can outlast the API
/// server's request timeout: asked again until nothing is left, and a failure only warns.
async fn clean_up(client: &kube::Client, cp: &ControlPlane, config: Config, ns: &str) -> anyhow::Result<()> {
    match config {
        Config::Operator | Config::Floor => {
            delete_all(&Api::<ScimDirectory>::namespaced(client.clone(), ns)).await;
        }
        Config::Eso(_) => {
            let out = cp
                .kubectl()
                .args(["delete", "externalsecrets,passwords", "--all", "-n", ns, "--wait=false"])
                .output()?;
            if !out.status.success() {
                println!("    warning: cleaning up {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
    delete_all(&Api::<Secret>::namespaced(client.clone(), ns)).await;
    Ok(())
}

async fn delete_all<K>(api: &Api<K>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for _ in 0..10 {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(left) if left.items.is_empty() => return,
            Ok(_) => {}
            Err(e) => println!("    warning: listing what is left to delete: {e}"),
        }
        if let Err(e) = api.delete_collection(&DeleteParams::default(), &ListParams::default()).await {
            println!("    warning: deleting (will ask again): {e}");
        }
    }
}
