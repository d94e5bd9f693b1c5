//! The identity-provider steps of a reconcile: push the token that stands to Microsoft Entra ID and
//! watch Entra run with it. `entra::plan` decides; this does the I/O, in an order that survives a
//! crash between any two steps (see `entra::plan`). A failure never touches the token: the previous
//! one stays valid until its overlap ends, the condition says which step failed with Graph's error
//! code, a Warning Event goes out, and the directory is requeued with backoff (never sooner than
//! Graph's `Retry-After`), never slept on.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use tracing::{info, warn};

use super::super::writes::{apply_secret, publish, report_write_failure};
use super::super::{Error, Result};
use super::{Reconciler, failpoint};
use crate::api::{EntraProvisioning, ScimDirectory, ScimDirectoryStatus};
use crate::entra::plan::{self, Step, Verdict};
use crate::entra::{AccessToken, CONDITION, Graph, GraphError, reason};
use crate::events::EventType;
use crate::metrics::ResultLabels;
use crate::policy::{Desired, IssueRecord, RecordState, SecretState};
use crate::secret::{self, SecretView};
use crate::token::Token;

/// Right after a new token's status is written, the push waits this long: validation needs the
/// verifier to accept the token, and the verifier learns it from that status.
const AFTER_ISSUE: Duration = Duration::from_secs(1);

/// What the identity-provider step came to.
pub(in crate::controller) struct IdpOutcome {
    /// The record as it stands after the step (with the push progress it wrote).
    pub record: IssueRecord,
    /// `None`: no identity provider; the condition goes.
    condition: Option<(&'static str, String)>,
    /// When to come back (a retry, or the next look at the job).
    pub requeue: Option<Duration>,
    /// A Warning Event, published when the status changed.
    warning: bool,
}

impl IdpOutcome {
    fn none(record: IssueRecord) -> IdpOutcome {
        IdpOutcome { record, condition: None, requeue: None, warning: false }
    }

    fn state(record: IssueRecord, reason: &'static str, message: String, requeue: Option<Duration>) -> IdpOutcome {
        IdpOutcome { record, condition: Some((reason, message)), requeue, warning: false }
    }

    /// Puts the condition into `status` (in place, keeping its transition time while its status
    /// does not change), or takes it out.
    pub fn apply(&self, dir: &ScimDirectory, status: &mut ScimDirectoryStatus, now: Timestamp) {
        let existing = status.conditions.iter().position(|c| c.type_ == CONDITION);
        let Some((reason, message)) = &self.condition else {
            if let Some(i) = existing {
                status.conditions.remove(i);
            }
            return;
        };
        let value = if *reason == reason::SYNCED { "True" } else { "False" };
        let last_transition_time = existing
            .map(|i| &status.conditions[i])
            .filter(|c| c.status == value)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(Timestamp::from_second(now.as_second()).expect("valid")));
        let condition = Condition {
            type_: CONDITION.into(),
            status: value.into(),
            reason: (*reason).into(),
            message: message.clone(),
            observed_generation: dir.metadata.generation,
            last_transition_time,
        };
        match existing {
            Some(i) => status.conditions[i] = condition,
            None => status.conditions.push(condition),
        }
    }

    /// The Warning Event to publish once the status changed: the condition's reason and message.
    pub fn warning(&self) -> Option<(&'static str, &str)> {
        self.warning.then_some(()).and(self.condition.as_ref().map(|(r, m)| (*r, m.as_str())))
    }
}

