//! The benchmark's table: every configuration as median and spread over its runs.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;

use super::eso::Settings;
use super::{Config, Sample, Steady};

pub(crate) struct Report {
    pub n: usize,
    pub runs: usize,
    pub idle: Duration,
    pub samples: BTreeMap<Config, Vec<Sample>>,
    pub steady: BTreeMap<Config, Steady>,
    pub latencies: Vec<Duration>,
    pub apiserver_rss: u64,
}

/// Median and range of some values, printed as `median [min–max]`.
fn spread(mut v: Vec<f64>, unit: &str, precision: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    if v.len() == 1 {
        return format!("{median:.precision$}{unit}");
    }
    format!("{median:.precision$}{unit} [{:.precision$}–{:.precision$}]", v[0], v[v.len() - 1])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn label(c: Config) -> &'static str {
    match c {
        Config::Operator => "operator",
        Config::Floor => "floor",
        Config::Eso(Settings::Defaults) => "ESO, its defaults",
        Config::Eso(Settings::Matched) => "ESO, concurrency matched",
    }
}

/// The status subresource each configuration writes.
fn status_key(c: Config) -> &'static str {
    match c {
        Config::Operator | Config::Floor => "scimdirectories/status",
        Config::Eso(_) => "externalsecrets/status",
    }
}

pub(crate) fn total(m: &BTreeMap<String, f64>) -> f64 {
    // `+ 0.0`: an empty float sum is -0.0, which prints as "-0".
    m.values().sum::<f64>() + 0.0
}

impl Report {
    fn column(&self, f: impl Fn(Config, &[Sample]) -> String) -> String {
        self.samples.iter().map(|(c, s)| format!(" {} |", f(*c, s))).collect()
    }

    fn steady_column(&self, f: impl Fn(&Steady) -> String) -> String {
        self.samples
            .keys()
            .map(|c| format!(" {} |", self.steady.get(c).map(&f).unwrap_or_else(|| "–".into())))
            .collect()
    }

    pub(crate) fn print(&self) {
        let n = self.n as f64;
        let mib = |k: u64| k as f64 / 1024.0;
        let floor: Vec<f64> = self
            .samples
            .get(&Config::Floor)
            .map(|s| s.iter().map(|s| s.issuance.as_secs_f64()).collect())
            .unwrap_or_default();
        println!("\nN = {}, {} run(s) of each configuration, interleaved; median [min–max]\n", self.n, self.runs);
        println!("| measure |{}", self.samples.keys().map(|c| format!(" {} |", label(*c))).collect::<String>());
        println!("| --- |{}", " --- |".repeat(self.samples.len()));
        println!(
            "| first create → all Ready |{}",
            self.column(|_, s| spread(s.iter().map(|s| s.issuance.as_secs_f64()).collect(), " s", 1))
        );
        println!(
            "| directories per second |{}",
            self.column(|_, s| spread(s.iter().map(|s| n / s.issuance.as_secs_f64()).collect(), "/s", 0))
        );
        // Paired within a run: the floor of the same run, on the same store and the same machine load.
        println!(
            "| × the floor (paired by run) |{}",
            self.column(|_, s| {
                spread(s.iter().zip(&floor).map(|(s, f)| s.issuance.as_secs_f64() / f).collect(), "", 2)
            })
        );
        println!(
            "| peak RSS |{}",
            self.column(|_, s| spread(s.iter().filter_map(|s| s.peak_rss_kib.map(mib)).collect(), " MiB", 1))
        );
        let end_rss = |part: fn((u64, u64)) -> u64| {
            self.column(move |_, s| {
                spread(s.iter().filter_map(|s| Some(mib(part(s.end_rss_split_kib?)))).collect(), " MiB", 1)
            })
        };
        println!("| RSS after issuance: anonymous (heap, stacks) |{}", end_rss(|(anon, _)| anon));
        println!("| RSS after issuance: file-backed (the binary) |{}", end_rss(|(_, file)| file));
        println!(
            "| RSS growth per directory (peak − before the first create) / N |{}",
            self.column(|_, s| {
                spread(
                    s.iter()
                        .filter_map(|s| Some((s.peak_rss_kib? as f64 - s.start_rss_kib? as f64) * 1024.0 / n / 1024.0))
                        .collect(),
                    " KiB",
                    1,
                )
            })
        );
        for (i, who) in ["the controller", "kube-apiserver", "etcd"].iter().enumerate() {
            println!(
                "| CPU seconds while issuing, per 1000 directories: {who} |{}",
                self.column(|_, s| spread(
                    s.iter().filter_map(|s| Some(s.cpu_secs[i]? * 1000.0 / n)).collect(),
                    " s",
                    2
                ))
            );
        }
        println!(
            "| writes per directory while issuing (the benchmark's create included) |{}",
            self.column(|_, s| spread(s.iter().map(|s| total(&s.writes) / n).collect(), "", 2))
        );
        println!(
            "| of which status writes |{}",
            self.column(|c, s| {
                spread(s.iter().map(|s| s.writes.get(status_key(c)).copied().unwrap_or(0.0) / n).collect(), "", 2)
            })
        );
        println!("| writes while idle ({:?}) |{}", self.idle, self.steady_column(|s| format!("{}", total(&s.idle))));
        println!(
            "| writes across a restart (all restarts) |{}",
            self.steady_column(|s| format!("{}", total(&s.restart)))
        );
        println!(
            "| peak RSS of the restarted process |{}",
            self.steady_column(|s| spread(s.restart_peak_rss_kib.iter().copied().map(mib).collect(), " MiB", 1))
        );
        println!("\nWrites while issuing, by resource, per directory (first run):");
        for (c, s) in &self.samples {
            let detail: Vec<String> = s[0].writes.iter().map(|(k, v)| format!("{k} {:.2}", v / n)).collect();
            println!("  {}: {}", label(*c), detail.join(", "));
        }
        for (c, s) in &self.steady {
            if total(&s.idle) + total(&s.restart) != 0.0 {
                println!("  {} while idle: {:?}; across a restart: {:?}", label(*c), s.idle, s.restart);
            }
        }
        if !self.latencies.is_empty() {
            let mut l = self.latencies.clone();
            l.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "\nRotation latency (operator; patch → a watch sees the new token), {} rotations: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                l.len(),
                ms(percentile(&l, 0.5)),
                ms(percentile(&l, 0.9)),
                ms(percentile(&l, 0.99)),
                ms(percentile(&l, 1.0)),
            );
        }
        println!("kube-apiserver peak RSS (context): {:.1} MiB", mib(self.apiserver_rss));
    }

    /// Correctness only: one status write per directory, silence while idle and across a restart.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        for (c, samples) in &self.samples {
            if matches!(c, Config::Eso(_)) {
                continue; // the peer is measured, not judged
            }
            for s in samples {
                let status = s.writes.get(status_key(*c)).copied().unwrap_or(0.0);
                ensure!(
                    status == self.n as f64,
                    "{}: {status} status writes for {} directories (one each expected): {:?}",
                    label(*c),
                    self.n,
                    s.writes
                );
            }
        }
        let quiet = self.steady.get(&Config::Operator).expect("the operator's first run measures its steady state");
        ensure!(total(&quiet.idle) == 0.0, "writes while idle: {:?}", quiet.idle);
        ensure!(total(&quiet.restart) == 0.0, "writes across a restart: {:?}", quiet.restart);
        println!(
            "bench check: all {} Ready, one status write per directory, zero writes while idle and across a restart",
            self.n
        );
        Ok(())
    }
}
