//! The directory's status, derived from an issue record: pure functions, so that what the status
//! says is decided in one place and tested without a cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::{ReadyReason, ScimDirectory, ScimDirectoryStatus};
use crate::policy::{IssueReason, IssueRecord, PreviousToken, StatusView};
use crate::token::TokenHash;

/// The issue record the status vouches for, used to restore a Secret's stripped annotations.
pub fn view(dir: &ScimDirectory) -> StatusView {
    let Some(status) = &dir.status else { return StatusView::default() };
    let token_hash = status.token_hash.as_deref().and_then(TokenHash::parse);
    let record = (|| {
        let issued_at = status.token_issued_at.as_ref()?.0;
        let expires_at = status.token_expires_at.as_ref().map(|t| t.0);
        Some(IssueRecord {
            token_hash: token_hash.clone()?,
            rotation_generation: status.observed_rotation_generation?,
            expires_in: expires_at.map(|at| format!("{}s", at.as_second() - issued_at.as_second())),
            rotation_request: status.last_rotation_request.clone(),
            issued_at,
            expires_at,
            previous: (|| {
                Some(PreviousToken {
                    token_hash: status.previous_token_hash.as_deref().and_then(TokenHash::parse)?,
                    valid_until: status.previous_token_valid_until.as_ref()?.0,
                })
            })(),
            end_overlap_request: None,
            // Not in the status: a record rebuilt from it pushes its token once more (the same token).
            idp: None,
            reason: status.token_issue_reason.as_deref().and_then(IssueReason::parse).unwrap_or_else(|| {
                // A status written before it carried the reason: only a first token is known for sure.
                match dir.ready_reason() {
                    Some(ReadyReason::TokenIssued) | None => IssueReason::Initial,
                    Some(_) => IssueReason::RotationGenerationChanged,
                }
            }),
        })
    })();
    StatusView { token_hash, record }
}

/// The status for a token described by `record`, or with the token fields kept as they are when the
/// directory cannot be acted on (invalid spec, conflict).
pub fn with(dir: &ScimDirectory, record: Option<&IssueRecord>, ready: Condition) -> ScimDirectoryStatus {
    let current = dir.status.clone().unwrap_or_default();
    let mut status = match record {
        Some(r) => ScimDirectoryStatus {
            token_hash: Some(r.token_hash.to_string()),
            token_issued_at: Some(Time(r.issued_at)),
            token_expires_at: r.expires_at.map(Time),
            token_issue_reason: Some(r.reason.as_str().into()),
            observed_rotation_generation: Some(r.rotation_generation),
            last_rotation_request: r.rotation_request.clone(),
            previous_token_hash: r.previous.as_ref().map(|p| p.token_hash.to_string()),
            previous_token_valid_until: r.previous.as_ref().map(|p| Time(p.valid_until)),
            ..ScimDirectoryStatus::default()
        },
        None => {
            ScimDirectoryStatus { conditions: vec![], observed_generation: None, secret_name: None, ..current.clone() }
        }
    };
    status.observed_generation = dir.metadata.generation;
    status.secret_name = Some(dir.secret_name());
    // Ready first; the other conditions (the identity provider's) are kept as they are.
    status.conditions =
        std::iter::once(ready).chain(current.conditions.into_iter().filter(|c| c.type_ != "Ready")).collect();
    status
}

/// The status of a directory whose token the operator no longer controls (its Secret is someone
/// else's): no token fields at all, so no verifier accepts the token any longer.
pub fn without_token(dir: &ScimDirectory, ready: Condition) -> ScimDirectoryStatus {
    ScimDirectoryStatus {
        observed_generation: dir.metadata.generation,
        secret_name: Some(dir.secret_name()),
        conditions: vec![ready],
        ..ScimDirectoryStatus::default()
    }
}

