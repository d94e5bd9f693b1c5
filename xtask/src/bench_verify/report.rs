//! The benchmark's report: markdown tables of what was measured, and the goals read against
//! them (the numbers in BENCHMARKS.md are copied from here).

use std::time::Duration;

use super::http::{NginxRuns, Sweep};
use super::load::{Comparison, LIGHT, Run, ms};
use super::memory::{Memory, Probe, mib};
use super::rotation::Rotations;
use super::slow::SlowClients;

pub(super) struct Tools {
    /// The HTTP load generator and the gRPC one.
    pub http_load: String,
    pub grpc_load: String,
    pub nginx: String,
    pub connections: usize,
    pub grpc_connections: usize,
    pub load: Duration,
}

pub(super) struct Report<'a> {
    pub n: usize,
    pub tools: Tools,
    pub issuance: Duration,
    pub sync: Duration,
    pub empty: Memory,
    pub synced: Memory,
    pub after_http: Memory,
    pub loaded: Memory,
    pub rotated: Memory,
    pub sweep: Sweep,
    pub grpc_sweep: Sweep,
    pub http: Comparison,
    /// `verify-load` on the HTTP floor and verifier at peak, next to oha's numbers (measure mode).
    pub calibration: Option<(Run, Run)>,
    pub nginx: NginxRuns,
    pub grpc: Comparison,
    pub rotations: Rotations,
    pub probes: Vec<Probe>,
    pub slow: &'a SlowClients,
    /// The machine's load average (1 min) before and after the load runs: other work shares the cores.
    pub loadavg: (String, String),
}

