//! `cargo xtask chaos`: crash safety under load. Two operator replicas with leader election on a real
//! control plane, N directories created and R rotations requested in waves while a seeded fault
//! schedule kills and pauses leaders, kills the standby and restarts kube-apiserver and etcd in
//! place. Then the invariants, checked from the cluster, an independent Secret watch and the API
//! server's audit log; see docs/reliability.md.
//!
//! The test command runs a small instance of the same code (`tests/chaos.rs` includes this module).

mod audit;
mod faults;
mod observer;
mod replicas;
mod scan;
mod schedule;
mod verdict;
mod workload;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use envtest::ControlPlane;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, PostParams};

use self::faults::Outcome;
pub(crate) use self::schedule::Counts;
use self::schedule::Fault;
use self::verdict::{Snapshot, TokenCounts};

/// How long a wave's requests go on after its fault is injected.
const WAVE_TAIL: Duration = Duration::from_secs(2);
/// The operator's Lease duration (`src/cli.rs`); a pause must outlast it.
const LEASE: Duration = Duration::from_secs(15);

/// `cargo xtask chaos`: crash safety under load (docs/reliability.md). The defaults are the full run;
/// `tests/chaos.rs` starts from them too.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    about = "Crash safety under load: two replicas, N directories, a seeded fault schedule, then the invariants (docs/reliability.md)"
)]
pub(crate) struct Options {
    /// The fault schedule's seed (a random one unless given; printed, so a run can be repeated)
    #[arg(long, default_value_t = random_seed(), hide_default_value = true)]
    pub(crate) seed: u64,
    /// Directories, created in waves
    #[arg(long, default_value_t = 1000)]
    pub(crate) n: usize,
    /// Rotations requested in the waves (at most two per directory)
    #[arg(long, default_value_t = 300)]
    pub(crate) rotations: usize,
    #[command(flatten)]
    pub(crate) counts: Counts,
    /// Upper bound of the kubelet-like delay before a killed replica is started again, in seconds.
    #[arg(long = "max-restart-delay", value_name = "SECS", default_value = "20", value_parser = secs_f64)]
    pub(crate) max_restart_delay: Duration,
    /// Share of each wave's creates that get a rotation right after the create, in percent (part
    /// of `rotations`).
    #[arg(skip = 5_usize)]
    pub(crate) racing_percent: usize,
    /// How long the cluster may take to converge after the last fault before the run fails. Longer
    /// than the operator's default --min-issue-interval (1m): an automatic re-issue deferred by it
    /// must still be seen.
    #[arg(skip = Duration::from_secs(300))]
    pub(crate) converge_timeout: Duration,
    /// Build the operator with --release
    #[arg(long)]
    pub(crate) release: bool,
    /// Extra flags for the operator replicas
    #[arg(last = true, value_name = "OPERATOR FLAGS")]
    pub(crate) operator_args: Vec<String>,
}

impl Default for Options {
    /// The command line's defaults.
    fn default() -> Self {
        <Options as clap::Parser>::parse_from(["chaos"])
    }
}

impl Options {
    pub(crate) fn validate(self) -> anyhow::Result<Self> {
        ensure!(self.n > 0 && self.counts.total() > 0, "need at least one directory and one fault");
        ensure!(self.rotations <= 2 * self.n, "--rotations must not exceed 2 × --n (two per directory at most)");
        Ok(self)
    }
}

/// `--max-restart-delay 2.5`: seconds, fractions allowed.
fn secs_f64(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
}

/// A seed from the clock, printed so that the run can be repeated.
pub(crate) fn random_seed() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    schedule::Rng::new(now.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64() % 1_000_000
}

