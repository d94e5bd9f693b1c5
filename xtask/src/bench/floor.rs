//! The honest floor: a plain client doing, per directory, exactly the writes the job needs and nothing
//! else, with as many requests in flight as the operator's run (the benchmark's creates plus the
//! operator's reconciles): create the directory, create its Secret (the operator's
//! own objects: token, issue record, labels, owner reference), apply its status (hash, times, Ready).
//! Timed like the operator, from the first create until a watch has seen every directory Ready.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use scim_token_operator::api::{ReadyReason, ScimDirectory};
use scim_token_operator::policy::{self, Desired, IssueReason};
use scim_token_operator::token::Token;
use scim_token_operator::{secret, status};
use serde_json::json;

use super::cluster::{create, new_directory, retrying, wait_all_ready};

/// The floor seals its records as the operator does (an HMAC per Secret: the same work).
static FLOOR_KEY: std::sync::LazyLock<secret::RecordKey> = std::sync::LazyLock::new(secret::RecordKey::generate);

pub(crate) async fn run(client: &kube::Client, ns: &str, n: usize, concurrency: usize) -> anyhow::Result<Duration> {
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    let writes = stream::iter(0..n)
        .map(|i| {
            let (dirs, secrets) = (dirs.clone(), secrets.clone());
            async move { issue_one(&dirs, &secrets, i).await }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>();
    let (writes, ready) = tokio::join!(writes, wait_all_ready(&dirs, n, super::ready_timeout(n)));
    writes?;
    ready?;
    Ok(started.elapsed())
}

async fn issue_one(dirs: &Api<ScimDirectory>, secrets: &Api<Secret>, i: usize) -> anyhow::Result<()> {
    let dir = create(dirs, &new_directory(i)).await?;
    let desired = Desired::parse(
        dir.spec.rotation_generation,
        dir.spec.token_expires_in.as_deref(),
        dir.spec.renew_before.as_deref(),
        dir.rotation_request(),
    )
    .map_err(anyhow::Error::msg)?;
    let now = Timestamp::now();
    let token = Token::generate();
    let record = policy::new_record(&desired, token.hash(), IssueReason::Initial, now);
    create(secrets, &secret::initial_secret(&dir, &token, &record, &FLOOR_KEY)).await?;
    let ready = status::condition(&dir, ReadyReason::TokenIssued, IssueReason::Initial.describe(), now);
    let patch = json!({
        "apiVersion": ScimDirectory::api_version(&()),
        "kind": ScimDirectory::kind(&()),
        "status": status::with(&dir, Some(&record), ready),
    });
    let (name, params, patch) = (dir.name_any(), PatchParams::apply("bench-floor").force(), Patch::Apply(patch));
    retrying(|| dirs.patch_status(&name, &params, &patch)).await?;
    Ok(())
}
