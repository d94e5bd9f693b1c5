//! Load runs and what they measure: one run's throughput and latency ([`Run`]), the generators that
//! produce them (oha for the HTTP endpoint, in `http.rs`; `verify-load` for gRPC and for the HTTP
//! endpoint in `--check`), and the comparison of the verifier with its floor that both protocols go
//! through ([`compare`]). Every run asserts that every answer had the expected status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;

/// The light-load rate (requests/s), for latency without the machine's CPU in the way.
pub(super) const LIGHT: f64 = 1000.0;

/// One load run: its throughput, latency and answers.
#[derive(Clone, Default)]
pub(super) struct Run {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub responses: u64,
}

impl Run {
    pub fn show_latency(&self) -> String {
        format!("{} / {}", ms(self.p50), ms(self.p99))
    }

    fn print(&self, what: &str, rate: Option<f64>, want: u16) {
        let rate = rate.map(|r| format!(" (offered {r:.0}/s)")).unwrap_or_default();
        println!(
            "    {what}{rate}: {:.0} req/s, p50/p99 {}, {} answers all {want}",
            self.rps,
            self.show_latency(),
            self.responses
        );
    }
}

pub(super) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The run with the median throughput.
pub(super) fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs.swap_remove(runs.len() / 2)
}

/// The correctness check of every load run: answers, and all of them `want`. Returns their number.
pub(super) fn only(what: &str, statuses: &BTreeMap<String, u64>, want: u16) -> anyhow::Result<u64> {
    let responses: u64 = statuses.values().sum();
    ensure!(
        responses > 0 && statuses.keys().all(|s| *s == want.to_string()),
        "{what}: expected only {want}, got {statuses:?}"
    );
    Ok(responses)
}

/// A load generator: runs against `target` (a URL) with `token` for the configured time, closed loop
/// or open loop at `rate` requests/s, and fails unless every answer was `want`.
pub(super) trait LoadGen {
    fn run(&self, what: &str, target: &str, token: &str, rate: Option<f64>, want: u16) -> anyhow::Result<Run>;
}

/// `verify-load` (xtask/src/bin/verify-load.rs), built with the operator's profile.
pub(super) struct OwnLoad {
    pub bin: PathBuf,
    /// `grpc` or `http`.
    pub protocol: &'static str,
    pub duration: Duration,
    /// Requests in flight (HTTP: connections, one request in flight on each).
    pub concurrency: usize,
    /// gRPC: HTTP/2 connections the requests share.
    pub connections: usize,
}

impl LoadGen for OwnLoad {
    fn run(&self, what: &str, target: &str, token: &str, rate: Option<f64>, want: u16) -> anyhow::Result<Run> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([self.protocol, target, "--token", token])
            .args(["--secs", &self.duration.as_secs().to_string()])
            .args(["--concurrency", &self.concurrency.to_string()])
            .args(["--connections", &self.connections.to_string()]);
        if let Some(rate) = rate {
            cmd.args(["--rate", &rate.to_string()]);
        }
        let out = cmd.stderr(Stdio::inherit()).output().context("running verify-load")?;
        ensure!(out.status.success(), "verify-load failed on {what}");
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("verify-load's JSON for {what}"))?;
        let statuses: BTreeMap<String, u64> = serde_json::from_value(v["statuses"].clone())?;
        let errors: BTreeMap<String, u64> = serde_json::from_value(v["errors"].clone())?;
        let responses = only(what, &statuses, want)?;
        // In-flight requests are awaited at the end, so there is no error to excuse.
        ensure!(errors.is_empty(), "{what}: errors {errors:?}");
        let seconds = |key: &str| -> anyhow::Result<Duration> {
            Ok(Duration::from_secs_f64(v[key].as_f64().with_context(|| format!("no {key} in verify-load's JSON"))?))
        };
        let run = Run {
            rps: responses as f64 / v["seconds"].as_f64().context("no seconds")?,
            p50: seconds("p50")?,
            p99: seconds("p99")?,
            responses,
        };
        run.print(what, rate, want);
        Ok(run)
    }
}

/// Prints one run of an external generator (oha) the same way.
pub(super) fn printed(run: Run, what: &str, rate: Option<f64>, want: u16) -> Run {
    run.print(what, rate, want);
    run
}

/// The verifier against its floor with one protocol and one generator.
pub(super) struct Comparison {
    pub floor_peak: Run,
    pub verifier_peak: Run,
    pub verifier_unknown: Run,
    /// Half of the verifier's peak (requests/s), the rate of the two runs below.
    pub half: f64,
    pub verifier_half: Run,
    pub floor_half: Run,
    pub verifier_light: Run,
    pub floor_light: Run,
    /// Verifier / floor peak throughput, per round.
    pub ratios: Vec<f64>,
}

impl Comparison {
    /// Of the median runs.
    pub fn ratio(&self) -> f64 {
        self.verifier_peak.rps / self.floor_peak.rps
    }

    /// The unknown token's peak over the valid token's (the median run).
    pub fn refusal_ratio(&self) -> f64 {
        self.verifier_unknown.rps / self.verifier_peak.rps
    }
}

/// The targets of one comparison (URLs) and the tokens sent.
pub(super) struct Targets<'a> {
    pub protocol: &'a str,
    pub floor: &'a str,
    pub verifier: &'a str,
    pub valid: &'a str,
    pub unknown: &'a str,
}

/// Peak: floor and verifier alternated for `rounds` (a shared machine's load drifts, and whichever
/// ran first would pay for it), the median of each kept; an unknown token at peak; then open loop at
/// half the verifier's peak and at [`LIGHT`], verifier and floor at the same rate.
pub(super) fn compare(load: &dyn LoadGen, t: &Targets, rounds: usize) -> anyhow::Result<Comparison> {
    let p = t.protocol;
    let (mut floor_peaks, mut verifier_peaks) = (vec![], vec![]);
    for round in 1..=rounds {
        floor_peaks.push(load.run(&format!("{p} floor, peak (round {round})"), t.floor, t.valid, None, 200)?);
        let what = format!("{p} verifier, valid token, peak (round {round})");
        verifier_peaks.push(load.run(&what, t.verifier, t.valid, None, 200)?);
    }
    let ratios = floor_peaks.iter().zip(&verifier_peaks).map(|(f, v)| v.rps / f.rps).collect();
    let (floor_peak, verifier_peak) = (median(floor_peaks), median(verifier_peaks));
    let verifier_unknown = load.run(&format!("{p} verifier, unknown token, peak"), t.verifier, t.unknown, None, 401)?;
    let half = (verifier_peak.rps / 2.0).round().max(1.0);
    let what = format!("{p} verifier, valid token, half of its peak");
    let verifier_half = load.run(&what, t.verifier, t.valid, Some(half), 200)?;
    let floor_half = load.run(&format!("{p} floor, the same rate"), t.floor, t.valid, Some(half), 200)?;
    let what = format!("{p} verifier, valid token, light load");
    let verifier_light = load.run(&what, t.verifier, t.valid, Some(LIGHT), 200)?;
    let floor_light = load.run(&format!("{p} floor, light load"), t.floor, t.valid, Some(LIGHT), 200)?;
    Ok(Comparison {
        floor_peak,
        verifier_peak,
        verifier_unknown,
        half,
        verifier_half,
        floor_half,
        verifier_light,
        floor_light,
        ratios,
    })
}