/// What a run found. [`Report::violations`] lists every broken invariant.
pub(crate) struct Report {
    pub(crate) options: Options,
    pub(crate) outcomes: Vec<Outcome>,
    pub(crate) snapshot: Snapshot,
    pub(crate) converged_after: Option<Duration>,
    pub(crate) tokens: TokenCounts,
    pub(crate) requested: (u32, u32, usize),
    pub(crate) torn: Vec<String>,
    pub(crate) watch_gaps: u32,
    pub(crate) overlaps: Vec<String>,
    pub(crate) foreign_writes: Vec<String>,
    pub(crate) foreign_changed: Vec<String>,
    pub(crate) leaks: Vec<(String, usize)>,
    pub(crate) processes: usize,
    pub(crate) exits: Vec<String>,
    pub(crate) secret_writes: usize,
    pub(crate) tokens_seen: usize,
    pub(crate) wall: Duration,
    /// Where the logs and the audit log were copied.
    pub(crate) evidence: PathBuf,
}

impl Report {
    pub(crate) fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let n = self.options.n;
        let mut check = |broken: bool, what: String| {
            if broken {
                v.push(what);
            }
        };
        check(self.converged_after.is_none(), format!("not converged: {:?}", self.snapshot));
        check(self.snapshot.ready != n, format!("{} of {n} directories Ready", self.snapshot.ready));
        check(
            !self.snapshot.mismatched.is_empty(),
            format!("status hash != Secret token: {:?}", self.snapshot.mismatched),
        );
        check(!self.snapshot.unserved.is_empty(), format!("latest request not served: {:?}", self.snapshot.unserved));
        check(
            !self.snapshot.unowned.is_empty(),
            format!("token Secrets without the directory's controller reference: {:?}", self.snapshot.unowned),
        );
        check(self.tokens.double > 0 || self.tokens.same_record > 0, format!("double issues: {:?}", self.tokens));
        check(self.tokens.lost > 0, format!("lost rotations: {:?}", self.tokens));
        check(
            !self.torn.is_empty(),
            format!("Secret versions whose hash annotation is not their token's: {:?}", self.torn),
        );
        check(
            self.watch_gaps > 0,
            format!("the independent watch missed history {} times: inconclusive", self.watch_gaps),
        );
        check(!self.overlaps.is_empty(), format!("two processes wrote in overlapping intervals: {:?}", self.overlaps));
        check(!self.foreign_writes.is_empty(), format!("writes to foreign Secrets: {:?}", self.foreign_writes));
        check(!self.foreign_changed.is_empty(), format!("foreign Secrets changed: {:?}", self.foreign_changed));
        check(!self.leaks.is_empty(), format!("plaintext tokens in logs or Events: {:?}", self.leaks));
        for o in &self.outcomes {
            if matches!(o.fault, Fault::PauseLeader { .. }) {
                check(o.failover.is_none(), format!("no takeover while the leader was paused: {}", o.note));
                check(
                    o.note.contains("still ran"),
                    format!("a paused leader kept running after losing its Lease: {}", o.note),
                );
            }
        }
        v
    }

    pub(crate) fn print(&self) {
        let o = &self.options;
        let count = |f: fn(&Fault) -> bool| self.outcomes.iter().filter(|x| f(&x.fault)).count();
        let failovers: Vec<Duration> = self
            .outcomes
            .iter()
            .filter(|x| matches!(x.fault, Fault::KillLeader { .. }))
            .filter_map(|x| x.failover)
            .collect();
        let secs = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
        let (declarative, imperative, racing) = self.requested;
        println!("\n| chaos run | value |\n| --- | --- |");
        println!("| seed | {} |", o.seed);
        println!("| directories | {} |", o.n);
        println!(
            "| rotations requested | {} ({declarative} declarative, {imperative} imperative; {racing} racing the first issue) |",
            declarative + imperative
        );
        println!(
            "| faults injected | {}: {} leader SIGKILLs, {} standby SIGKILLs, {} kube-apiserver restarts, {} etcd restarts, {} leader SIGSTOP/SIGCONT |",
            self.outcomes.len(),
            count(|f| matches!(f, Fault::KillLeader { .. })),
            count(|f| matches!(f, Fault::KillStandby { .. })),
            count(|f| matches!(f, Fault::RestartApiserver { .. })),
            count(|f| matches!(f, Fault::RestartEtcd { .. })),
            count(|f| matches!(f, Fault::PauseLeader { .. })),
        );
        let mut exits = std::collections::BTreeMap::<&str, usize>::new();
        for e in &self.exits {
            *exits.entry(e.rsplit(": ").next().unwrap_or(e)).or_default() += 1;
        }
        println!("| operator processes started; exits by status | {}; {exits:?} |", self.processes);
        println!("| Ready | {} / {} |", self.snapshot.ready, o.n);
        println!("| status hash ≠ SHA-256(Secret token) | {} |", self.snapshot.mismatched.len());
        println!(
            "| double issues (tokens beyond one per request; same-record pairs) | {}; {} |",
            self.tokens.double, self.tokens.same_record
        );
        println!(
            "| lost rotations (requests without a token; latest not served) | {}; {} |",
            self.tokens.lost,
            self.snapshot.unserved.len()
        );
        println!(
            "| tokens seen by the independent watch / Secret writes in the audit log | {} / {} |",
            self.tokens_seen, self.secret_writes
        );
        println!("| torn Secret versions; watch gaps | {}; {} |", self.torn.len(), self.watch_gaps);
        println!(
            "| writes to foreign Secrets; foreign Secrets changed | {}; {} |",
            self.foreign_writes.len(),
            self.foreign_changed.len()
        );
        println!("| overlapping leaders' writes (audit log) | {} |", self.overlaps.len());
        println!("| plaintext tokens in logs and Events | {} |", self.leaks.iter().map(|(_, n)| n).sum::<usize>());
        println!("| converged after the last fault | {} |", secs(self.converged_after));
        println!(
            "| failover after a leader SIGKILL, p50 / max ({} kills) | {} / {} |",
            failovers.len(),
            secs(verdict::percentile(&failovers, 0.5)),
            secs(verdict::percentile(&failovers, 1.0))
        );
        for by_standby in [false, true] {
            let split: Vec<Duration> = self
                .outcomes
                .iter()
                .filter(|x| matches!(x.fault, Fault::KillLeader { .. }) && x.by_standby == by_standby)
                .filter_map(|x| x.failover)
                .collect();
            println!(
                "| … taken over by {}, p50 / max ({}) | {} / {} |",
                if by_standby { "the standby (Lease expiry)" } else { "the restarted replica (same identity)" },
                split.len(),
                secs(verdict::percentile(&split, 0.5)),
                secs(verdict::percentile(&split, 1.0))
            );
        }
        for x in self.outcomes.iter().filter(|x| matches!(x.fault, Fault::PauseLeader { .. })) {
            println!("| takeover during a leader pause | {} ({}) |", secs(x.failover), x.note);
        }
        println!("| wall time | {:.0} s |", self.wall.as_secs_f64());
        println!("\nlogs and audit log: {}", self.evidence.display());
    }
}

