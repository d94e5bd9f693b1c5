//! `kubectl scim inspect secret NAME`: what the operator recorded on a token Secret, never the token.
//!
//! The Secret is read as the operator reads it ([`ObservedSecret`]): metadata and the SHA-256 of the
//! `token` key, computed as the response is decoded, so no plaintext is kept.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::Api;
use scim_token_operator::policy::{IssueRecord, RecordState};
use scim_token_operator::secret::Seal;
use scim_token_operator::secret::{
    DIRECTORY_ANNOTATION, ObservedSecret, TEMPLATE_ANNOTATION, is_controlled_by, is_directory_controlled, read_record,
};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::human::{at, sanitize};
use crate::output::{OutputFormat, print_data};

/// What `inspect secret -o json|yaml` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    pub namespace: String,
    pub secret: String,
    /// The ScimDirectory holding the Secret's controller reference, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// The directory the record names (`scim.tokenops.dev/directory`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_directory: Option<String>,
    /// `Valid`, `Absent` or `Forged`.
    pub record_state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forged_because: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordView>,
    /// Whether the record carries a seal (`scim.tokenops.dev/record-seal`). Only the operator holds
    /// the key that checks it; a record without one was not written by the operator (or by a version
    /// before seals), and is believed only as far as the directory's status agrees with it.
    pub sealed: bool,
    /// SHA-256 of the token the Secret holds now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_token_hash: Option<String>,
    /// The `scim.tokenops.dev/` annotations as found, for an absent or forged record.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordView {
    pub token_hash: String,
    pub issue_reason: String,
    pub rotation_generation: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_request: Option<String>,
    /// Canonical lifetime (`"7776000s"`); absent for a token that never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_expires_in: Option<String>,
    pub issued_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_token_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_token_valid_until: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_overlap_request: Option<String>,
    /// When the token was pushed to the identity provider (spec.identityProvider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushed_to_identity_provider_at: Option<Timestamp>,
    /// When the identity provider first ran successfully with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_provider_synced_at: Option<Timestamp>,
}

impl From<&IssueRecord> for RecordView {
    fn from(r: &IssueRecord) -> RecordView {
        RecordView {
            token_hash: r.token_hash.to_string(),
            issue_reason: r.reason.as_str().to_owned(),
            rotation_generation: r.rotation_generation,
            rotation_request: r.rotation_request.clone(),
            token_expires_in: r.expires_in.clone(),
            issued_at: r.issued_at,
            expires_at: r.expires_at,
            previous_token_hash: r.previous.as_ref().map(|p| p.token_hash.to_string()),
            previous_token_valid_until: r.previous.as_ref().map(|p| p.valid_until),
            end_overlap_request: r.end_overlap_request.clone(),
            pushed_to_identity_provider_at: r.idp.as_ref().map(|p| p.pushed_at),
            identity_provider_synced_at: r.idp.as_ref().and_then(|p| p.synced_at),
        }
    }
}

pub async fn secret(cluster: &Cluster, name: &str, output: Option<OutputFormat>) -> anyhow::Result<()> {
    let api: Api<ObservedSecret> = cluster.namespaced();
    let what = format!("Secret {name:?} in namespace {:?}", cluster.namespace);
    let secret = match api.get_opt(name).await.map_err(|e| cluster.fail(e, &what))? {
        Some(secret) => secret,
        // `inspect secret acme` for directory acme: its Secret is meant.
        None => match cluster.directories().get_opt(name).await.ok().flatten() {
            Some(dir) => {
                let secret_name = dir.secret_name();
                eprintln!("{}", sanitize(&format!("ScimDirectory {name} writes Secret {secret_name}:")));
                let what =
                    format!("Secret {secret_name:?} of ScimDirectory {name:?} in namespace {:?}", cluster.namespace);
                api.get(&secret_name).await.map_err(|e| cluster.fail(e, &what))?
            }
            None => anyhow::bail!("{what} not found"),
        },
    };
    // The controller reference is checked against the live directory, by UID: a recreated directory of
    // the same name does not own its predecessor's Secret.
    let owner = secret.metadata.owner_references.iter().flatten().find(|r| r.controller == Some(true));
    let controller = match owner {
        Some(owner) if is_directory_controlled(&secret.metadata) => {
            let live = cluster.directories().get_opt(&owner.name).await.ok().flatten();
            Some(match live {
                Some(dir) if is_controlled_by(&dir, &secret.metadata) => owner.name.clone(),
                Some(_) => format!("{} (a former directory of that name: the UID differs)", owner.name),
                None => format!("{} (not found: deleted, or not readable)", owner.name),
            })
        }
        _ => None,
    };
    let inspection = inspect(&secret, controller, &cluster.namespace);
    match output {
        Some(format) => print_data(format, &inspection),
        None => {
            print!("{}", render(&inspection, Timestamp::now()));
            Ok(())
        }
    }
}