impl Reconciler<'_> {
    /// The condition of a token that stands, without calling anyone: after an issue, the push
    /// comes in the next reconcile.
    pub(super) fn idp_standing(&self, desired: &Desired, record: &IssueRecord) -> IdpOutcome {
        let (Some(entra), Some(target)) = (self.dir.entra(), desired.idp_target.as_deref()) else {
            return IdpOutcome::none(record.clone());
        };
        let message = match plan::next_step(target, record) {
            Step::Push => {
                return IdpOutcome::state(
                    record.clone(),
                    reason::PUSH_PENDING,
                    format!("token {} is not set in Microsoft Entra ID yet", record.token_hash),
                    Some(AFTER_ISSUE),
                );
            }
            Step::Await { pushed_at } => awaiting(entra, record, pushed_at),
            Step::Synced { at, .. } => {
                return IdpOutcome::state(record.clone(), reason::SYNCED, synced(record, at), None);
            }
        };
        IdpOutcome::state(record.clone(), reason::AWAITING_SYNC, message, Some(self.ctx.entra.poll_interval()))
    }

    /// The step of a token that stands: push it, or look at the job it was pushed to.
    pub(super) async fn sync_identity_provider(
        &self,
        desired: &Desired,
        record: IssueRecord,
        expired: bool,
        now: Timestamp,
    ) -> Result<IdpOutcome> {
        let (Some(entra), Some(target)) = (self.dir.entra(), desired.idp_target.as_deref()) else {
            return Ok(IdpOutcome::none(record));
        };
        // Validation needs the verifier to accept the token, and the verifier learns it from the
        // status: a token the status does not show yet (a crash between the Secret write and the
        // status write) is pushed after this reconcile's status write.
        let shown = self.dir.status.as_ref().and_then(|s| s.token_hash.as_deref());
        if shown != Some(record.token_hash.as_str()) {
            return Ok(self.idp_standing(desired, &record));
        }
        match plan::next_step(target, &record) {
            Step::Synced { .. } => {
                self.ctx.entra.succeeded(&self.key());
                Ok(self.idp_standing(desired, &record))
            }
            _ if expired => Ok(IdpOutcome::state(
                record,
                reason::TOKEN_EXPIRED,
                "the token has expired: it is not pushed; rotate it".to_owned(),
                None,
            )),
            Step::Push => self.push(desired, entra, target, record, now).await,
            Step::Await { pushed_at } => self.await_sync(entra, record, pushed_at, now).await,
        }
    }

    /// Validate (Entra calls the SCIM endpoint with the token), push, record the push.
    async fn push(
        &self,
        desired: &Desired,
        entra: &EntraProvisioning,
        target: &str,
        record: IssueRecord,
        now: Timestamp,
    ) -> Result<IdpOutcome> {
        // The Secret as the API server has it decides, not the cache: a cache that has not shown
        // our own record write yet must not make us push twice.
        let (token, version, fresh) = self.stored_token(&record).await?;
        if let Some(fresh) = fresh.filter(|r| plan::next_step(target, r) != Step::Push) {
            return Ok(self.idp_standing(desired, &fresh));
        }
        let access = match self.access_token(entra).await {
            Ok(access) => access,
            Err(e) => return Ok(self.failed(entra, reason::AUTHENTICATION_FAILED, e, record)),
        };
        let graph = self.ctx.entra.graph(&access);
        let sp = &entra.service_principal_id;
        let job = match &entra.job_id {
            Some(job) => job.clone(),
            None => match graph.list_jobs(sp).await {
                Ok(jobs) => match plan::select_job(&jobs, None) {
                    Ok(job) => job.id.clone(),
                    Err(message) => return Ok(self.job_not_found(message, record)),
                },
                Err(e) => return Ok(self.failed(entra, reason::JOB_STATUS_FAILED, e, record)),
            },
        };
        if let Err(e) = graph.validate_credentials(sp, &job, &entra.base_address, &token).await {
            return Ok(self.failed(entra, reason::VALIDATION_FAILED, e, record));
        }
        failpoint(self.ctx, "entra-after-validate");
        // A replica that may no longer lead sets nothing: the next leader pushes.
        self.ctx.fence.check()?;
        if let Err(e) = graph.put_secrets(sp, &entra.base_address, &token).await {
            return Ok(self.failed(entra, reason::PUSH_FAILED, e, record));
        }
        let pushed = plan::pushed(&record, target, Timestamp::now());
        // A crash here leaves no trace of the push: the next leader pushes the same token again.
        failpoint(self.ctx, "entra-after-push");
        self.write_record(&token, &pushed, version, now).await?;
        failpoint(self.ctx, "entra-after-push-record");
        self.count("pushed");
        self.ctx.entra.succeeded(&self.key());
        let until = match &pushed.previous {
            Some(p) => format!(
                "; the previous token stays valid until Entra has run with the new one, at most until {}",
                p.valid_until
            ),
            None => String::new(),
        };
        info!(namespace = %self.ns, name = %self.name, job, token_hash = %pushed.token_hash, "pushed the token to Microsoft Entra ID");
        let note = format!(
            "validated token {} from Microsoft Entra ID and set it as the credentials of provisioning job {job}{until}",
            pushed.token_hash
        );
        publish(self.ctx, self.dir, EventType::Normal, "IdentityProviderPushed", &note).await;
        let message = awaiting(entra, &pushed, pushed.idp.as_ref().expect("just pushed").pushed_at);
        Ok(IdpOutcome::state(pushed, reason::AWAITING_SYNC, message, Some(self.ctx.entra.poll_interval())))
    }

    /// Reads the job the token was pushed to: synced once a run that began after the push
    /// succeeded (the overlap then ends); a job in quarantine is restarted.
    async fn await_sync(
        &self,
        entra: &EntraProvisioning,
        record: IssueRecord,
        pushed_at: Timestamp,
        now: Timestamp,
    ) -> Result<IdpOutcome> {
        let access = match self.access_token(entra).await {
            Ok(access) => access,
            Err(e) => return Ok(self.failed(entra, reason::AUTHENTICATION_FAILED, e, record)),
        };
        let graph = self.ctx.entra.graph(&access);
        let sp = &entra.service_principal_id;
        let jobs = match graph.list_jobs(sp).await {
            Ok(jobs) => jobs,
            Err(e) => return Ok(self.failed(entra, reason::JOB_STATUS_FAILED, e, record)),
        };
        let job = match plan::select_job(&jobs, entra.job_id.as_deref()) {
            Ok(job) => job,
            Err(message) => return Ok(self.job_not_found(message, record)),
        };
        let poll = self.ctx.entra.poll_interval();
        match plan::judge(job, pushed_at) {
            Verdict::Succeeded { at } => self.record_synced(record, &job.id, at, now).await,
            Verdict::Quarantined { reason: why } => {
                self.restart_quarantined(&graph, entra, record, &job.id, &why).await
            }
            Verdict::Failed { code, message: detail } => {
                let message = format!(
                    "provisioning job {}'s last run after the push failed: {code}: {detail}{}",
                    job.id,
                    overlap_note(&record)
                );
                Ok(IdpOutcome {
                    record,
                    condition: Some((reason::SYNC_FAILED, message)),
                    requeue: Some(poll),
                    warning: true,
                })
            }
            Verdict::Waiting => {
                let message = awaiting(entra, &record, pushed_at);
                Ok(IdpOutcome::state(record, reason::AWAITING_SYNC, message, Some(poll)))
            }
        }
    }

    /// Entra has run with the token at `at`: record it (the previous token's overlap ends).
    async fn record_synced(&self, record: IssueRecord, job: &str, at: Timestamp, now: Timestamp) -> Result<IdpOutcome> {
        let (token, version, _) = self.stored_token(&record).await?;
        let synced_record = plan::synced(&record, at);
        self.write_record(&token, &synced_record, version, now).await?;
        failpoint(self.ctx, "entra-after-synced-record");
        self.ctx.entra.succeeded(&self.key());
        self.count("synced");
        let took = at.duration_since(record.issued_at).as_secs_f64().max(0.0);
        self.ctx.metrics.idp_first_success.observe(took);
        info!(namespace = %self.ns, name = %self.name, job, %at, "Microsoft Entra ID ran with the new token");
        let ended = if record.previous.is_some() { "; the previous token is no longer accepted" } else { "" };
        let note = format!(
            "Microsoft Entra ID's provisioning job {job} succeeded with token {} at {at}{ended}",
            record.token_hash
        );
        publish(self.ctx, self.dir, EventType::Normal, "IdentityProviderSynced", &note).await;
        let message = synced(&synced_record, synced_record.idp.as_ref().and_then(|p| p.synced_at).unwrap_or(at));
        Ok(IdpOutcome::state(synced_record, reason::SYNCED, message, None))
    }

    /// Restarts a job in quarantine with `resetScope: QuarantineState` (the new credentials are
    /// saved), and looks again after the backoff.
    async fn restart_quarantined(
        &self,
        graph: &Graph<'_>,
        entra: &EntraProvisioning,
        record: IssueRecord,
        job: &str,
        why: &str,
    ) -> Result<IdpOutcome> {
        self.ctx.fence.check()?;
        if let Err(e) = graph.restart(&entra.service_principal_id, job).await {
            return Ok(self.failed(entra, reason::RESTART_FAILED, e, record));
        }
        failpoint(self.ctx, "entra-after-restart");
        self.count("restarted");
        let n = self.ctx.entra.failed(&self.key());
        let message = format!(
            "provisioning job {job} was in quarantine ({why}); restarted it with resetScope QuarantineState, the new credentials being saved{}",
            overlap_note(&record)
        );
        warn!(namespace = %self.ns, name = %self.name, job, quarantine = %why, "restarted a quarantined provisioning job");
        let delay = plan::retry_delay(n, None).max(self.ctx.entra.poll_interval());
        Ok(IdpOutcome { record, condition: Some((reason::QUARANTINED, message)), requeue: Some(delay), warning: true })
    }

    async fn access_token(&self, entra: &EntraProvisioning) -> std::result::Result<Arc<AccessToken>, GraphError> {
        self.ctx.entra.access_token(&self.ctx.client, &self.ns, entra).await
    }

    /// The token the record names, read from the Secret (the plaintext goes to Graph only), the
    /// Secret's resourceVersion, which guards the record write that follows, and the sealed record
    /// it carries now.
    async fn stored_token(&self, record: &IssueRecord) -> Result<(Token, Option<String>, Option<IssueRecord>)> {
        let mut full = self.secrets.get(&self.secret_name).await?;
        let fresh = match secret::observe(self.dir, Some(&SecretView::of(&full)), &self.ctx.record_key) {
            SecretState::Owned { record: RecordState::Valid(fresh), .. } if fresh.token_hash == record.token_hash => {
                Some(fresh)
            }
            _ => None,
        };
        let token = secret::take_stored_token(&mut full)
            .filter(|t| t.hash() == record.token_hash)
            .ok_or(Error::TokenChangedDuringRestore)?;
        Ok((token, full.metadata.resource_version, fresh))
    }

    /// Writes the record (with its push progress) around the same token.
    async fn write_record(
        &self,
        token: &Token,
        record: &IssueRecord,
        version: Option<String>,
        now: Timestamp,
    ) -> Result<()> {
        let manifest = secret::desired_secret(self.dir, token, record, &self.ctx.record_key);
        match apply_secret(self.ctx, &self.secrets, manifest, version).await {
            Ok(()) => Ok(()),
            Err(error) => Err(report_write_failure(self.ctx, self.dir, error, token, now).await),
        }
    }

    /// A failed call: the condition names the step and Graph's answer; retried with backoff.
    fn failed(
        &self,
        entra: &EntraProvisioning,
        step: &'static str,
        error: GraphError,
        record: IssueRecord,
    ) -> IdpOutcome {
        if error.is_unauthorized() {
            self.ctx.entra.forget_access_token(&self.ns, entra);
        }
        let n = self.ctx.entra.failed(&self.key());
        let delay = plan::retry_delay(n, error.retry_after);
        self.count(step);
        warn!(namespace = %self.ns, name = %self.name, step, code = %error.code_or_status(), %error, retry_in = ?delay, "pushing to Microsoft Entra ID failed");
        let message = format!("{error}{}", overlap_note(&record));
        IdpOutcome { record, condition: Some((step, message)), requeue: Some(delay), warning: true }
    }

    fn job_not_found(&self, message: String, record: IssueRecord) -> IdpOutcome {
        let n = self.ctx.entra.failed(&self.key());
        self.count(reason::JOB_NOT_FOUND);
        let message = format!("{message}{}", overlap_note(&record));
        IdpOutcome {
            record,
            condition: Some((reason::JOB_NOT_FOUND, message)),
            requeue: Some(plan::retry_delay(n, None)),
            warning: true,
        }
    }

    fn count(&self, result: &str) {
        self.ctx.metrics.idp_pushes.get_or_create(&ResultLabels { result: result.into() }).inc();
    }

    fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

