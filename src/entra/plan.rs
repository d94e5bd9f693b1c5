//! The push to Entra as steps, decided by pure functions over the issue record and what Graph
//! answered; the controller (`controller::reconcile::idp`) does the I/O between them.
//!
//! A token's push goes: validate (Entra calls the SCIM endpoint with the new token, which the
//! verifier already accepts) → push (`PUT secrets`) → await Entra's next successful run after the
//! push (restarting a quarantined job) → synced, which ends the rotation's overlap early. Progress
//! lives in the sealed issue record on the token's Secret ([`IdpProgress`]), written right after
//! the push and again once synced, so a restart at any point neither pushes twice nor loses the push.
//! The one unavoidable ambiguity: a crash between the PUT's 204 and the record write leaves no trace
//! of the push, and the same token is pushed once more.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::graph::{Job, SyncStatus};
use crate::policy::{IdpProgress, IssueRecord};

/// What to do next for the token a record describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not pushed to these settings: validate, then push.
    Push,
    /// Pushed at `pushed_at`: wait for the job's first successful run that began after it.
    Await { pushed_at: Timestamp },
    /// Entra has succeeded with this token: nothing to call.
    Synced { pushed_at: Timestamp, at: Timestamp },
}

/// The next step for `record`'s token, pushed to `target`. A record without progress (a new token,
/// or one written before pushes existed) is pushed; it is never a reason for a new token.
pub fn next_step(target: &str, record: &IssueRecord) -> Step {
    match &record.idp {
        Some(p) if p.target == target => match p.synced_at {
            Some(at) => Step::Synced { pushed_at: p.pushed_at, at },
            None => Step::Await { pushed_at: p.pushed_at },
        },
        _ => Step::Push,
    }
}

/// The record once the push has been answered with 204 at `answered`. The time is rounded up to the
/// second: a run that began at or before it may have used the old credentials.
pub fn pushed(record: &IssueRecord, target: &str, answered: Timestamp) -> IssueRecord {
    let pushed_at = round_up(answered);
    IssueRecord { idp: Some(IdpProgress { target: target.to_owned(), pushed_at, synced_at: None }), ..record.clone() }
}

/// The record once Entra has succeeded with its token at `at`: the previous token's overlap ends now.
pub fn synced(record: &IssueRecord, at: Timestamp) -> IssueRecord {
    let idp = record.idp.clone().map(|p| IdpProgress { synced_at: Some(round_down(at)), ..p });
    IssueRecord { idp, previous: None, ..record.clone() }
}

fn round_up(t: Timestamp) -> Timestamp {
    let s = if t.subsec_nanosecond() > 0 { t.as_second() + 1 } else { t.as_second() };
    Timestamp::from_second(s).unwrap_or(t)
}

fn round_down(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// The job to push to: the one named, or the only one.
pub fn select_job<'a>(jobs: &'a [Job], job_id: Option<&str>) -> Result<&'a Job, String> {
    match job_id {
        Some(id) => jobs.iter().find(|j| j.id == id).ok_or_else(|| format!("the service principal has no job {id}")),
        None => match jobs {
            [job] => Ok(job),
            [] => Err("the service principal has no synchronization job".to_owned()),
            _ => Err(format!(
                "the service principal has {} synchronization jobs: set spec.identityProvider.entra.jobId",
                jobs.len()
            )),
        },
    }
}

/// What a job's status says about a token pushed at `pushed_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A run that began after the push succeeded (it used the new token).
    Succeeded { at: Timestamp },
    /// The job is in quarantine: restart it (the new credentials are saved).
    Quarantined { reason: String },
    /// The last run began after the push and failed.
    Failed { code: String, message: String },
    /// No run since the push yet.
    Waiting,
}

pub fn judge(job: &Job, pushed_at: Timestamp) -> Verdict {
    let Some(status) = &job.status else { return Verdict::Waiting };
    let began_after =
        |e: &super::graph::Execution| e.time_began.as_deref().and_then(parse_time).filter(|t| *t > pushed_at);
    if let Some(success) = &status.last_successful_execution
        && let Some(began) = began_after(success)
    {
        let ended = success.time_ended.as_deref().and_then(parse_time).filter(|t| *t >= began);
        return Verdict::Succeeded { at: ended.unwrap_or(began) };
    }
    if status.code.as_deref() == Some("Quarantine") {
        return Verdict::Quarantined { reason: quarantine_reason(status) };
    }
    if let Some(last) = &status.last_execution
        && began_after(last).is_some()
        && last.state.as_deref() == Some("Failed")
    {
        let error = last.error.clone().unwrap_or_default();
        return Verdict::Failed {
            code: error.code.unwrap_or_else(|| "Failed".to_owned()),
            message: error.message.unwrap_or_default().chars().take(300).collect(),
        };
    }
    Verdict::Waiting
}