/// The inspection of a Secret already read. Pure.
pub fn inspect(secret: &ObservedSecret, controller: Option<String>, namespace: &str) -> Inspection {
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let state = read_record(&annotations);
    let (record_state, forged_because, record) = match &state {
        // Read here without the key: consistent, its seal unchecked (only the operator holds the key).
        RecordState::Valid(record) | RecordState::Unsealed(record) => ("Valid", None, Some(RecordView::from(record))),
        RecordState::Absent => ("Absent", None, None),
        RecordState::Forged(why) => ("Forged", Some(why.clone()), None),
    };
    let ours: BTreeMap<String, String> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with("scim.tokenops.dev/") && k.as_str() != TEMPLATE_ANNOTATION)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Inspection {
        namespace: namespace.to_owned(),
        secret: secret.metadata.name.clone().unwrap_or_default(),
        controller,
        recorded_directory: annotations.get(DIRECTORY_ANNOTATION).cloned(),
        record_state: record_state.to_owned(),
        forged_because,
        record,
        sealed: annotations.get(scim_token_operator::secret::SEAL_ANNOTATION).is_some_and(|v| Seal::parse(v).is_some()),
        stored_token_hash: secret.token_hash.as_ref().map(|h| h.to_string()),
        annotations: if matches!(state, RecordState::Valid(_)) { BTreeMap::new() } else { ours },
    }
}

