//! One reconcile of one directory, as its steps: gather what the cluster says, let the policy
//! decide, act on the decision (issue a token, keep it, or report why not), write the Secret, push
//! the token that stands to the identity provider (`idp`), write the status, schedule the next
//! wake-up.

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
use crate::policy::{self, Decision, Desired, Input, Issue, IssueReason, IssueRecord, SecretState, SpecError};
use crate::secret::{self, SecretView};
use crate::status;
use crate::token::Token;

mod idp;

use idp::IdpOutcome;

/// Decisions one reconcile makes at most: each after a cache miss turned out to be a Secret the
/// cache cannot see (its labels stripped, or a foreign one), or after a create lost a race with
/// another writer.
const MAX_ROUNDS: usize = 4;

pub async fn reconcile(dir: Arc<ScimDirectory>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let mut dir = ctx.fresh(dir).await;
    let mut rounds = 0;
    let result = loop {
        match reconcile_once(&dir, &ctx).await {
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

/// One reconcile on one version of the directory.
async fn reconcile_once(dir: &ScimDirectory, ctx: &Context) -> Result<Action> {
    let ns = dir.namespace().ok_or(Error::NotNamespaced)?;
    wait_for_secret_cache(ctx).await?;
    let reconciler = Reconciler {
        ctx,
        dir,
        secrets: Api::namespaced(ctx.client.clone(), &ns),
        name: dir.name_any(),
        secret_name: dir.secret_name(),
        ns,
    };
    reconciler.run().await
}

async fn wait_for_secret_cache(ctx: &Context) -> Result<()> {
    let mut synced = ctx.secrets_synced.clone();
    tokio::time::timeout(Duration::from_secs(60), synced.wait_for(|s| *s))
        .await
        .map_err(|_| Error::CacheNotReady)?
        .map_err(|_| Error::CacheNotReady)?;
    Ok(())
}

/// What one round of a reconcile came to.
enum Round {
    /// The decision was acted on.
    Done(Action),
    /// The decision would issue a token on a Secret the API server has not been asked about: look it
    /// up and decide again.
    MustConfirmMissing,
    /// A first token's create was refused: some Secret has the name. Look it up and decide again.
    CreateRefused,
}

/// What a Secret write came to.
enum Written {
    Done,
    /// The create of a Secret the decision took for missing was refused: one of that name exists.
    CreateRefused,
}

/// What every step of one reconcile reads: the directory (as one version) and where it lives.
struct Reconciler<'a> {
    ctx: &'a Context,
    dir: &'a ScimDirectory,
    secrets: Api<Secret>,
    ns: String,
    name: String,
    secret_name: String,
}

impl Reconciler<'_> {
    /// Gather, decide and act, in rounds: a round that cannot act on what it saw says why, and the
    /// next one decides on the Secret as the API server has it.
    async fn run(&self) -> Result<Action> {
        let mut observed = self.ctx.secrets.get(&self.ns, &self.secret_name);
        let mut confirmed = observed.is_some();
        for _ in 0..MAX_ROUNDS {
            let input = self.gather(observed.as_deref());
            let decision = policy::evaluate(&input);
            let round = if !confirmed && must_confirm_missing(self.dir, &decision) {
                Round::MustConfirmMissing
            } else {
                self.act(&input, decision, observed.as_deref()).await?
            };
            match round {
                Round::Done(action) => return Ok(action),
                Round::MustConfirmMissing | Round::CreateRefused => {
                    observed = self.look_up().await?;
                    confirmed = true;
                }
            }
        }
        Err(Error::SecretKeptChanging)
    }

    /// Everything the policy reads: the spec and annotations, the status, the Secret, the clock.
    fn gather(&self, observed: Option<&SecretView>) -> Input {
        Input {
            desired: Desired::of(self.dir),
            status: status::view(self.dir),
            secret: secret::observe(self.dir, observed, &self.ctx.record_key),
            now: Timestamp::now(),
            min_issue_interval: self.ctx.min_issue_interval,
        }
    }

    /// The directory's Secret as the API server has it. A Secret read afresh may record an issue for
    /// a newer spec than the cached directory shows: deciding on both would issue a token for a spec
    /// that no longer exists, so then the directory is read again too.
    async fn look_up(&self) -> Result<Option<Arc<SecretView>>> {
        let observed = look_up(self.ctx, self.dir, &self.secrets).await?.map(Arc::new);
        if observed.is_some() {
            current_directory(self.ctx, self.dir).await?;
        }
        Ok(observed)
    }

    async fn act(&self, input: &Input, decision: Decision, observed: Option<&SecretView>) -> Result<Round> {
        debug!(namespace = %self.ns, name = %self.name, ?decision, "decided");
        let now = input.now;
        let action = match decision {
            Decision::InvalidSpec(error) => self.report_invalid_spec(&error, now).await?,
            Decision::Conflict => return Err(self.report_conflict(now).await?),
            Decision::Deferred { reason, last_issued_at, until } => {
                self.report_deferred(reason, last_issued_at, until, now).await?
            }
            Decision::Issue(issue) => return self.issue(input, issue, observed).await,
            Decision::Keep { record, restore_record, expired, overlap_ended } => {
                let desired = input.desired.as_ref().expect("a Keep decision implies a valid spec");
                if let Some(current) = observed
                    && (restore_record || secret::metadata_drifted(self.dir, current, &record, &self.ctx.record_key))
                {
                    self.restore_record(current, &record, overlap_ended, now).await?;
                }
                let pushed = self.sync_identity_provider(desired, record, expired, now).await?;
                self.finish_with(desired, expired, &pushed, now).await?
            }
        };
        Ok(Round::Done(action))
    }

    async fn report_invalid_spec(&self, error: &SpecError, now: Timestamp) -> Result<Action> {
        let message = error.to_string();
        self.report(ReadyReason::InvalidSpec, &message, now).await?;
        Ok(Action::await_change())
    }

    /// Fails closed: the token fields leave the status, so the verifier stops accepting a token the
    /// operator can no longer rotate or revoke (the Secret is no longer its own). Who controls the
    /// Secret is not said: the reader of this status may not be allowed to know.
    async fn report_conflict(&self, now: Timestamp) -> Result<Error> {
        let message = format!(
            "Secret {} exists and is not managed by this ScimDirectory; it is left untouched. Delete it or choose another spec.secretName",
            self.secret_name
        );
        let status =
            status::without_token(self.dir, status::condition(self.dir, ReadyReason::SecretConflict, &message, now));
        if write_status(self.ctx, self.dir, status).await? {
            publish(self.ctx, self.dir, EventType::Warning, ReadyReason::SecretConflict.as_str(), &message).await;
        }
        Ok(Error::SecretConflict(self.secret_name.clone()))
    }

    async fn report_deferred(
        &self,
        reason: IssueReason,
        last_issued_at: Timestamp,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<Action> {
        self.ctx.metrics.issues_deferred.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
        let message = format!(
            "a new token ({}) is deferred until {until}: the last one was issued at {last_issued_at}, \
             less than the minimum interval between automatic issues ago. If this repeats, something \
             else is rewriting Secret {}",
            reason.as_str(),
            self.secret_name
        );
        self.report(ReadyReason::IssueDeferred, &message, now).await?;
        warn!(namespace = %self.ns, name = %self.name, reason = reason.as_str(), %until, "automatic issue deferred");
        Ok(Action::requeue(duration_until(until, now)))
    }

    /// A `Ready=False` status that keeps the token fields, and a Warning Event when it changed.
    async fn report(&self, reason: ReadyReason, message: &str, now: Timestamp) -> Result<()> {
        let status = status::with(self.dir, None, status::condition(self.dir, reason, message, now));
        if write_status(self.ctx, self.dir, status).await? {
            publish(self.ctx, self.dir, EventType::Warning, reason.as_str(), message).await;
        }
        Ok(())
    }

    /// Generates a token, writes it with its record to the Secret, then the status (and, for a token
    /// that replaces another, an Event).
    async fn issue(&self, input: &Input, issue: Issue, observed: Option<&SecretView>) -> Result<Round> {
        let desired = input.desired.as_ref().expect("an Issue decision implies a valid spec");
        let (reason, now) = (issue.reason, input.now);
        let token = Token::generate();
        let record = issue.record(token.hash());
        if let Written::CreateRefused = self.write_secret(&input.secret, &token, &record, observed, now).await? {
            return Ok(Round::CreateRefused);
        }
        failpoint(self.ctx, "after-secret-write");
        self.ctx.metrics.tokens_issued.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
        info!(namespace = %self.ns, name = %self.name, secret = %self.secret_name, reason = reason.as_str(), token_hash = %record.token_hash, "token issued");
        // A first token gets no Event: the status this reconcile writes (Ready=True TokenIssued, its
        // time, hash and Secret) already says all an Event would, and at a mass issuance the Event
        // would be a fourth write per new directory (BENCHMARKS.md). A token replacing
        // another, a repair and every warning do get one: the status shows only the latest state,
        // not that it changed.
        if reason == IssueReason::Initial {
            return Ok(Round::Done(self.finish(desired, &record, false, now).await?));
        }
        let event_type = if reason.is_repair() { EventType::Warning } else { EventType::Normal };
        let mut note =
            format!("{} ({}); Secret {}, {}", reason.describe(), reason.as_str(), self.secret_name, record.token_hash);
        if let Some(previous) = &record.previous {
            note.push_str(&format!("; the previous token stays valid until {}", previous.valid_until));
        }
        // The Event goes out beside the status write rather than before it: Ready is what the user
        // waits for, and a reconcile holds one of `--concurrency` slots for as many round trips as it
        // makes one after the other. Its reason names the cause: Events of a directory with equal
        // reasons fold into one series that keeps the first note (see `events`), so one generic
        // reason would hide later causes.
        let (finished, ()) = tokio::join!(
            self.finish(desired, &record, false, now),
            publish(self.ctx, self.dir, event_type, reason.as_str(), &note)
        );
        Ok(Round::Done(finished?))
    }

    /// Writes the token and its record: a create where the decision saw no Secret, otherwise an apply
    /// guarded by the resourceVersion the decision was made on. A write refused for good is reported.
    async fn write_secret(
        &self,
        state: &SecretState,
        token: &Token,
        record: &IssueRecord,
        observed: Option<&SecretView>,
        now: Timestamp,
    ) -> Result<Written> {
        let written = match state {
            SecretState::Missing => self.create_secret(token, record).await,
            _ => {
                let manifest = secret::desired_secret(self.dir, token, record, &self.ctx.record_key);
                let version = observed.and_then(|s| s.resource_version.clone());
                apply_secret(self.ctx, &self.secrets, manifest, version).await.map(|()| Written::Done)
            }
        };
        match written {
            Ok(written) => Ok(written),
            Err(error) => Err(report_write_failure(self.ctx, self.dir, error, token, now).await),
        }
    }

    /// Creates the Secret: never overwrites, so the create is also the check that no Secret has the
    /// name. The template goes on with server-side apply, so that removing a key from it later
    /// removes it from the Secret. A crash in between leaves a Secret that already holds the token and
    /// its record: it is adopted, and the template applied then, as a metadata repair.
    async fn create_secret(&self, token: &Token, record: &IssueRecord) -> Result<Written> {
        let (dir, key) = (self.dir, &self.ctx.record_key);
        self.ctx.fence.check()?;
        let created = match self.secrets.create(&post_params(), &secret::initial_secret(dir, token, record, key)).await
        {
            Ok(created) => created,
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Written::CreateRefused),
            Err(e) => return Err(e.into()),
        };
        self.ctx.secrets.expect_echo(&created.metadata);
        if secret::has_template(dir) {
            let manifest = secret::desired_secret(dir, token, record, key);
            apply_secret(self.ctx, &self.secrets, manifest, created.metadata.resource_version.clone()).await?;
        }
        Ok(Written::Done)
    }

    /// Rewrites the record (and the labels and annotations) around the token the Secret holds.
    async fn restore_record(
        &self,
        current: &SecretView,
        record: &IssueRecord,
        overlap_ended: bool,
        now: Timestamp,
    ) -> Result<()> {
        restore_metadata(self.ctx, self.dir, &self.secrets, current, record, now).await?;
        if overlap_ended {
            info!(namespace = %self.ns, name = %self.name, secret = %self.secret_name, "ended the overlap window on request");
            let note = format!(
                "the previous token is no longer accepted: the overlap was ended with the {END_OVERLAP_ANNOTATION} annotation"
            );
            publish(self.ctx, self.dir, EventType::Normal, "OverlapEnded", &note).await;
        } else {
            info!(namespace = %self.ns, name = %self.name, secret = %self.secret_name, "restored the Secret's labels and annotations");
        }
        Ok(())
    }
    /// Writes the status for a token that stands, then schedules the next wake-up (renewal, expiry,
    /// the end of an overlap).
    async fn finish(&self, desired: &Desired, record: &IssueRecord, expired: bool, now: Timestamp) -> Result<Action> {
        self.finish_with(desired, expired, &self.idp_standing(desired, record), now).await
    }

    /// [`Self::finish`] with the identity-provider step's outcome: its record, its condition, and
    /// its next call, whichever comes first.
    async fn finish_with(&self, desired: &Desired, expired: bool, idp: &IdpOutcome, now: Timestamp) -> Result<Action> {
        self.write_token_status(&idp.record, expired, idp, now).await?;
        Ok(match (policy::next_wakeup(desired, &idp.record, now), idp.requeue) {
            (Some(at), Some(after)) => Action::requeue(duration_until(at, now).min(after)),
            (Some(at), None) => Action::requeue(duration_until(at, now)),
            (None, Some(after)) => Action::requeue(after),
            (None, None) => Action::await_change(),
        })
    }

    async fn write_token_status(
        &self,
        record: &IssueRecord,
        expired: bool,
        idp: &IdpOutcome,
        now: Timestamp,
    ) -> Result<()> {
        let (ctx, dir) = (self.ctx, self.dir);
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
        let mut status = status::with(dir, Some(&shown), ready);
        idp.apply(dir, &mut status, now);
        if write_status(ctx, dir, status).await? {
            if expired {
                publish(ctx, dir, EventType::Warning, ReadyReason::TokenExpired.as_str(), "the token has expired")
                    .await;
            }
            if let Some((reason, note)) = idp.warning() {
                publish(ctx, dir, EventType::Warning, reason, note).await;
            }
        }
        Ok(())
    }
}

/// Whether a decision to issue (or defer) a token on a Secret only the cache has seen missing must
/// wait for the API server to confirm it. The cache holds only Secrets that carry our label and a
/// directory's controller reference, so a miss proves nothing: a Secret whose label was stripped
/// must be repaired, not deferred or replaced, and a foreign one left alone. So a token is generated
/// only once the API server confirms there is no Secret, before anything is throttled, with one
/// exception ([`creates_without_look_up`]).
fn must_confirm_missing(dir: &ScimDirectory, decision: &Decision) -> bool {
    decision.issue_reason().is_some_and(|reason| !creates_without_look_up(dir, reason))
}

/// The first token of a directory that has no status yet is created without a look-up: it saves
/// every new directory a round trip. Its create is the check, refused without writing anything if
/// any Secret has the name (then the Secret is looked up and the decision made again). A refused
/// create is the only request that carries a token that never becomes valid: once per directory,
/// since the status written after it (a conflict, say) sends every later attempt through the
/// look-up first.
fn creates_without_look_up(dir: &ScimDirectory, reason: IssueReason) -> bool {
    reason == IssueReason::Initial && dir.status.is_none()
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
