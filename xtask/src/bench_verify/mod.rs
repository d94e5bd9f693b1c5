//! `cargo xtask bench-verify`: the verifier (`scim-token-operator verify`) measured on a real control
//! plane with real load generators, all on loopback:
//!
//! 1. throughput and latency of `/verify` against its **floor** (`verify-floor`, the same axum and
//!    tokio answering 200 without work), at peak and at half of the verifier's peak (open loop),
//!    with oha (`hack/oha.sh`);
//! 2. the same for Envoy's gRPC authorization service (`Check`) against the gRPC floor (the same
//!    tonic server answering OK without work), with `verify-load`, a closed-loop/open-loop tonic
//!    client of our own (xtask/src/bin/verify-load.rs);
//! 3. nginx `auth_request` → verifier against the same nginx proxying without auth, to the floor as
//!    upstream (the config is the e2e test's `tests/peers/nginx.conf.template`);
//! 4. the verifier's memory with N directories indexed (issued by the operator, as `cargo xtask
//!    bench` does), next to a verifier with nothing to index;
//! 5. how soon a rotation reaches the verifier, over HTTP and gRPC: from the new token in the Secret
//!    (and the new hash in the status) to its first 200, and to the old token's first 401;
//! 6. the verifier beside `--slow-clients` connections trickling a request head they never finish
//!    (`slow.rs`): its latency for a valid token and its RSS with them open, and how many of them it
//!    closed and when (its header read timeout).
//!
//! Correctness is asserted in every mode, never time: each load run must get only the expected status
//! (200/OK for the valid token, 401 for an unknown one), before the load every one of the N tokens is
//! checked over both protocols (200/OK naming its directory) with N unknown tokens (401), and the
//! gRPC health service must report SERVING. A broken verifier fails the benchmark instead of
//! producing a good number. `--check` runs the HTTP load with `verify-load` too, so that the test
//! command needs no oha (minutes of compiling on a fresh machine).

mod grpc;
mod http;
mod load;
mod memory;
mod procs;
mod report;
mod rotation;
mod slow;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use envtest::ControlPlane;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use scim_token_operator::api::ScimDirectory;
use scim_token_operator::token::Token;

use self::load::{LoadGen, OwnLoad, Targets};
use self::memory::Memory;
use self::procs::{Floor, Guard, Verifier};
use crate::bench::{create_directories, start_operator, wait_all_ready, wait_leader};

/// `cargo xtask bench-verify`; see BENCHMARKS.md.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "The verifier's HTTP endpoint under oha (hack/oha.sh), behind nginx auth_request, and its gRPC service under verify-load, each against its floor (BENCHMARKS.md)",
    after_help = "XTASK_OPERATOR_BIN=PATH: run that prebuilt scim-token-operator instead of building one"
)]
pub struct Options {
    /// Directories issued, all indexed by the verifier
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Concurrency of the benchmark's own creates
    #[arg(long, default_value_t = 16)]
    pub client_concurrency: usize,
    /// Seconds of each load run
    #[arg(long = "load-secs", value_name = "S", default_value = "20", value_parser = crate::secs)]
    pub load: Duration,
    /// Requests in flight: HTTP connections the load generator keeps open, gRPC requests in flight
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// HTTP/2 connections the gRPC requests share (as Envoy on two cores: one per worker thread)
    #[arg(long, default_value_t = 2)]
    pub grpc_connections: usize,
    /// Alternating floor/verifier peak runs (the median of each is reported): a shared machine's load
    /// drifts, and whichever ran first would otherwise pay for it
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Rotations timed until the verifier follows them
    #[arg(long, default_value_t = 100)]
    pub rotations: usize,
    /// Build the operator and the helpers with --release
    #[arg(long)]
    pub release: bool,
    /// Connections trickling a request head they never finish, beside which the verifier is measured
    #[arg(long, default_value_t = 300)]
    pub slow_clients: usize,
    /// The verifier's --header-read-timeout, in seconds [default: 10, the verifier's own; 2 with --check]
    #[arg(long = "header-read-timeout", value_name = "S", value_parser = crate::secs)]
    pub header_read_timeout: Option<Duration>,
    /// Print the correctness verdict (asserted in every mode) as the check line of the test command;
    /// the HTTP load runs use `verify-load` instead of oha
    #[arg(long)]
    pub check: bool,
}

impl Options {
    pub fn validate(self) -> anyhow::Result<Self> {
        ensure!(self.n > 0 && self.rotations <= self.n, "--rotations must not exceed --n");
        ensure!(self.header_read_timeout.is_none_or(|t| !t.is_zero()), "--header-read-timeout must be positive");
        ensure!(
            self.load >= Duration::from_secs(1) && self.connections > 0 && self.grpc_connections > 0 && self.rounds > 0,
            "--load-secs, --connections, --grpc-connections and --rounds must be positive"
        );
        Ok(self)
    }
}