/// `key: value` lines, like `kubectl describe`.
pub fn render(i: &Inspection, now: Timestamp) -> String {
    let mut lines: Vec<(&str, String)> = vec![("Secret", format!("{}/{}", i.namespace, i.secret))];
    lines.push((
        "Managed by",
        match &i.controller {
            Some(dir) => format!("ScimDirectory {dir}"),
            None => "no ScimDirectory (no controller reference to one): the operator does not manage it".to_owned(),
        },
    ));
    let stored = i.stored_token_hash.clone().unwrap_or_else(|| "none (no token key)".to_owned());
    match &i.record {
        Some(r) => record_lines(&mut lines, i, r, &stored, now),
        None => unreadable_record_lines(&mut lines, i, stored),
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    lines
        .into_iter()
        .map(|(k, v)| {
            let label = if k.is_empty() { String::new() } else { format!("{k}:") };
            format!("{label:width$}{}\n", sanitize(&v))
        })
        .collect()
}

/// The lines of a readable record: what the token was issued for, and whether it is still the one stored.
fn record_lines(lines: &mut Vec<(&str, String)>, i: &Inspection, r: &RecordView, stored: &str, now: Timestamp) {
    lines.push(("Record", "valid".to_owned()));
    lines.push((
        "Seal",
        if i.sealed {
            "present (checked by the operator, which alone holds the key)".to_owned()
        } else {
            "NONE: not written by the operator; it re-seals the record if the directory's status \
             agrees with it, else replaces the token (RecordTampered)"
                .to_owned()
        },
    ));
    if let Some(dir) = &i.recorded_directory {
        lines.push(("Directory", dir.clone()));
    }
    lines.push(("Issue reason", r.issue_reason.clone()));
    if let Some(reason) = scim_token_operator::policy::IssueReason::parse(&r.issue_reason) {
        lines.push(("", reason.describe().to_owned()));
    }
    lines.push(("Rotation generation", r.rotation_generation.to_string()));
    lines.push(("Rotation request", r.rotation_request.clone().unwrap_or_else(|| "-".to_owned())));
    lines.push(("Token hash", r.token_hash.clone()));
    let matches = if i.stored_token_hash.as_deref() == Some(r.token_hash.as_str()) {
        "(matches the record)".to_owned()
    } else {
        "(does NOT match the record: the token was changed outside the operator, which re-issues it)".to_owned()
    };
    lines.push(("Stored token", format!("{stored} {matches}")));
    lines.push((
        "Lifetime",
        r.token_expires_in
            .as_deref()
            .and_then(|l| l.parse::<scim_token_operator::duration::TokenLifetime>().ok())
            .map_or_else(|| "never expires".to_owned(), |l| l.to_string()),
    ));
    lines.push(("Issued at", at(r.issued_at, now)));
    lines.push(("Expires at", r.expires_at.map_or_else(|| "never".to_owned(), |t| at(t, now))));
    lines.push((
        "Previous token",
        match (&r.previous_token_hash, r.previous_token_valid_until) {
            (Some(hash), Some(until)) => format!("{hash}, valid until {}", at(until, now)),
            _ => "none".to_owned(),
        },
    ));
    if let Some(request) = &r.end_overlap_request {
        lines.push(("End-overlap request", request.clone()));
    }
    if let Some(pushed) = r.pushed_to_identity_provider_at {
        let synced = r.identity_provider_synced_at.map_or_else(
            || "; not yet run with it".to_owned(),
            |t| format!("; it ran with it successfully at {}", at(t, now)),
        );
        lines.push(("Identity provider", format!("pushed at {}{synced}", at(pushed, now))));
    }
}

/// The lines of a forged or absent record: why, and its annotations as found.
fn unreadable_record_lines(lines: &mut Vec<(&str, String)>, i: &Inspection, stored: String) {
    let state = match &i.forged_because {
        Some(why) => {
            format!("FORGED: {why}; edited outside the operator, which re-issues the token (RecordTampered)")
        }
        None => "absent or unreadable: the operator restores it from the directory's status if that \
                 vouches for the token, else re-issues the token"
            .to_owned(),
    };
    lines.push(("Record", state));
    lines.push(("Stored token", stored));
    for (k, v) in &i.annotations {
        lines.push(("Annotation", format!("{k}={v}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use scim_token_operator::secret::{EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION};
    use scim_token_operator::token::Token;

    fn secret(token: &Token, annotations: &[(&str, &str)]) -> ObservedSecret {
        ObservedSecret::of(&Secret {
            metadata: ObjectMeta {
                name: Some("acme-scim-token".into()),
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..ObjectMeta::default()
            },
            data: Some([("token".to_owned(), ByteString(token.expose().as_bytes().to_vec()))].into()),
            ..Secret::default()
        })
    }

    #[test]
    fn a_valid_record_is_shown_in_full_and_never_the_token() {
        let token = Token::generate();
        let hash = token.hash().to_string();
        let annotations = [
            ("scim.tokenops.dev/directory", "acme"),
            ("scim.tokenops.dev/token-hash", hash.as_str()),
            ("scim.tokenops.dev/rotation-generation", "2"),
            ("scim.tokenops.dev/rotation-request", "r1"),
            ("scim.tokenops.dev/token-expires-in", "7776000s"),
            (ISSUED_AT_ANNOTATION, "2026-01-01T00:00:00Z"),
            (EXPIRES_AT_ANNOTATION, "2026-04-01T00:00:00Z"),
            ("scim.tokenops.dev/issue-reason", "RotationRequested"),
        ];
        let i = inspect(&secret(&token, &annotations), Some("acme".into()), "t");
        assert_eq!(i.record_state, "Valid");
        let r = i.record.as_ref().unwrap();
        assert_eq!((r.rotation_generation, r.rotation_request.as_deref()), (2, Some("r1")));
        assert_eq!(r.expires_at, Some("2026-04-01T00:00:00Z".parse().unwrap()));
        let out = render(&i, "2026-03-01T00:00:00Z".parse().unwrap());
        for want in [
            "Secret:",
            "t/acme-scim-token",
            "ScimDirectory acme",
            "RotationRequested",
            "requested with the scim.tokenops.dev/rotate annotation",
            "(matches the record)",
            "Lifetime:",
            "90d",
            "2026-04-01T00:00:00Z (in 31d)",
            "Previous token:",
        ] {
            assert!(out.contains(want), "{want:?} missing:\n{out}");
        }
        assert!(!out.contains(&token.expose()[5..]));
        assert!(!serde_json::to_string(&i).unwrap().contains(&token.expose()[5..]));

        // An expiry pushed out by hand: forged, with the annotations as found.
        let mut forged = annotations.to_vec();
        forged[6] = (EXPIRES_AT_ANNOTATION, "2099-01-01T00:00:00Z");
        let i = inspect(&secret(&token, &forged), None, "t");
        assert_eq!(i.record_state, "Forged");
        let out = render(&i, "2026-03-01T00:00:00Z".parse().unwrap());
        assert!(out.contains("FORGED: scim.tokenops.dev/expires-at is not"), "{out}");
        assert!(out.contains("scim.tokenops.dev/expires-at=2099-01-01T00:00:00Z"), "{out}");
        assert!(out.contains("no ScimDirectory"), "{out}");

        // Stripped: absent.
        let i = inspect(&secret(&token, &[]), Some("acme".into()), "t");
        assert_eq!(i.record_state, "Absent");
        assert!(render(&i, Timestamp::now()).contains("absent or unreadable"));
    }

    #[test]
    fn annotation_values_cannot_steer_the_terminal() {
        let token = Token::generate();
        let hash = token.hash().to_string();
        let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{202e}\nStored token: forged";
        let annotations = [
            ("scim.tokenops.dev/directory", evil),
            ("scim.tokenops.dev/token-hash", hash.as_str()),
            ("scim.tokenops.dev/rotation-generation", "0"),
            ("scim.tokenops.dev/rotation-request", evil),
            ("scim.tokenops.dev/end-overlap-request", evil),
            ("scim.tokenops.dev/token-expires-in", "never"),
            (ISSUED_AT_ANNOTATION, "2026-01-01T00:00:00Z"),
            ("scim.tokenops.dev/issue-reason", "Initial"),
        ];
        let valid = inspect(&secret(&token, &annotations), Some(format!("acme{evil}")), evil);
        assert_eq!(valid.record_state, "Valid");
        let mut forged = annotations.to_vec();
        forged.push((EXPIRES_AT_ANNOTATION, evil));
        let forged = inspect(&secret(&token, &forged), None, "t");
        assert_eq!(forged.record_state, "Forged");
        for i in [valid, forged] {
            let out = render(&i, "2026-03-01T00:00:00Z".parse().unwrap());
            for c in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
                assert!(!out.contains(c), "{c:?} in {out:?}");
            }
            assert!(out.contains("\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u{202e}\\nStored token: forged"), "{out}");
            assert_eq!(out.lines().filter(|l| l.starts_with("Stored token:")).count(), 1, "no forged line: {out}");
        }
    }
}