/// Runs the whole thing and returns the report (the caller decides what a violation means).
pub(crate) async fn run(o: &Options, operator_bin: &Path) -> anyhow::Result<Report> {
    let started = Instant::now();
    let steps = schedule::schedule(o.seed, o.counts, o.max_restart_delay, LEASE);
    println!("==> chaos seed {} ({} directories, {} rotations); fault schedule:", o.seed, o.n, o.rotations);
    for (i, s) in steps.iter().enumerate() {
        println!("  {:>2}. after {:.1}s: {}", i + 1, s.wait.as_secs_f64(), s.fault);
    }

    let cp: &'static ControlPlane = Box::leak(Box::new(
        ControlPlane::start_with(envtest::Options {
            audit_policy: Some(audit::POLICY.into()),
            // Secrets are watched straight from etcd, not from the API server's watch cache: a watch
            // cache starts empty after a restart and refuses to resume an older watch (410), which
            // would hide token versions from the independent watch. ScimDirectories keep the cache.
            apiserver_args: vec!["--watch-cache-sizes=secrets#0".into()],
            ..envtest::Options::default()
        })
        .await?,
    ));
    // The plane is leaked to give the replicas' supervisors a 'static reference; its processes die
    // with this process (PR_SET_PDEATHSIG), and the next control plane started on this machine
    // removes its directory. The logs are the evidence: they are copied out first.
    let mut result = run_on(o, operator_bin, cp, &steps, started).await;
    let evidence = keep_evidence(cp, o.seed);
    match (&mut result, evidence) {
        (Ok(report), Ok(dir)) => report.evidence = dir,
        (_, Ok(dir)) => eprintln!("chaos: logs and audit log kept in {}", dir.display()),
        (_, Err(e)) => eprintln!("chaos: could not keep the logs: {e:#}"),
    }
    result
}

