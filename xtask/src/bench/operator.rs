//! The operator's runs: mass issuance, then (first run only) silence while idle and across a restart,
//! and rotation latency.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use envtest::ControlPlane;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use scim_token_operator::api::ScimDirectory;
use serde_json::json;

use super::cluster::{self, create_directories, directory_name, start_operator, wait_all_ready, wait_leader};
use super::{Options, Sample, Steady, measure_issuance, ready_timeout, writes_during};

const RECONCILED_METRIC: &str = "scim_token_operator_reconcile_duration_seconds_count";

pub(crate) async fn run(
    cp: &ControlPlane,
    bin: &Path,
    ns: &str,
    log: &Path,
    o: &Options,
    steady: bool,
    rotations: usize,
) -> anyhow::Result<(Sample, Option<Steady>, Vec<Duration>)> {
    let client = cp.client().await;
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), ns);
    let mut operator = start_operator(cp, bin, ns, log, &o.operator_args)?;
    wait_leader(&operator.1).await?;
    let sample = measure_issuance(
        cp,
        &client,
        operator.0.id(),
        create_directories(&dirs, o.n, o.client_concurrency),
        wait_all_ready(&dirs, o.n, ready_timeout(o.n)),
    )
    .await?;

    let mut quiet = None;
    if steady {
        println!("    idle for {:?}", o.idle);
        let ((), idle) = writes_during(&client, async {
            tokio::time::sleep(o.idle).await;
            Ok(())
        })
        .await?;
        let mut restart = std::collections::BTreeMap::new();
        let mut restart_peak_rss_kib = vec![];
        for i in 1..=o.restarts {
            let ((), writes) = writes_during(&client, async {
                crate::terminate(&mut operator.0);
                operator = start_operator(cp, bin, ns, log, &o.operator_args)?;
                wait_leader(&operator.1).await?;
                cluster::wait_reconciled(operator.1, RECONCILED_METRIC, o.n).await.context("the restarted operator")?;
                tokio::time::sleep(o.idle.min(Duration::from_secs(30))).await;
                Ok(())
            })
            .await?;
            let peak = cluster::peak_rss_kib(operator.0.id());
            println!(
                "    restart {i}/{}: peak RSS {:.1} MiB, {} writes",
                o.restarts,
                peak as f64 / 1024.0,
                super::report::total(&writes)
            );
            for (resource, count) in writes {
                *restart.entry(resource).or_insert(0.0) += count;
            }
            restart_peak_rss_kib.push(peak);
        }
        quiet = Some(Steady { idle, restart, restart_peak_rss_kib });
    }

    let latencies = rotation_latencies(&client, ns, rotations).await?;
    crate::terminate(&mut operator.0);
    Ok((sample, quiet, latencies))
}

/// Patch `rotationGeneration`, then time until a watch sees that directory's Secret with a new token.
async fn rotation_latencies(client: &kube::Client, ns: &str, count: usize) -> anyhow::Result<Vec<Duration>> {
    if count == 0 {
        return Ok(vec![]);
    }
    println!("    {count} rotations, one at a time");
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
        let name = directory_name(i);
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
