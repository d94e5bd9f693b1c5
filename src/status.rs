//! The directory's status, derived from an issue record: pure functions, so that what the status
//! says is decided in one place and tested without a cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::{ScimDirectory, ScimDirectoryStatus};
use crate::policy::{IssueReason, IssueRecord, StatusView};
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
            reason: match dir.ready_condition().map(|c| c.reason.as_str()) {
                Some("TokenIssued") | None => IssueReason::Initial,
                _ => status_reason(dir).unwrap_or(IssueReason::RotationGenerationChanged),
            },
        })
    })();
    StatusView { token_hash, record }
}

fn status_reason(dir: &ScimDirectory) -> Option<IssueReason> {
    let message = &dir.ready_condition()?.message;
    IssueReason::ALL.into_iter().find(|r| message.ends_with(&format!("({})", r.as_str())))
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
            observed_rotation_generation: Some(r.rotation_generation),
            last_rotation_request: r.rotation_request.clone(),
            ..ScimDirectoryStatus::default()
        },
        None => {
            ScimDirectoryStatus { conditions: vec![], observed_generation: None, secret_name: None, ..current.clone() }
        }
    };
    status.observed_generation = dir.metadata.generation;
    status.secret_name = Some(dir.secret_name());
    status.conditions = vec![ready];
    status
}

pub fn condition(dir: &ScimDirectory, ready: bool, reason: &str, message: &str, now: Timestamp) -> Condition {
    let status = if ready { "True" } else { "False" };
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
        reason: reason.into(),
        message: message.into(),
        observed_generation: dir.metadata.generation,
        last_transition_time,
    }
}
