//! The controller's writes (the Secret, the status, Events) and its reads past the cache.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::{Context, Error, FIELD_MANAGER, Result};
use crate::api::{ReadyReason, ScimDirectory, ScimDirectoryStatus};
use crate::events::EventType;
use crate::policy::IssueRecord;
use crate::secret::{self, ObservedSecret, SecretView};
use crate::status;
use crate::token::Token;

/// Re-applies the Secret's labels and annotations around the token it already holds. One of two places
/// the operator reads a stored plaintext (the other: the push to the identity provider, which also
/// writes it back unchanged with the push's record), here only to write it back unchanged: server-side apply of
/// the complete Secret would otherwise drop the key. The write is guarded by the resourceVersion the
/// decision was made on, and the token must still be the one the record names.
pub(super) async fn restore_metadata(
    ctx: &Context,
    dir: &ScimDirectory,
    secrets: &Api<Secret>,
    current: &SecretView,
    record: &IssueRecord,
    now: Timestamp,
) -> Result<()> {
    let mut full = secrets.get(&dir.secret_name()).await?;
    let token = secret::take_stored_token(&mut full)
        .filter(|t| t.hash() == record.token_hash)
        .ok_or(Error::TokenChangedDuringRestore)?;
    let manifest = secret::desired_secret(dir, &token, record, &ctx.record_key);
    match apply_secret(ctx, secrets, manifest, current.resource_version.clone()).await {
        Ok(()) => Ok(()),
        Err(error) => Err(report_write_failure(ctx, dir, error, &token, now).await),
    }
}

/// A Secret write the API server refused for good (422: invalid, e.g. an immutable Secret or a
/// template label value it rejects; 403: RBAC or an admission policy) needs a human: it is put in the
/// status as `Ready=False, reason=SecretWriteFailed` with the API server's message and a Warning Event,
/// and retried with backoff. Anything else (a 409, a timeout) is an ordinary retry.
pub(super) async fn report_write_failure(
    ctx: &Context,
    dir: &ScimDirectory,
    error: Error,
    token: &Token,
    now: Timestamp,
) -> Error {
    // The API server does not echo data values today, but neither the status, an Event nor the log
    // that `error_policy` writes may ever be how a token leaks, whatever the status code.
    let error = scrub(error, token);
    let Error::Kube(kube::Error::Api(status)) = &error else { return error };
    if !matches!(status.code, 403 | 422) {
        return error;
    }
    let reason = &status.message;
    let message = format!("the API server refused to write Secret {}: {reason}", dir.secret_name());
    let status = status::with(dir, None, status::condition(dir, ReadyReason::SecretWriteFailed, &message, now));
    match write_status(ctx, dir, status).await {
        Ok(true) => publish(ctx, dir, EventType::Warning, ReadyReason::SecretWriteFailed.as_str(), &message).await,
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not report the failed Secret write in the status"),
    }
    Error::SecretWriteRefused(message)
}

/// The error of a request that carried `token`, with the token (plaintext or base64) removed from
/// every message the API server sent back.
pub(super) fn scrub(error: Error, token: &Token) -> Error {
    match error {
        Error::Kube(kube::Error::Api(mut status)) => {
            status.message = token.redact_from(&status.message);
            status.reason = token.redact_from(&status.reason);
            if let Some(details) = status.details.as_mut() {
                for cause in &mut details.causes {
                    cause.message = token.redact_from(&cause.message);
                    cause.field = token.redact_from(&cause.field);
                }
            }
            Error::Kube(kube::Error::Api(status))
        }
        other => other,
    }
}

/// Reads the directory's Secret from the API server, past the cache: metadata first (a foreign
/// Secret's data is none of our business), then, for one of ours, its token hash.
pub(super) async fn look_up(ctx: &Context, dir: &ScimDirectory, secrets: &Api<Secret>) -> Result<Option<SecretView>> {
    let name = dir.secret_name();
    Ok(match secrets.get_metadata_opt(&name).await? {
        None => None,
        Some(found) if secret::is_controlled_by(dir, &found.metadata) => {
            let observed: Api<ObservedSecret> =
                Api::namespaced(ctx.client.clone(), &dir.namespace().unwrap_or_default());
            observed.get_opt(&name).await?.as_ref().map(SecretView::from)
        }
        Some(found) => {
            Some(SecretView::from(&ObservedSecret { metadata: found.metadata, ..ObservedSecret::default() }))
        }
    })
}