fn quarantine_reason(status: &SyncStatus) -> String {
    let q = status.quarantine.clone().unwrap_or_default();
    match (q.reason, q.error.and_then(|e| e.code)) {
        (Some(reason), Some(code)) => format!("{reason}, {code}"),
        (Some(reason), None) => reason,
        (None, Some(code)) => code,
        (None, None) => "no reason given".to_owned(),
    }
}

/// Graph's `Edm.DateTimeOffset` (up to seven fractional digits); the zero value `0001-01-01...` is
/// "never".
pub fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse::<Timestamp>().ok().filter(|t| t.as_second() > 0)
}

/// When to call again after `failures` failures in a row: 1s, 2s, 4s ... at most 5 minutes, and
/// never sooner than Graph's `Retry-After`.
pub fn retry_delay(failures: u32, retry_after: Option<Duration>) -> Duration {
    let backoff = Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300));
    retry_after.map_or(backoff, |r| r.max(backoff))
}

#[cfg(test)]
mod tests {
    use super::super::graph::{Execution, Quarantine, SyncError};
    use super::*;
    use crate::policy::{Desired, IssueReason, new_record};
    use crate::token::TokenHash;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn record(idp: Option<IdpProgress>) -> IssueRecord {
        let desired = Desired::parse(0, None, None, None).unwrap();
        IssueRecord {
            idp,
            ..new_record(
                &desired,
                TokenHash::of_bytes(b"t"),
                IssueReason::RotationRequested,
                ts("2026-01-01T00:00:00Z"),
            )
        }
    }

    fn progress(target: &str, synced: Option<&str>) -> IdpProgress {
        IdpProgress { target: target.into(), pushed_at: ts("2026-01-01T00:00:05Z"), synced_at: synced.map(ts) }
    }

    #[test]
    fn step_table() {
        let pushed = ts("2026-01-01T00:00:05Z");
        for (name, idp, want) in [
            ("a new token (or a record from before pushes): push", None, Step::Push),
            (
                "pushed to these settings: await the next run",
                Some(progress("aa", None)),
                Step::Await { pushed_at: pushed },
            ),
            (
                "synced: nothing to call",
                Some(progress("aa", Some("2026-01-01T00:40:00Z"))),
                Step::Synced { pushed_at: pushed, at: ts("2026-01-01T00:40:00Z") },
            ),
            ("pushed to other settings: push again", Some(progress("bb", None)), Step::Push),
            ("synced under other settings: push again", Some(progress("bb", Some("2026-01-01T00:40:00Z"))), Step::Push),
        ] {
            assert_eq!(next_step("aa", &record(idp)), want, "{name}");
        }
    }

    #[test]
    fn progress_is_recorded_after_the_push_and_the_sync_ends_the_overlap() {
        let mut r = record(None);
        r.previous = Some(crate::policy::PreviousToken {
            token_hash: TokenHash::of_bytes(b"old"),
            valid_until: ts("2026-01-01T01:00:00Z"),
        });
        let p = pushed(&r, "aa", ts("2026-01-01T00:00:04.2Z"));
        assert_eq!(p.idp, Some(progress("aa", None)), "rounded up to the second");
        assert_eq!(p.previous, r.previous, "the push keeps the old token: Entra has not run with the new one yet");
        assert_eq!(next_step("aa", &p), Step::Await { pushed_at: ts("2026-01-01T00:00:05Z") });
        let s = synced(&p, ts("2026-01-01T00:40:00.9Z"));
        assert_eq!(s.previous, None, "the overlap ends early");
        assert_eq!(s.idp, Some(progress("aa", Some("2026-01-01T00:40:00Z"))));
        assert_eq!(pushed(&r, "aa", ts("2026-01-01T00:00:05Z")).idp.unwrap().pushed_at, ts("2026-01-01T00:00:05Z"));
    }

