//! One reconcile of one directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::{debug, info, warn};

use super::writes::{
    apply_secret, current_directory, look_up, post_params, publish, report_write_failure, restore_metadata,
    write_status,
};
use super::{Context, Error, FAILPOINT_EXIT_CODE, Result};
use crate::api::{END_OVERLAP_ANNOTATION, ReadyReason, ScimDirectory};
use crate::events::EventType;
use crate::metrics::ReasonLabels;
use crate::policy::{self, Decision, Desired, IssueReason, IssueRecord, SecretState};
use crate::secret::{self, SecretView};
use crate::status;
use crate::token::Token;

pub async fn reconcile(dir: Arc<ScimDirectory>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let mut dir = ctx.fresh(dir).await;
    let mut rounds = 0;
    let result = loop {
        match reconcile_inner(&dir, &ctx).await {
            Err(Error::StaleDirectory(current)) if rounds < 2 => {
                rounds += 1;
                dir = Arc::new(*current);
            }
            other => break other,
        }
    };
    ctx.metrics.observe_reconcile(started.elapsed());
    if result.is_ok() {
        ctx.failures.lock().expect("poisoned").remove(&ObjectRef::from(dir.as_ref()));
    }
    result
}

async fn reconcile_inner(dir: &ScimDirectory, ctx: &Context) -> Result<Action> {
    let ns = dir.namespace().ok_or(Error::NotNamespaced)?;
    let name = dir.name_any();
    let secret_name = dir.secret_name();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut synced = ctx.secrets_synced.clone();
    tokio::time::timeout(Duration::from_secs(60), synced.wait_for(|s| *s))
        .await
        .map_err(|_| Error::CacheNotReady)?
        .map_err(|_| Error::CacheNotReady)?;

    let desired = Desired::parse(
        dir.spec.rotation_generation,
        dir.spec.token_expires_in.as_deref(),
        dir.spec.renew_before.as_deref(),
        dir.rotation_request(),
    )
    .and_then(|d| d.with_overlap(dir.spec.rotation_overlap.as_deref(), dir.end_overlap_request()));
    let status_view = status::view(dir);
    let mut observed: Option<Arc<SecretView>> = ctx.secrets.get(&ns, &secret_name);
    // The cache holds only Secrets that carry our label and a directory's controller reference, so a
    // miss proves nothing: a token is generated once the API server confirms there is no Secret. One
    // exception saves a new directory a round trip: the first token of a directory that has no status
    // yet. Its create is the check, refused without writing anything if any Secret has the name (then
    // the Secret is looked up and the decision made again), and a refused create is the only request
    // that carries a token that never becomes valid: once per directory, since the status written
    // after it (a conflict, say) sends every later attempt through the look-up first. Any other issue
    // replaces a token the status records, and a Secret whose label was stripped must be repaired, not
    // deferred or replaced: confirmed first.
    let mut confirmed = observed.is_some();
    let mut create_refused = false;

    // A few rounds at most: after a cache miss turned out to be a Secret the cache cannot see (one
    // whose labels were stripped, or a foreign one), and after a create lost a race with another writer.
    for _ in 0..4 {
        let now = Timestamp::now();
        let state = secret::observe(dir, observed.as_deref(), &ctx.record_key);
        let decision = policy::decide(desired.as_ref().map_err(String::as_str), &status_view, &state, now);
        let first_token =
            matches!(decision, Decision::Issue(IssueReason::Initial)) && dir.status.is_none() && !create_refused;
        if matches!(decision, Decision::Issue(_)) && !confirmed && !first_token {
            // Confirmed before anything is throttled or generated: the Secret may well be there (its
            // label stripped, or someone else's), and then nothing is to be issued at all.
            confirmed = true;
            observed = look_up(ctx, dir, &secrets).await?.map(Arc::new);
            if observed.is_some() {
                // A Secret read afresh may record an issue for a newer spec than the cached directory
                // shows: deciding on both would issue a token for a spec that no longer exists.
                current_directory(ctx, dir).await?;
            }
            continue;
        }
        let decision = policy::throttle(decision, &status_view, &state, now, ctx.min_issue_interval);
        debug!(namespace = %ns, name = %name, ?decision, "decided");
        match decision {
            Decision::InvalidSpec(message) => {
                let status = status::with(dir, None, status::condition(dir, ReadyReason::InvalidSpec, &message, now));
                if write_status(ctx, dir, status).await? {
                    publish(ctx, dir, EventType::Warning, ReadyReason::InvalidSpec.as_str(), &message).await;
                }
                return Ok(Action::await_change());
            }
            Decision::Conflict => {
                // Who controls the Secret is not said: the reader of this status may not be allowed to know.
                let message = format!(
                    "Secret {secret_name} exists and is not managed by this ScimDirectory; it is left untouched. Delete it or choose another spec.secretName"
                );
                // Fail closed: the token fields leave the status, so the verifier stops accepting a
                // token the operator can no longer rotate or revoke (the Secret is no longer its own).
                let status =
                    status::without_token(dir, status::condition(dir, ReadyReason::SecretConflict, &message, now));
                if write_status(ctx, dir, status).await? {
                    publish(ctx, dir, EventType::Warning, ReadyReason::SecretConflict.as_str(), &message).await;
                }
                return Err(Error::SecretConflict(secret_name));
            }
            Decision::Deferred { reason, last_issued_at, until } => {
                ctx.metrics.issues_deferred.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
                let message = format!(
                    "a new token ({}) is deferred until {until}: the last one was issued at {last_issued_at}, \
                     less than the minimum interval between automatic issues ago. If this repeats, something \
                     else is rewriting Secret {secret_name}",
                    reason.as_str()
                );
                let status = status::with(dir, None, status::condition(dir, ReadyReason::IssueDeferred, &message, now));
                if write_status(ctx, dir, status).await? {
                    publish(ctx, dir, EventType::Warning, ReadyReason::IssueDeferred.as_str(), &message).await;
                }
                warn!(namespace = %ns, name = %name, reason = reason.as_str(), %until, "automatic issue deferred");
                return Ok(Action::requeue(duration_until(until, now)));
            }
            Decision::Issue(reason) => {
                let desired = desired.as_ref().expect("an Issue decision implies a valid spec");
                let token = Token::generate();
                let record = policy::IssueRecord {
                    previous: policy::overlap(desired, reason, &state, now),
                    ..policy::new_record(desired, token.hash(), reason, now)
                };
                let manifest = secret::desired_secret(dir, &token, &record, &ctx.record_key);
                let written = match &state {
                    SecretState::Missing => {
                        ctx.fence.check()?;
                        match secrets
                            .create(&post_params(), &secret::initial_secret(dir, &token, &record, &ctx.record_key))
                            .await
                        {
                            // The template goes on with server-side apply, so that removing a key from it
                            // later removes it from the Secret. A crash in between leaves a Secret that
                            // already holds the token and its record: it is adopted, and the template
                            // applied then, as a metadata repair.
                            Ok(created) if secret::has_template(dir) => {
                                ctx.secrets.expect_echo(&created.metadata);
                                apply_secret(ctx, &secrets, manifest, created.metadata.resource_version.clone()).await
                            }
                            Ok(created) => {
                                ctx.secrets.expect_echo(&created.metadata);
                                Ok(())
                            }
                            Err(kube::Error::Api(s)) if s.code == 409 => {
                                // A Secret the cache did not show, or one created since we looked: look
                                // (again) and decide again.
                                create_refused = true;
                                confirmed = false;
                                observed = None;
                                continue;
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                    _ => {
                        let version = observed.as_ref().and_then(|s| s.resource_version.clone());
                        apply_secret(ctx, &secrets, manifest, version).await
                    }
                };
                if let Err(error) = written {
                    return Err(report_write_failure(ctx, dir, error, &token, now).await);
                }
                failpoint(ctx, "after-secret-write");
                ctx.metrics.tokens_issued.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
                info!(namespace = %ns, name = %name, secret = %secret_name, reason = reason.as_str(), token_hash = %record.token_hash, "token issued");
                // A first token gets no Event: the status this reconcile writes (Ready=True TokenIssued,
                // its time, hash and Secret) already says all an Event would, and at a mass issuance
                // the Event was a fourth write per new directory (measured in BENCHMARKS.md). A token
                // replacing another, a repair and every warning do get one: the status shows only
                // the latest state, not that it changed.
                if reason == IssueReason::Initial {
                    return finish(ctx, dir, desired, &record, false, now).await;
                }
                let event_type = if reason.is_repair() { EventType::Warning } else { EventType::Normal };
                let mut note =
                    format!("{} ({}); Secret {secret_name}, {}", reason.describe(), reason.as_str(), record.token_hash);
                if let Some(previous) = &record.previous {
                    note.push_str(&format!("; the previous token stays valid until {}", previous.valid_until));
                }
                // The Event goes out beside the status write rather than before it: Ready is what the
                // user waits for, and a reconcile holds one of `--concurrency` slots for as many round
                // trips as it makes one after the other. Its reason names the cause: Events of a
                // directory with equal reasons fold into one series that keeps the first note (see
                // `events`), so one generic reason would hide later causes.
                let (finished, ()) = tokio::join!(
                    finish(ctx, dir, desired, &record, false, now),
                    publish(ctx, dir, event_type, reason.as_str(), &note)
                );
                return finished;
            }
            Decision::Keep { record, restore_record, expired, overlap_ended } => {
                let desired = desired.as_ref().expect("a Keep decision implies a valid spec");
                if let Some(current) = &observed
                    && (restore_record || secret::metadata_drifted(dir, current, &record, &ctx.record_key))
                {
                    restore_metadata(ctx, dir, &secrets, current, &record, now).await?;
                    if overlap_ended {
                        info!(namespace = %ns, name = %name, secret = %secret_name, "ended the overlap window on request");
                        let note = format!(
                            "the previous token is no longer accepted: the overlap was ended with the {END_OVERLAP_ANNOTATION} annotation"
                        );
                        publish(ctx, dir, EventType::Normal, "OverlapEnded", &note).await;
                    } else {
                        info!(namespace = %ns, name = %name, secret = %secret_name, "restored the Secret's labels and annotations");
                    }
                }
                return finish(ctx, dir, desired, &record, expired, now).await;
            }
        }
    }
    // The Secret kept changing under us: let the backoff retry.
    Err(Error::Kube(kube::Error::Api(Box::new(
        kube::core::Status::failure("the Secret changed while being written", "Conflict").with_code(409),
    ))))
}

/// Writes the status for a token that stands and schedules the next wake-up (renewal or expiry).
async fn finish(
    ctx: &Context,
    dir: &ScimDirectory,
    desired: &Desired,
    record: &IssueRecord,
    expired: bool,
    now: Timestamp,
) -> Result<Action> {
    let ready = if expired {
        let message = format!(
            "the token expired at {}; rotate it (increase spec.rotationGeneration or set the scim.tokenops.dev/rotate annotation)",
            record.expires_at.map(|t| t.to_string()).unwrap_or_default()
        );
        status::condition(dir, ReadyReason::TokenExpired, &message, now)
    } else if record.reason == IssueReason::Initial {
        status::condition(dir, ReadyReason::TokenIssued, record.reason.describe(), now)
    } else {
        let message = format!("{} ({})", record.reason.describe(), record.reason.as_str());
        status::condition(dir, ReadyReason::TokenRotated, &message, now)
    };
    ctx.export_expiry(dir, record.expires_at);
    // An overlap that has ended leaves the status (the verifier would refuse the token anyway).
    let shown = policy::with_live_overlap(record, now);
    if write_status(ctx, dir, status::with(dir, Some(&shown), ready)).await? && expired {
        publish(ctx, dir, EventType::Warning, ReadyReason::TokenExpired.as_str(), "the token has expired").await;
    }
    Ok(match policy::next_wakeup(desired, record, now) {
        Some(at) => Action::requeue(duration_until(at, now)),
        None => Action::await_change(),
    })
}

fn duration_until(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// Exits the process at a named point, for the crash-safety tests. Compiled only with the
/// `failpoints` feature (the test command enables it), so a release binary has no such switch.
fn failpoint(ctx: &Context, name: &str) {
    if cfg!(feature = "failpoints") && ctx.failpoint.as_deref() == Some(name) {
        warn!(failpoint = name, "failpoint hit: exiting");
        std::process::exit(FAILPOINT_EXIT_CODE);
    }
}