const NS: &str = "bench";

/// `--check`: an unknown token's peak throughput over the valid token's, in the same run, at least
/// this (each protocol).
const REFUSAL_RATIO: f64 = 0.5;

pub async fn run(o: Options) -> anyhow::Result<()> {
    let root = envtest::workspace_root();
    let bin = crate::build_operator(&root, o.release)?;
    let helpers = procs::build_helpers(&root, o.release)?;
    let own = |protocol, concurrency, connections| OwnLoad {
        bin: helpers.load.clone(),
        protocol,
        duration: o.load,
        concurrency,
        connections,
    };
    // HTTP: oha for the published numbers (a well-known generator with an open loop); in `--check`
    // (the test command) verify-load, which is built with the workspace anyway.
    let (http_load, http_load_name): (Box<dyn LoadGen>, String) = if o.check {
        (Box::new(own("http", o.connections, o.connections)), "verify-load".into())
    } else {
        let oha = procs::locate(&root, "hack/oha.sh", &[])?;
        let name = procs::version(Command::new(&oha).arg("--version"))?;
        (Box::new(http::Oha { bin: oha, duration: o.load, connections: o.connections }), name)
    };
    let grpc_load = own("grpc", o.connections, o.grpc_connections);
    let nginx = procs::locate(&root, "hack/test-peers.sh", &["--nginx"])?;
    let tools = report::Tools {
        http_load: http_load_name,
        grpc_load: "verify-load".into(),
        nginx: procs::version(Command::new(&nginx).arg("-v"))?,
        connections: o.connections,
        grpc_connections: o.grpc_connections,
        load: o.load,
    };
    println!("==> HTTP load {}, gRPC load {}, {}", tools.http_load, tools.grpc_load, tools.nginx);

    println!("==> starting the control plane");
    let cp = ControlPlane::start().await?;
    let client = cp.client().await;
    cp.kubectl().args(["create", "namespace", NS]).output()?;
    let tmp = cp.tmp_dir().to_path_buf();
    // Short in --check, so that waiting for the slow clients to be closed costs the test command
    // seconds; the verifier's default otherwise.
    let header_timeout =
        o.header_read_timeout.unwrap_or(if o.check { Duration::from_secs(2) } else { Duration::from_secs(10) });

    // The verifier's fixed cost: one watching a namespace without directories.
    let empty = {
        let verifier = Verifier::start(&cp, &bin, "bench-empty", &tmp.join("verifier-empty.log"), header_timeout)?;
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
    let verifier = Verifier::start(&cp, &bin, NS, &tmp.join("verifier.log"), header_timeout)?;
    verifier.wait_ready(o.n).await?;
    let sync = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let synced = Memory::of(verifier.pid());

    println!("==> checking all {} tokens and {} unknown ones, over HTTP and gRPC", o.n, o.n);
    grpc::check_health(verifier.grpc_port).await?;
    let sweep = http::sweep(verifier.port, &tokens).await?;
    let grpc_sweep = grpc::sweep(verifier.grpc_port, &tokens).await?;

    let floor = Floor::start(&helpers.floor).await?;
    let nginx_port = procs::free_port()?;
    let nginx = http::start_nginx(
        &root,
        &nginx,
        &tmp.join("nginx"),
        nginx_port,
        verifier.port,
        floor.http_port,
        o.connections,
    )?;
    procs::wait_port(nginx_port).await?;

    let valid = tokens.values().next().context("no tokens")?.clone();
    let unknown = Token::generate().expose().to_owned();
    let url = |scheme_path: &str, port: u16| scheme_path.replace("PORT", &port.to_string());
    let (floor_url, verifier_url) =
        (url("http://127.0.0.1:PORT/verify", floor.http_port), url("http://127.0.0.1:PORT/verify", verifier.port));
    let (floor_grpc, verifier_grpc) =
        (url("http://127.0.0.1:PORT", floor.grpc_port), url("http://127.0.0.1:PORT", verifier.grpc_port));

    let load_before = report::loadavg();
    let http_targets =
        Targets { protocol: "HTTP", floor: &floor_url, verifier: &verifier_url, valid: &valid, unknown: &unknown };
    let http_runs = load::compare(&*http_load, &http_targets, o.rounds)?;
    // How verify-load compares with oha on the same HTTP server: the instrument of the gRPC numbers.
    let calibration = if o.check {
        None
    } else {
        let own_http = own("http", o.connections, o.connections);
        let floor_run = own_http.run("HTTP floor, peak, with verify-load", &floor_url, &valid, None, 200)?;
        let verifier_run = own_http.run("HTTP verifier, peak, with verify-load", &verifier_url, &valid, None, 200)?;
        Some((floor_run, verifier_run))
    };
    let nginx_runs = http::nginx_runs(&*http_load, nginx_port, &valid, &unknown)?;
    let after_http = Memory::of(verifier.pid());
    let grpc_targets =
        Targets { protocol: "gRPC", floor: &floor_grpc, verifier: &verifier_grpc, valid: &valid, unknown: &unknown };
    let grpc_runs = load::compare(&grpc_load, &grpc_targets, o.rounds)?;
    let loaded = Memory::of(verifier.pid());
    let load_after = report::loadavg();
    drop(nginx);
    drop(floor);

    println!("==> {} slow clients trickling a request head", o.slow_clients);
    // Latency sampled as long as a load run (at most 70 % of the header read timeout beside them).
    let slow = slow::run(verifier.port, verifier.pid(), &valid, o.slow_clients, header_timeout, o.load).await?;

    println!("==> {} rotations, one at a time", o.rotations);
    let ports = rotation::Ports { http: verifier.port, grpc: verifier.grpc_port };
    let rotations = rotation::rotations(&client, ports, &mut tokens, o.rotations).await?;
    let rotated = Memory::of(verifier.pid());
    drop(verifier);
    crate::terminate(&mut operator.0.0);

    println!("==> what takes the memory: the index built by verify-memprobe, one process per variant");
    let mut probes = vec![];
    for kind in ["full", "slim"] {
        for list in ["any", "paged", "streaming"] {
            // A diagnosis, not a measure of the verifier: a variant the API server cannot serve is
            // reported and skipped.
            match memory::probe(&cp, &helpers.memprobe, kind, list, o.n).await {
                Ok(p) => probes.push(p),
                Err(e) => println!("    {kind} {list}: failed: {e:#}"),
            }
        }
    }

    let report = report::Report {
        n: o.n,
        tools,
        issuance,
        sync,
        empty,
        synced,
        after_http,
        loaded,
        rotated,
        sweep,
        grpc_sweep,
        http: http_runs,
        calibration,
        nginx: nginx_runs,
        grpc: grpc_runs,
        rotations,
        probes,
        slow: &slow,
        loadavg: (load_before, load_after),
    };
    report.print();
    // After the report, so that a verifier failing it (one that never closes them) is measured too.
    ensure!(
        !o.check || slow.closed.len() == slow.clients,
        "{} of {} slow clients were still open {} s after the header read timeout: the verifier did not close them",
        slow.clients - slow.closed.len(),
        slow.clients,
        slow::GRACE.as_secs()
    );
    // A refusal must cost about what an answer does, over both protocols: a ratio of two runs of the
    // same process, never a time. Before 50ef535 a gRPC denial waited 40 ms for a delayed ACK (Nagle's
    // algorithm: no TCP_NODELAY on the gRPC listener's connections), 1/76 of the valid token's rate.
    let refusals: Vec<(&str, f64)> =
        [("HTTP", &report.http), ("gRPC", &report.grpc)].into_iter().map(|(p, c)| (p, c.refusal_ratio())).collect();
    for (protocol, ratio) in &refusals {
        ensure!(
            !o.check || *ratio >= REFUSAL_RATIO,
            "{protocol}: an unknown token's peak is {ratio:.2} × the valid token's in the same run (at least \
             {REFUSAL_RATIO} expected): refusals stall (a missing TCP_NODELAY on the listener's connections?)"
        );
    }
    if o.check {
        println!(
            "bench-verify check: all {n} tokens 200/OK naming their directory and {n} unknown 401 one by one, over \
             HTTP and gRPC; gRPC health SERVING; every load run answered only 200 (valid) or 401 (unknown), directly, \
             through nginx and over gRPC; an unknown token's peak {h:.2} × the valid token's over HTTP, {g:.2} × over \
             gRPC (≥ {REFUSAL_RATIO}); {r} rotations reached the verifier over both protocols; all {s} slow clients \
             closed by the verifier, every request beside them 200",
            n = o.n,
            h = refusals[0].1,
            g = refusals[1].1,
            r = o.rotations,
            s = o.slow_clients
        );
    }
    Ok(())
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

pub(super) fn token_of(s: &Secret) -> Option<String> {
    let bytes = &s.data.as_ref()?.get("token")?.0;
    String::from_utf8(bytes.clone()).ok()
}
