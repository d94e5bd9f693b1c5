//! The verifier's memory: RSS and peak of a process, and `verify-memprobe`, which shows what takes
//! it (the index built from the same watcher's initial list, one fresh process per variant).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, ensure};
use envtest::ControlPlane;

use super::NS;
use crate::bench::peak_rss_kib;

/// Memory of a process: resident now and at its peak.
#[derive(Clone, Copy, Default)]
pub(super) struct Memory {
    pub rss_kib: u64,
    pub peak_kib: u64,
    /// Of `rss_kib`: anonymous memory (heap, stacks) and file-backed pages (the binary's code).
    pub anon_kib: u64,
    pub file_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Memory {
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

    pub fn show(&self) -> String {
        let split = if self.anon_kib + self.file_kib > 0 {
            format!("; now {:.1} anon + {:.1} file", mib(self.anon_kib), mib(self.file_kib))
        } else {
            String::new()
        };
        format!("{:.1} MiB ({:.1} MiB){split}", mib(self.rss_kib), mib(self.peak_kib))
    }
}

pub(super) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One memory probe (`verify-memprobe KIND LIST`): peak and current RSS with the index complete.
pub(super) struct Probe {
    pub kind: &'static str,
    pub list: &'static str,
    pub memory: Memory,
    pub millis: u64,
}

pub(super) async fn probe(
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