pub(super) fn loadavg() -> String {
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

fn row(what: &str, r: &Run, status: u16) {
    println!("| {what} | {:.0} | {} | {} × {status} |", r.rps, r.show_latency(), r.responses);
}

fn goal(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

impl Report<'_> {
    pub fn print(&self) {
        let t = &self.tools;
        println!(
            "\nLoad: HTTP {}, {} connections; gRPC {}, {} requests in flight on {} HTTP/2 connections; {} s per run, \
             all on loopback; nginx {} (one worker).",
            t.http_load,
            t.connections,
            t.grpc_load,
            t.connections,
            t.grpc_connections,
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
        for (protocol, sweep, allowed) in [
            ("HTTP", &self.sweep, "200 naming their directory"),
            ("gRPC", &self.grpc_sweep, "OK naming their directory"),
        ] {
            println!(
                "| correctness, {protocol}: one by one | {} valid tokens → {allowed}, {} unknown → 401 |",
                sweep.allowed, sweep.refused
            );
        }
        println!("| verifier RSS now (peak): nothing to index | {} |", self.empty.show());
        println!("| verifier RSS now (peak): {} indexed | {} |", self.n, self.synced.show());
        println!("| verifier RSS now (peak): after the HTTP load runs | {} |", self.after_http.show());
        println!("| verifier RSS now (peak): after the gRPC load runs too | {} |", self.loaded.show());
        println!("| verifier RSS now (peak): after the rotations | {} |", self.rotated.show());

        println!("\n| load run | requests/s | p50 / p99 | answers |\n| --- | --- | --- | --- |");
        self.comparison("HTTP", "axum", &self.http);
        if let Some((floor, verifier)) = &self.calibration {
            row("HTTP floor, peak, with verify-load (the gRPC generator; oha above)", floor, 200);
            row("HTTP verifier, peak, with verify-load", verifier, 200);
        }
        self.comparison("gRPC", "tonic", &self.grpc);
        let n = &self.nginx;
        row("nginx → floor, no auth, peak", &n.plain_peak, 200);
        row("nginx auth_request → verifier, then → floor, peak", &n.auth_peak, 200);
        row("nginx auth_request, unknown token, peak", &n.auth_unknown, 401);
        row(&format!("nginx no auth at {:.0}/s", n.half), &n.plain_half, 200);
        row(&format!("nginx auth_request at {:.0}/s (half its peak)", n.half), &n.auth_half, 200);

        let r = &self.rotations;
        let line = |what: &str, s: &[Duration]| {
            println!("| {what} | {} / {} | {} |", ms(pct(s, 0.5)), ms(pct(s, 0.99)), ms(pct(s, 1.0)));
        };
        println!("\n| rotation ({} of them) | p50 / p99 | max |\n| --- | --- | --- |", r.new_from_secret.len());
        line("new token in the Secret → its first 200", &r.new_from_secret);
        line("new hash in the status → new token's first 200", &r.new_from_status);
        line("new token in the Secret → old token's first 401", &r.old_from_secret);
        line("gRPC: new token in the Secret → its first OK", &r.grpc_new_from_secret);
        line("gRPC: new token in the Secret → old token's first denial (401)", &r.grpc_old_from_secret);
        line("rotation requested → old token's first 401 (operator + verifier)", &r.old_from_patch);

        let s = self.slow;
        let after = |what: &str, v: &[Duration]| {
            println!("| {what} | {} / {} ({} requests) |", ms(pct(v, 0.5)), ms(pct(v, 0.99)), v.len());
        };
        println!(
            "\n| {} slow clients (a request head trickled a byte a second), header read timeout {} s | |\n| --- | --- |",
            s.clients,
            s.header_timeout.as_secs()
        );
        after("valid token, one keep-alive client, before them: p50 / p99", &s.before);
        after("the same beside them: p50 / p99", &s.beside);
        println!("| verifier RSS now (peak) with them open | {} |", s.memory.show());
        let closed = if s.closed.is_empty() {
            "none".to_owned()
        } else {
            format!(
                "after {:.1} / {:.1} / {:.1} s (first / median / last, from the connect)",
                s.closed[0].as_secs_f64(),
                pct(&s.closed, 0.5).as_secs_f64(),
                s.closed[s.closed.len() - 1].as_secs_f64()
            )
        };
        println!(
            "| closed by the verifier within {} s of the timeout | {} of {}: {closed} |",
            super::slow::GRACE.as_secs(),
            s.closed.len(),
            s.clients
        );

        println!(
            "\n| memory probe: deserialized, initial list | RSS with the index complete (peak) | time to index |\n| --- | --- | --- |"
        );
        for p in &self.probes {
            println!("| {} ScimDirectory, {} | {} | {} ms |", p.kind, p.list, p.memory.show(), p.millis);
        }
        self.goals();
    }

    /// The rows of one protocol's comparison with its floor.
    fn comparison(&self, protocol: &str, stack: &str, c: &Comparison) {
        row(&format!("{protocol} floor ({stack}, no work), peak (median run)"), &c.floor_peak, 200);
        row(&format!("{protocol} verifier, valid token, peak (median run)"), &c.verifier_peak, 200);
        row(&format!("{protocol} verifier, unknown token, peak"), &c.verifier_unknown, 401);
        row(&format!("{protocol} verifier at {:.0}/s (half its peak)", c.half), &c.verifier_half, 200);
        row(&format!("{protocol} floor at {:.0}/s", c.half), &c.floor_half, 200);
        row(&format!("{protocol} verifier at {LIGHT:.0}/s (light load)"), &c.verifier_light, 200);
        row(&format!("{protocol} floor at {LIGHT:.0}/s"), &c.floor_light, 200);
    }

    fn goals(&self) {
        let r = &self.rotations;
        let visible = [&r.new_from_secret, &r.old_from_secret, &r.grpc_new_from_secret, &r.grpc_old_from_secret]
            .into_iter()
            .map(|s| pct(s, 0.99))
            .max()
            .unwrap_or_default();
        println!("\n| goal | measured | |\n| --- | --- | --- |");
        for (protocol, c) in [("HTTP", &self.http), ("gRPC", &self.grpc)] {
            let rounds: Vec<String> = c.ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "| {protocol}: throughput ≥ 0.8 × the floor | {:.2} × (medians; per round {}) | {} |",
                c.ratio(),
                rounds.join(", "),
                goal(c.ratio() >= 0.8)
            );
            println!(
                "| {protocol}: p99 ≤ 1 ms at half of peak | {} at {:.0}/s (floor: {}) | {} |",
                ms(c.verifier_half.p99),
                c.half,
                ms(c.floor_half.p99),
                goal(c.verifier_half.p99 <= Duration::from_millis(1))
            );
            println!(
                "| {protocol}: p99 at half of peak ≤ 2 × the floor's at that rate | {} vs {} ({:.2} ×) | {} |",
                ms(c.verifier_half.p99),
                ms(c.floor_half.p99),
                c.verifier_half.p99.as_secs_f64() / c.floor_half.p99.as_secs_f64(),
                goal(c.verifier_half.p99 <= 2 * c.floor_half.p99)
            );
            println!(
                "| {protocol}: unknown token's peak ≥ {} × the valid token's (asserted by --check) | {:.0} vs {:.0}/s ({:.2} ×) | {} |",
                super::REFUSAL_RATIO,
                c.verifier_unknown.rps,
                c.verifier_peak.rps,
                c.refusal_ratio(),
                goal(c.refusal_ratio() >= super::REFUSAL_RATIO)
            );
        }
        println!(
            "| RSS ≤ 16 MiB with {} indexed | {:.1} MiB now, {:.1} MiB peak | {} |",
            self.n,
            mib(self.loaded.rss_kib),
            mib(self.rotated.peak_kib),
            goal(self.rotated.peak_kib <= 16 * 1024)
        );
        println!(
            "| rotation visible ≤ 1 s at p99 | {} (p99, Secret → new 200/OK or old 401, HTTP and gRPC) | {} |",
            ms(visible),
            goal(visible <= Duration::from_secs(1))
        );
        // Signed: on a noisy machine the route with auth can come out faster at a low rate.
        let n = &self.nginx;
        let added = format!("{:+.2} ms", (n.auth_half.p50.as_secs_f64() - n.plain_half.p50.as_secs_f64()) * 1000.0);
        println!(
            "| (context) nginx auth_request adds | {added} at p50 at {:.0}/s; throughput {:.2} × no auth | |",
            n.half,
            n.auth_peak.rps / n.plain_peak.rps
        );
    }
}