/// Fails with [`Error::StaleDirectory`] if the API server holds a newer version of `dir` than the cache.
/// A list by name, not a get: the operator's RBAC grants list and watch on directories, not get, and a
/// list without a resourceVersion is as fresh a read as a get.
pub(super) async fn current_directory(ctx: &Context, dir: &ScimDirectory) -> Result<()> {
    let api: Api<ScimDirectory> = Api::namespaced(ctx.client.clone(), &dir.namespace().unwrap_or_default());
    let by_name = kube::api::ListParams::default().fields(&format!("metadata.name={}", dir.name_any()));
    match api.list(&by_name).await?.items.into_iter().next() {
        Some(current) if current.metadata.resource_version != dir.metadata.resource_version => {
            Err(Error::StaleDirectory(Box::new(current)))
        }
        // Deleted meanwhile: the Secret goes with it (garbage collection); a write would 404 or 409.
        _ => Ok(()),
    }
}

pub(super) fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }
}

/// Server-side applies our complete Secret, guarded by the resourceVersion we decided on: a concurrent
/// change (or a stale cache) makes the write fail with 409 instead of acting on outdated facts, which is
/// what keeps one request from rotating twice.
pub(super) async fn apply_secret(
    ctx: &Context,
    api: &Api<Secret>,
    mut manifest: Secret,
    resource_version: Option<String>,
) -> Result<()> {
    manifest.metadata.resource_version = resource_version;
    let mut value = serde_json::to_value(&manifest).expect("a Secret serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    let name = manifest.metadata.name.clone().unwrap_or_default();
    ctx.fence.check()?;
    let written = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(value)).await?;
    ctx.secrets.expect_echo(&written.metadata);
    Ok(())
}

/// Writes the status if it differs from the current one. Returns whether it wrote. Guarded by the
/// resourceVersion the decision was made on: a status decided on a stale directory fails with 409.
pub(super) async fn write_status(ctx: &Context, dir: &ScimDirectory, status: ScimDirectoryStatus) -> Result<bool> {
    if dir.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<ScimDirectory> = Api::namespaced(ctx.client.clone(), &dir.namespace().unwrap_or_default());
    let mut patch = json!({
        "apiVersion": ScimDirectory::api_version(&()),
        "kind": ScimDirectory::kind(&()),
        "status": status,
    });
    if let Some(version) = &dir.metadata.resource_version {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    ctx.fence.check()?;
    let written =
        api.patch_status(&dir.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch)).await?;
    if let Some(replaced) = dir.metadata.resource_version.clone()
        && written.metadata.resource_version.as_ref() != Some(&replaced)
    {
        ctx.unechoed_status.lock().expect("poisoned").insert(ObjectRef::from(dir), replaced);
    }
    Ok(true)
}

pub(super) async fn publish(ctx: &Context, dir: &ScimDirectory, type_: EventType, reason: &str, note: &str) {
    if let Err(e) = ctx.fence.check() {
        warn!(error = %e, reason, "Event not published: no longer the leader");
        return;
    }
    if let Err(e) = ctx.events.publish(dir, type_, reason, note).await {
        warn!(error = %e, "failed to publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_of_token_writes_are_scrubbed_whatever_their_code() {
        let token = Token::generate();
        let b64 = serde_json::to_string(&k8s_openapi::ByteString(token.expose().as_bytes().to_vec())).unwrap();
        for code in [400, 403, 409, 422, 500] {
            let mut status =
                kube::core::Status::failure(&format!("bad {} / {b64}", token.expose()), "Invalid").with_code(code);
            status.details = Some(
                serde_json::from_value(json!({ "causes": [{
                    "reason": "FieldValueInvalid",
                    "message": format!("Invalid value: {b64}"),
                    "field": "data.token",
                }] }))
                .unwrap(),
            );
            let scrubbed = scrub(Error::Kube(kube::Error::Api(Box::new(status))), &token);
            let shown = format!("{scrubbed} {scrubbed:?}");
            assert!(!shown.contains(token.expose()) && !shown.contains(b64.trim_matches('"')), "{code}: {shown}");
        }
    }
}