pub fn condition(dir: &ScimDirectory, reason: ReadyReason, message: &str, now: Timestamp) -> Condition {
    let status = if reason.is_ready() { "True" } else { "False" };
    // Keep the transition time while the condition's status does not change, so a steady state
    // produces an identical status and therefore no write.
    let last_transition_time = dir
        .ready_condition()
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(Timestamp::from_second(now.as_second()).expect("valid")));
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.as_str().into(),
        message: message.into(),
        observed_generation: dir.metadata.generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScimDirectorySpec;
    use crate::policy::{Desired, new_record};

    #[test]
    fn the_status_reads_back_as_the_record_it_was_derived_from() {
        let mut dir = ScimDirectory::new("acme", ScimDirectorySpec::default());
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let desired = Desired::parse(2, Some("90d"), None, Some("r1")).unwrap();
        let mut record = new_record(&desired, TokenHash::of_bytes(b"new"), IssueReason::RotationRequested, now);
        record.previous = Some(PreviousToken {
            token_hash: TokenHash::of_bytes(b"old"),
            valid_until: "2026-01-01T01:00:00Z".parse().unwrap(),
        });
        let message = format!("{} ({})", record.reason.describe(), record.reason.as_str());
        dir.status = Some(with(&dir, Some(&record), condition(&dir, ReadyReason::TokenRotated, &message, now)));
        let status = dir.status.as_ref().unwrap();
        assert_eq!(status.previous_token_hash.as_deref(), Some(TokenHash::of_bytes(b"old").as_str()));
        assert_eq!(status.secret_name.as_deref(), Some("acme-scim-token"));

        let view = view(&dir);
        assert_eq!(view.token_hash, Some(record.token_hash.clone()));
        // Everything but the end-overlap request (which the status does not carry) reads back.
        assert_eq!(view.record, Some(IssueRecord { end_overlap_request: None, ..record.clone() }));

        // A status for a directory that cannot be acted on keeps the token fields.
        let kept = with(&dir, None, condition(&dir, ReadyReason::SecretConflict, "x", now));
        assert_eq!(kept.token_hash, status.token_hash);
        assert_eq!(kept.previous_token_valid_until, status.previous_token_valid_until);
        assert_eq!(kept.conditions[0].reason, "SecretConflict");
    }

    #[test]
    fn the_issue_reason_reads_back_whatever_the_ready_condition_says() {
        let mut dir = ScimDirectory::new("acme", ScimDirectorySpec::default());
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let desired = Desired::parse(0, Some("90d"), Some("7d"), None).unwrap();
        let record = new_record(&desired, TokenHash::of_bytes(b"t"), IssueReason::RenewalDue, now);
        let rotated = condition(&dir, ReadyReason::TokenRotated, "rotated the token (RenewalDue)", now);
        dir.status = Some(with(&dir, Some(&record), rotated));
        assert_eq!(dir.status.as_ref().unwrap().token_issue_reason.as_deref(), Some("RenewalDue"));
        // Conditions whose message does not end with the reason, written over a token that stands.
        let expired = condition(&dir, ReadyReason::TokenExpired, "the token expired at 2026-04-01T00:00:00Z", now);
        let deferred = condition(&dir, ReadyReason::IssueDeferred, "a new token (TokenChanged) is deferred", now);
        for status in [with(&dir, Some(&record), expired), with(&dir, None, deferred)] {
            let mut later = dir.clone();
            later.status = Some(status);
            assert_eq!(view(&later).record.map(|r| r.reason), Some(IssueReason::RenewalDue), "{:?}", later.status);
        }
        // A status written before it carried the reason.
        let issued = condition(&dir, ReadyReason::TokenIssued, IssueReason::Initial.describe(), now);
        let mut old = dir.clone();
        old.status = Some(ScimDirectoryStatus { token_issue_reason: None, ..with(&dir, Some(&record), issued) });
        assert_eq!(view(&old).record.map(|r| r.reason), Some(IssueReason::Initial));
    }
}