/// Copies the logs and the audit log to `<target>/chaos/seed-<seed>-<unix time>/`.
fn keep_evidence(cp: &ControlPlane, seed: u64) -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| envtest::workspace_root().join("target"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let dir = target.join("chaos").join(format!("seed-{seed}-{now}"));
    std::fs::create_dir_all(dir.join("operators"))?;
    let mut files: Vec<PathBuf> =
        [cp.apiserver_log_path(), cp.etcd_log_path(), cp.controller_manager_log_path()].map(Path::to_path_buf).into();
    files.extend(cp.audit_log_path().map(Path::to_path_buf));
    for file in files {
        if let Some(name) = file.file_name() {
            std::fs::copy(&file, dir.join(name)).with_context(|| format!("copying {}", file.display()))?;
        }
    }
    for entry in std::fs::read_dir(cp.tmp_dir().join("operators"))?.flatten() {
        std::fs::copy(entry.path(), dir.join("operators").join(entry.file_name()))?;
    }
    Ok(dir)
}

async fn run_on(
    o: &Options,
    operator_bin: &Path,
    cp: &'static ControlPlane,
    steps: &[schedule::Step],
    started: Instant,
) -> anyhow::Result<Report> {
    let admin = {
        let mut config = cp.config().clone();
        config.read_timeout = Some(Duration::from_secs(15));
        kube::Client::try_from(config)?
    };
    let ns = cp.create_namespace("chaos").await?;
    let observed = observer::start(admin.clone(), &ns).await?;
    let foreign = create_foreign_secrets(&admin, &ns).await?;

    let logs = cp.tmp_dir().join("operators");
    std::fs::create_dir_all(&logs)?;
    let replicas = replicas::Replicas::start(replicas::Launch {
        cp,
        bin: operator_bin.to_path_buf(),
        namespace: ns.clone(),
        logs,
        extra_args: o.operator_args.clone(),
    });
    replicas.leader_and_standby(Duration::from_secs(120)).await.context("the replicas did not start")?;

    let work = Arc::new(workload::Workload::new(admin.clone(), &ns, o.n, observed.clone(), o.seed));
    let waves = steps.len();
    let mut wave_tasks = Vec::new();
    let mut outcomes = Vec::new();
    let phase = Instant::now();
    for (i, step) in steps.iter().enumerate() {
        let creates = i * o.n / waves..(i + 1) * o.n / waves;
        let racing = (creates.len() * o.racing_percent).div_ceil(100);
        // Racing rotations count towards R.
        let rotations = ((i + 1) * o.rotations / waves - i * o.rotations / waves).saturating_sub(racing);
        // The wave's requests are spread over a window that the fault falls in the middle of.
        let window = step.wait + WAVE_TAIL;
        wave_tasks.push(tokio::spawn(work.clone().wave(i as u64, creates, racing, rotations, window)));
        tokio::time::sleep(step.wait).await;
        let outcome = faults::inject(cp, &replicas, step.fault, phase).await?;
        println!("  [{:>6.1}s] {:>2}. {} — {}", outcome.at.as_secs_f64(), i + 1, step.fault, outcome.note);
        outcomes.push(outcome);
    }
    let last_fault = Instant::now();
    println!(
        "==> last fault done after {:.0}s; waiting for the workload and convergence",
        phase.elapsed().as_secs_f64()
    );
    for task in wave_tasks {
        task.await??;
    }
    let owed = work.owed();
    if owed > 0 {
        println!("    {owed} rotations had no directory to go to during the faults; requesting them now");
        work.clone().settle_owed(o.converge_timeout).await?;
    }
    let (converged_after, snapshot) =
        verdict::converge(&admin, &ns, || work.dirs.lock().expect("poisoned").clone(), &observed, o.converge_timeout)
            .await;
    let converged_after = converged_after.map(|_| last_fault.elapsed());

    // Give the watch a moment to deliver anything still in flight, then judge.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = replicas.history.lock().expect("poisoned").clone();
    let exits = replicas.exits();
    replicas.shutdown().await;

    let dirs = work.dirs.lock().expect("poisoned").clone();
    let token_secrets: BTreeSet<String> = (0..o.n).map(workload::secret_name).collect();
    let (tokens, torn, watch_gaps, tokens_seen) = {
        let observed = observed.lock().expect("poisoned");
        (
            verdict::token_counts(&dirs, &observed),
            observed.torn.clone(),
            observed.gaps,
            token_secrets.iter().filter_map(|s| observed.secrets.get(s)).map(|h| h.tokens.len()).sum(),
        )
    };
    let audit_log = cp.audit_log_path().context("the control plane has no audit log")?;
    let writes = audit::writes(audit_log, &ns)?;
    // The one Secret the operator writes besides token Secrets: its record key, created once by the
    // first replica to start (a second create is refused and never reaches the audit as a write).
    let writes = audit::without_record_key_create(writes);
    let terms = audit::terms(&writes);
    let mut leak_files: Vec<&Path> = replicas::logs(&history);
    leak_files.extend([cp.apiserver_log_path(), cp.etcd_log_path(), cp.controller_manager_log_path(), audit_log]);
    let mut leaks = scan::files(&leak_files);
    let events = Api::<Event>::namespaced(admin.clone(), &ns).list(&ListParams::default()).await?;
    let in_events = scan::tokens_in(serde_json::to_string(&events.items)?.as_bytes());
    if in_events > 0 {
        leaks.push(("Events".into(), in_events));
    }
    let requested = (
        dirs.iter().map(|d| d.declarative).sum(),
        dirs.iter().map(|d| d.imperative).sum(),
        dirs.iter().filter(|d| d.racing).count(),
    );
    Ok(Report {
        options: o.clone(),
        outcomes,
        snapshot,
        converged_after,
        requested,
        torn,
        watch_gaps,
        overlaps: audit::overlaps(&terms, &writes),
        foreign_writes: audit::foreign_secret_writes(&writes, &token_secrets),
        foreign_changed: foreign_changed(&admin, &ns, &foreign).await?,
        leaks,
        processes: history.len(),
        exits,
        secret_writes: audit::secret_writes(&writes).values().sum(),
        tokens_seen,
        tokens,
        wall: started.elapsed(),
        evidence: cp.tmp_dir().to_path_buf(),
    })
}

