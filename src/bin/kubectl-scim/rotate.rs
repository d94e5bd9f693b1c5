//! `kubectl scim rotate NAME [--wait]` and `kubectl scim end-overlap NAME [--wait]`: GitOps-safe
//! imperative requests (a merge patch of one annotation to a new value), optionally followed with a
//! watch until the operator has acted on them.

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use scim_token_operator::api::{END_OVERLAP_ANNOTATION, ROTATE_ANNOTATION, ScimDirectory};

use crate::cluster::Cluster;
use crate::human::{at, human_duration, sanitize};
use crate::status::explain;

/// The field manager of our patches, as `kubectl` uses `kubectl-annotate`.
const FIELD_MANAGER: &str = "kubectl-scim";

pub async fn rotate(cluster: &Cluster, name: &str, wait: bool, timeout: Duration) -> anyhow::Result<()> {
    let what = cluster.directory_ref(name);
    let dir = cluster.directories().get(name).await.map_err(|e| cluster.fail(e, &what))?;
    let before = dir.status.as_ref().and_then(|s| s.token_hash.clone());
    let taken: Vec<&str> =
        [dir.rotation_request(), dir.status.as_ref().and_then(|s| s.last_rotation_request.as_deref())]
            .into_iter()
            .flatten()
            .collect();
    let value = request_value(Timestamp::now(), &taken);
    annotate(cluster, name, ROTATE_ANNOTATION, &value).await?;
    eprintln!("scimdirectory/{name}: rotation requested ({ROTATE_ANNOTATION}={value})");
    if !wait {
        println!("scimdirectory/{name} rotation requested");
        return Ok(());
    }
    let done = |d: &ScimDirectory| {
        let status = d.status.as_ref();
        status.and_then(|s| s.last_rotation_request.as_deref()) == Some(value.as_str())
            && status.and_then(|s| s.token_hash.as_ref()).is_some_and(|h| Some(h) != before.as_ref())
    };
    let dir = follow(cluster, name, timeout, "to issue the new token", done).await?;
    let status = dir.status.unwrap_or_default();
    let now = Timestamp::now();
    let expires = status.token_expires_at.map_or_else(|| "never".to_owned(), |t| at(t.0, now));
    eprintln!("scimdirectory/{name}: new token issued; expires {expires}");
    match status.previous_token_valid_until {
        Some(until) => eprintln!(
            "the previous token stays valid until {} (rotationOverlap): give the identity provider the new one \
             (kubectl scim token {name}) before then",
            at(until.0, now)
        ),
        None => eprintln!(
            "the previous token is no longer valid: give the identity provider the new one (kubectl scim token {name})"
        ),
    }
    // The hash alone on stdout, for scripts: NEW=$(kubectl scim rotate acme --wait).
    println!("{}", sanitize(&status.token_hash.unwrap_or_default()));
    Ok(())
}

pub async fn end_overlap(cluster: &Cluster, name: &str, wait: bool, timeout: Duration) -> anyhow::Result<()> {
    let what = cluster.directory_ref(name);
    let dir = cluster.directories().get(name).await.map_err(|e| cluster.fail(e, &what))?;
    let now = Timestamp::now();
    let open =
        dir.status.as_ref().and_then(|s| s.previous_token_hash.as_ref().zip(s.previous_token_valid_until.as_ref()));
    match open {
        Some((_, until)) if until.0 > now => {}
        _ => {
            println!("scimdirectory/{name} has no open overlap window: nothing to end");
            return Ok(());
        }
    }
    let taken: Vec<&str> = dir.end_overlap_request().into_iter().collect();
    let value = request_value(now, &taken);
    annotate(cluster, name, END_OVERLAP_ANNOTATION, &value).await?;
    eprintln!("scimdirectory/{name}: end of the overlap requested ({END_OVERLAP_ANNOTATION}={value})");
    if !wait {
        println!("scimdirectory/{name} end of overlap requested");
        return Ok(());
    }
    let done = |d: &ScimDirectory| d.status.as_ref().is_some_and(|s| s.previous_token_hash.is_none());
    follow(cluster, name, timeout, "to end the overlap", done).await?;
    println!("scimdirectory/{name}: the previous token is no longer accepted");
    Ok(())
}

/// A request value no earlier request of this directory used: `kubectl-scim-<RFC 3339 with nanoseconds>`.
pub fn request_value(now: Timestamp, taken: &[&str]) -> String {
    let base = format!("kubectl-scim-{now}");
    let mut value = base.clone();
    let mut n = 1;
    while taken.contains(&value.as_str()) {
        value = format!("{base}-{n}");
        n += 1;
    }
    value
}

/// Sets one annotation with a JSON merge patch: nothing else of the object is sent, so neither a GitOps
/// tool's fields nor the spec are touched (the same request as `kubectl annotate --overwrite`).
async fn annotate(cluster: &Cluster, name: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let patch = serde_json::json!({ "metadata": { "annotations": { key: value } } });
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
    cluster
        .directories()
        .patch(name, &params, &Patch::Merge(&patch))
        .await
        .map_err(|e| cluster.fail(e, &cluster.directory_ref(name)))?;
    Ok(())
}

/// Watches the directory until `done` holds, or fails after `timeout` saying what the directory shows.
async fn follow(
    cluster: &Cluster,
    name: &str,
    timeout: Duration,
    goal: &str,
    done: impl Fn(&ScimDirectory) -> bool,
) -> anyhow::Result<ScimDirectory> {
    let what = cluster.directory_ref(name);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(cluster.directories(), config).applied_objects();
    futures::pin_mut!(stream);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<ScimDirectory> = None;
    loop {
        match tokio::time::timeout_at(deadline, stream.try_next()).await {
            Ok(Ok(Some(dir))) if done(&dir) => return Ok(dir),
            Ok(Ok(Some(dir))) => last = Some(dir),
            Ok(Ok(None)) => anyhow::bail!("the watch of {what} ended"),
            Ok(Err(e)) => return Err(cluster.fail_watch(e, &what)),
            Err(_) => {
                let now = Timestamp::now();
                let state = last
                    .as_ref()
                    .and_then(|d| explain(d, now))
                    .unwrap_or_else(|| "is scim-token-operator running and watching this namespace?".to_owned());
                anyhow::bail!(
                    "timed out after {} waiting for the operator {goal} for {what}; {}",
                    human_duration(timeout.as_secs() as i64),
                    state.trim_end_matches('.')
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_values_are_new() {
        let now: Timestamp = "2026-01-01T00:00:00.123456789Z".parse().unwrap();
        assert_eq!(request_value(now, &[]), "kubectl-scim-2026-01-01T00:00:00.123456789Z");
        let taken = ["kubectl-scim-2026-01-01T00:00:00.123456789Z", "kubectl-scim-2026-01-01T00:00:00.123456789Z-1"];
        assert_eq!(request_value(now, &taken), "kubectl-scim-2026-01-01T00:00:00.123456789Z-2");
    }
}