    fn job(code: &str, success: Option<(&str, &str)>, last: Option<(&str, &str)>, quarantine: bool) -> Job {
        let exec = |(began, state): (&str, &str)| Execution {
            time_began: Some(began.into()),
            time_ended: Some(began.into()),
            state: Some(state.into()),
            error: (state == "Failed")
                .then(|| SyncError { code: Some("SCIMUnauthorized".into()), message: Some("401".into()) }),
        };
        Job {
            id: "scim.1".into(),
            status: Some(SyncStatus {
                code: Some(code.into()),
                quarantine: quarantine.then(|| Quarantine {
                    reason: Some("EncounteredQuarantineException".into()),
                    ..Quarantine::default()
                }),
                last_execution: last.map(exec),
                last_successful_execution: success.map(exec),
            }),
        }
    }

    #[test]
    fn verdict_table() {
        let pushed = ts("2026-01-01T00:00:05Z");
        let q = Verdict::Quarantined { reason: "EncounteredQuarantineException".into() };
        let cases: Vec<(&str, Job, Verdict)> = vec![
            ("never run", job("NotRun", None, None, false), Verdict::Waiting),
            ("no status at all", Job { id: "scim.1".into(), status: None }, Verdict::Waiting),
            (
                "succeeded before the push: the old token",
                job(
                    "Active",
                    Some(("2026-01-01T00:00:05Z", "Succeeded")),
                    Some(("2026-01-01T00:00:05Z", "Succeeded")),
                    false,
                ),
                Verdict::Waiting,
            ),
            (
                "succeeded after the push",
                job(
                    "Active",
                    Some(("2026-01-01T00:00:06Z", "Succeeded")),
                    Some(("2026-01-01T00:00:06Z", "Succeeded")),
                    false,
                ),
                Verdict::Succeeded { at: ts("2026-01-01T00:00:06Z") },
            ),
            (
                "quarantined",
                job(
                    "Quarantine",
                    Some(("2026-01-01T00:00:01Z", "Succeeded")),
                    Some(("2026-01-01T00:00:09Z", "Failed")),
                    true,
                ),
                q.clone(),
            ),
            (
                "succeeded after the push, quarantined since: the token worked",
                job(
                    "Quarantine",
                    Some(("2026-01-01T00:00:07Z", "Succeeded")),
                    Some(("2026-01-01T00:00:09Z", "Failed")),
                    true,
                ),
                Verdict::Succeeded { at: ts("2026-01-01T00:00:07Z") },
            ),
            (
                "failed after the push",
                job("Active", None, Some(("2026-01-01T00:00:09Z", "Failed")), false),
                Verdict::Failed { code: "SCIMUnauthorized".into(), message: "401".into() },
            ),
            (
                "failed before the push",
                job("Active", None, Some(("2026-01-01T00:00:01Z", "Failed")), false),
                Verdict::Waiting,
            ),
            (
                "Graph's zero time is never",
                job("Active", Some(("0001-01-01T00:00:00Z", "Succeeded")), None, false),
                Verdict::Waiting,
            ),
        ];
        for (name, job, want) in cases {
            assert_eq!(judge(&job, pushed), want, "{name}");
        }
        assert_eq!(parse_time("2026-01-01T00:00:00.1234567Z"), Some(ts("2026-01-01T00:00:00.1234567Z")));
    }

    #[test]
    fn jobs_are_chosen_by_id_or_as_the_only_one() {
        let one = Job { id: "scim.1".into(), status: None };
        let two = Job { id: "scim.2".into(), status: None };
        let both = [one.clone(), two.clone()];
        assert_eq!(select_job(&both, Some("scim.2")), Ok(&two));
        assert!(select_job(&both, Some("scim.3")).unwrap_err().contains("no job scim.3"));
        assert!(select_job(&both, None).unwrap_err().contains("set spec.identityProvider.entra.jobId"));
        assert_eq!(select_job(std::slice::from_ref(&one), None), Ok(&one));
        assert!(select_job(&[], None).is_err());
    }

    #[test]
    fn retries_back_off_and_honour_retry_after() {
        assert_eq!(retry_delay(1, None), Duration::from_secs(1));
        assert_eq!(retry_delay(4, None), Duration::from_secs(8));
        assert_eq!(retry_delay(40, None), Duration::from_secs(300));
        assert_eq!(retry_delay(1, Some(Duration::from_secs(30))), Duration::from_secs(30));
        assert_eq!(retry_delay(6, Some(Duration::from_secs(2))), Duration::from_secs(32));
    }
}
