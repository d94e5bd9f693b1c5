//! What takes the verifier's memory: `cargo xtask bench-verify` runs this once per variant, each in a
//! fresh process, against the benchmark's N directories. It does what `scim-token-operator verify`
//! does to build its index (the same runtime, a kube watcher's initial list, an index of the same
//! shape: token digest → directory, and directory → its digests) with one thing changed at a time,
//! and prints the process's peak and current RSS once the index is complete. Self-contained on
//! purpose (a model of the index, not `verify::index::Index`), so that it measures the same thing
//! whatever type the verifier's index takes:
//!
//! - what is deserialized: `full` (the whole `ScimDirectory`, as the verifier does) or `slim` (only
//!   the name, namespace, resourceVersion and the four status fields the index reads; every other
//!   field, managedFields included, is skipped while parsing: the verifier's own `WatchedDirectory`);
//! - how the initial list is fetched: `any` (`watcher::Config::any_semantic()`, the verifier's
//!   choice: resourceVersion=0, served from the API server's cache), `paged` (the default: pages
//!   of 500) or `streaming` (`streaming_lists()`: the list arrives as watch events, one object each).
//!
//! usage: KUBECONFIG=... verify-memprobe full|slim any|paged|streaming NAMESPACE
//! prints: `peak_kib=<VmHWM> rss_kib=<VmRSS> directories=<n> millis=<time to the complete index>`

use std::collections::HashMap;
use std::sync::Arc;

use scim_token_operator::verify::directory::WatchedDirectory;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::watcher;
use scim_token_operator::api::ScimDirectory;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, list, ns] = args.as_slice() else {
        bail!("usage: verify-memprobe full|slim any|paged|streaming NAMESPACE");
    };
    let config = match list.as_str() {
        "any" => watcher::Config::default().any_semantic(),
        "paged" => watcher::Config::default(),
        "streaming" => watcher::Config::default().streaming_lists(),
        other => bail!("unknown list mode {other}"),
    };
    let client = kube::Client::try_default().await?;
    let started = Instant::now();
    let index = match kind.as_str() {
        "full" => build(Api::<ScimDirectory>::namespaced(client, ns), config, full_entry).await?,
        "slim" => build(Api::<WatchedDirectory>::namespaced(client, ns), config, slim_entry).await?,
        other => bail!("unknown kind {other}"),
    };
    let millis = started.elapsed().as_millis();
    let (peak, rss) = (status_kib("VmHWM:")?, status_kib("VmRSS:")?);
    println!("peak_kib={peak} rss_kib={rss} directories={} millis={millis}", index.by_directory.len());
    Ok(())
}

/// A directory: namespace and name.
type Id = Arc<(String, String)>;

/// The verifier's index, in shape: token digest → directory, directory → its digests.
#[derive(Default)]
struct Index {
    by_hash: HashMap<[u8; 32], Vec<(Id, Option<Time>)>>,
    by_directory: HashMap<Id, Vec<[u8; 32]>>,
}

/// What the index takes of one directory: its namespace and name, its current and previous token hash
/// with their ends of validity.
type Entry = ((String, String), [(Option<String>, Option<Time>); 2]);

impl Index {
    fn apply(&mut self, ((ns, name), hashes): Entry) {
        let id = Arc::new((ns, name));
        let mut digests = Vec::with_capacity(2);
        for (hash, until) in hashes {
            let Some(digest) = hash.as_deref().and_then(|h| hex_digest(h.strip_prefix("sha256:")?)) else { continue };
            self.by_hash.entry(digest).or_default().push((id.clone(), until));
            digests.push(digest);
        }
        if !digests.is_empty() {
            self.by_directory.insert(id, digests);
        }
    }
}

fn hex_digest(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn full_entry(d: ScimDirectory) -> Entry {
    let s = d.status.unwrap_or_default();
    let id = (d.metadata.namespace.unwrap_or_default(), d.metadata.name.unwrap_or_default());
    (id, [(s.token_hash, s.token_expires_at), (s.previous_token_hash, s.previous_token_valid_until)])
}

fn slim_entry(d: WatchedDirectory) -> Entry {
    let s = d.status.unwrap_or_default();
    let id = (d.metadata.namespace.unwrap_or_default(), d.metadata.name.unwrap_or_default());
    (id, [(s.token_hash, s.token_expires_at), (s.previous_token_hash, s.previous_token_valid_until)])
}

/// The verifier's initial list, into an index: returns at `InitDone`, with the index still alive.
/// (The verifier also indexes the list on the side and swaps it in whole at `InitDone`.)
async fn build<K>(api: Api<K>, config: watcher::Config, entry: impl Fn(K) -> Entry) -> anyhow::Result<Index>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut index = Index::default();
    let mut events = std::pin::pin!(watcher(api, config));
    while let Some(event) = events.try_next().await? {
        match event {
            watcher::Event::Init => index = Index::default(),
            watcher::Event::InitApply(d) => index.apply(entry(d)),
            watcher::Event::InitDone => return Ok(index),
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
        }
    }
    bail!("the watch ended before its initial list")
}

fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}