fn awaiting(entra: &EntraProvisioning, record: &IssueRecord, pushed_at: Timestamp) -> String {
    let job = entra.job_id.as_deref().map(|j| format!(" {j}")).unwrap_or_default();
    format!(
        "token {} was set in Microsoft Entra ID at {pushed_at}; waiting for provisioning job{job}'s next successful run{}",
        record.token_hash,
        overlap_note(record)
    )
}

fn synced(record: &IssueRecord, at: Timestamp) -> String {
    format!("Microsoft Entra ID's provisioning succeeded with token {} at {at}", record.token_hash)
}

/// What a failure or a wait means for the previous token.
fn overlap_note(record: &IssueRecord) -> String {
    match &record.previous {
        Some(p) => format!("; the previous token stays valid until {}", p.valid_until),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScimDirectorySpec;
    use crate::policy::{IssueReason, new_record};
    use crate::token::TokenHash;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_condition_is_set_in_place_keeps_its_transition_time_and_goes_without_an_identity_provider() {
        let dir = ScimDirectory::new("acme", ScimDirectorySpec::default());
        let record = new_record(
            &Desired::parse(0, None, None, None).unwrap(),
            TokenHash::of_bytes(b"t"),
            IssueReason::Initial,
            ts("2026-01-01T00:00:00Z"),
        );
        let ready = Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "TokenIssued".into(),
            message: "issued".into(),
            observed_generation: None,
            last_transition_time: Time(ts("2026-01-01T00:00:00Z")),
        };
        let mut status = ScimDirectoryStatus { conditions: vec![ready.clone()], ..ScimDirectoryStatus::default() };
        let state = |reason, message: &str| IdpOutcome::state(record.clone(), reason, message.to_owned(), None);

        state(reason::PUSH_PENDING, "pending").apply(&dir, &mut status, ts("2026-01-01T00:00:01Z"));
        assert_eq!(status.conditions.len(), 2);
        assert_eq!((status.conditions[1].type_.as_str(), status.conditions[1].status.as_str()), (CONDITION, "False"));
        // Another False reason: the transition time stays; True: it moves.
        state(reason::AWAITING_SYNC, "waiting").apply(&dir, &mut status, ts("2026-01-01T00:00:02Z"));
        assert_eq!(status.conditions[1].last_transition_time.0, ts("2026-01-01T00:00:01Z"));
        assert_eq!(status.conditions[1].reason, reason::AWAITING_SYNC);
        state(reason::SYNCED, "synced").apply(&dir, &mut status, ts("2026-01-01T00:40:00Z"));
        assert_eq!(status.conditions[1].status, "True");
        assert_eq!(status.conditions[1].last_transition_time.0, ts("2026-01-01T00:40:00Z"));
        assert_eq!(status.conditions[0], ready, "Ready untouched, first");
        assert_eq!(state(reason::SYNCED, "synced").warning(), None, "a state is no warning");
        IdpOutcome::none(record.clone()).apply(&dir, &mut status, ts("2026-01-02T00:00:00Z"));
        assert_eq!(status.conditions, vec![ready], "no identity provider, no condition");
    }
}