/// Secrets the operator must never write: some with its label (so its watch sees them) and no
/// controller reference, some without. Returns (name, resourceVersion).
async fn create_foreign_secrets(client: &kube::Client, ns: &str) -> anyhow::Result<Vec<(String, String)>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for i in 0..4 {
        let labels = if i % 2 == 0 {
            serde_json::json!({ scim_token_operator::secret::MANAGED_BY_LABEL: scim_token_operator::secret::MANAGED_BY_VALUE })
        } else {
            serde_json::json!({})
        };
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": { "name": format!("foreign-{i}"), "labels": labels },
            "stringData": { "token": format!("not-a-token-{i}") },
        }))?;
        let created = api.create(&PostParams::default(), &secret).await?;
        out.push((format!("foreign-{i}"), created.metadata.resource_version.unwrap_or_default()));
    }
    Ok(out)
}

async fn foreign_changed(client: &kube::Client, ns: &str, foreign: &[(String, String)]) -> anyhow::Result<Vec<String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut changed = Vec::new();
    for (name, rv) in foreign {
        let now = api.get_opt(name).await?.and_then(|s| s.metadata.resource_version);
        if now.as_ref() != Some(rv) {
            changed.push(format!("{name}: resourceVersion {rv} -> {now:?}"));
        }
    }
    Ok(changed)
}
