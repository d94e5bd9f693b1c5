//! `kubectl scim status [NAME]`: the directories, their tokens and, for one that is not Ready, what
//! is wrong and what to do, in one sentence.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use scim_token_operator::api::{ROTATE_ANNOTATION, ReadyReason, ScimDirectory};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::human::{at, relative, sanitize, short_hash, table, whole_seconds};
use crate::output::{OutputFormat, print_data};

/// What `status -o json|yaml` prints for a directory.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub namespace: String,
    pub name: String,
    /// `True`, `False`, or `Unknown` before the operator reported.
    pub ready: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub secret_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_issued_at: Option<Timestamp>,
    /// Absent: the token never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_token_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_token_valid_until: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rotation_request: Option<String>,
    /// A `scim.tokenops.dev/rotate` value the operator has not acted on yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_rotation_request: Option<String>,
    /// What is wrong and what to do, for a directory that is not Ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event: Option<EventSummary>,
    /// The push to the identity provider (spec.identityProvider): its `IdentityProviderSynced`
    /// condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_provider: Option<IdpSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdpSummary {
    /// `True` once the identity provider has run successfully with the current token.
    pub synced: String,
    pub reason: String,
    pub message: String,
    pub since: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventSummary {
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub time: Timestamp,
}

pub async fn run(
    cluster: &Cluster,
    name: Option<&str>,
    all_namespaces: bool,
    output: Option<OutputFormat>,
) -> anyhow::Result<()> {
    let now = Timestamp::now();
    let dirs: Vec<ScimDirectory> = match name {
        Some(name) => {
            let dir =
                cluster.directories().get(name).await.map_err(|e| cluster.fail(e, &cluster.directory_ref(name)))?;
            vec![dir]
        }
        None => {
            let (api, what) = if all_namespaces {
                (Api::<ScimDirectory>::all(cluster.client.clone()), "ScimDirectories in all namespaces".to_owned())
            } else {
                (cluster.directories(), format!("ScimDirectories in namespace {:?}", cluster.namespace))
            };
            let mut items = api.list(&ListParams::default()).await.map_err(|e| cluster.fail(e, &what))?.items;
            items.sort_by_key(|d| (d.namespace(), d.name_any()));
            items
        }
    };
    let events = last_events(cluster, name, all_namespaces).await;
    let summaries: Vec<Summary> = dirs
        .iter()
        .map(|d| summarize(d, d.meta().uid.as_ref().and_then(|uid| events.get(uid)).cloned(), now))
        .collect();

    if let Some(format) = output {
        return match name {
            Some(_) => print_data(format, &summaries[0]),
            None => print_data(format, &serde_json::json!({ "items": summaries })),
        };
    }
    if summaries.is_empty() {
        if all_namespaces {
            eprintln!("No ScimDirectories found.");
        } else {
            eprintln!("No ScimDirectories found in namespace {}.", sanitize(&cluster.namespace));
        }
        return Ok(());
    }
    print!("{}", render(&summaries, all_namespaces, now));
    if name.is_some()
        && let Some(event) = &summaries[0].last_event
    {
        println!("{}", last_event_line(event, now));
    }
    Ok(())
}

/// `Last event: Warning SecretConflict (5m ago): <message>`, below the table of one directory.
fn last_event_line(event: &EventSummary, now: Timestamp) -> String {
    let line =
        format!("Last event: {} {} ({}): {}", event.type_, event.reason, relative(event.time, now), event.message);
    sanitize(&line).into_owned()
}

/// The newest Event about each ScimDirectory (by UID) in scope. Events are context, not the answer:
/// without permission to list them the column stays empty.
async fn last_events(cluster: &Cluster, name: Option<&str>, all_namespaces: bool) -> HashMap<String, EventSummary> {
    let api: Api<Event> = if all_namespaces { Api::all(cluster.client.clone()) } else { cluster.namespaced::<Event>() };
    let mut fields = "involvedObject.kind=ScimDirectory".to_owned();
    if let Some(name) = name {
        fields.push_str(&format!(",involvedObject.name={name}"));
    }
    let Ok(list) = api.list(&ListParams::default().fields(&fields)).await else { return HashMap::new() };
    let mut newest: HashMap<String, EventSummary> = HashMap::new();
    for event in list.items {
        let Some(uid) = event.involved_object.uid.clone() else { continue };
        let Some(time) = event_time(&event) else { continue };
        if newest.get(&uid).is_some_and(|e| e.time >= time) {
            continue;
        }
        let summary = EventSummary {
            type_: event.type_.clone().unwrap_or_else(|| "Normal".into()),
            reason: event.reason.clone().unwrap_or_default(),
            message: event.message.clone().unwrap_or_default(),
            time,
        };
        newest.insert(uid, summary);
    }
    newest
}

/// When an Event last happened: the series' last observation, else its last or only occurrence.
fn event_time(event: &Event) -> Option<Timestamp> {
    [
        event.series.as_ref().and_then(|s| s.last_observed_time.as_ref()).map(|t| t.0),
        event.last_timestamp.as_ref().map(|t| t.0),
        event.event_time.as_ref().map(|t| t.0),
        event.metadata.creation_timestamp.as_ref().map(|t| t.0),
    ]
    .into_iter()
    .flatten()
    .max()
}

/// The directory as `status` shows it. Pure.
pub fn summarize(dir: &ScimDirectory, last_event: Option<EventSummary>, now: Timestamp) -> Summary {
    let status = dir.status.clone().unwrap_or_default();
    let ready = dir.ready_condition();
    let pending = dir.rotation_request().filter(|r| status.last_rotation_request.as_deref() != Some(*r));
    Summary {
        namespace: dir.namespace().unwrap_or_default(),
        name: dir.name_any(),
        ready: ready.map_or_else(|| "Unknown".to_owned(), |c| c.status.clone()),
        reason: ready.map(|c| c.reason.clone()),
        message: ready.map(|c| c.message.clone()),
        secret_name: status.secret_name.clone().unwrap_or_else(|| dir.secret_name()),
        token_hash: status.token_hash.clone(),
        token_issued_at: status.token_issued_at.map(|t| t.0),
        token_expires_at: status.token_expires_at.map(|t| t.0),
        previous_token_hash: status.previous_token_hash.clone(),
        previous_token_valid_until: status.previous_token_valid_until.map(|t| t.0),
        last_rotation_request: status.last_rotation_request.clone(),
        pending_rotation_request: pending.map(str::to_owned),
        explanation: explain(dir, now),
        last_event,
        identity_provider: status.conditions.iter().find(|c| c.type_ == scim_token_operator::entra::CONDITION).map(
            |c| IdpSummary {
                synced: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                since: c.last_transition_time.0,
            },
        ),
    }
}

/// One sentence on why a directory is not Ready and what to do about it; `None` when it is Ready.
/// Pure: keyed on the Ready condition's reason.
pub fn explain(dir: &ScimDirectory, now: Timestamp) -> Option<String> {
    let name = dir.name_any();
    let ns = dir.namespace().unwrap_or_default();
    let secret = dir.status.as_ref().and_then(|s| s.secret_name.clone()).unwrap_or_else(|| dir.secret_name());
    let Some(ready) = dir.ready_condition() else {
        return Some(format!(
            "The operator has not reported on this directory yet: check that scim-token-operator is running and \
             watches namespace {ns}."
        ));
    };
    if ready.status == "True" {
        return None;
    }
    let message = ready.message.trim_end_matches('.');
    Some(match ReadyReason::parse(&ready.reason) {
        Some(ReadyReason::TokenExpired) => {
            let when = dir
                .status
                .as_ref()
                .and_then(|s| s.token_expires_at.as_ref())
                .map(|t| format!(" {}", relative(t.0, now)))
                .unwrap_or_default();
            format!(
                "The token expired{when}, so the identity provider's requests are refused: rotate it \
                 (kubectl scim rotate {name} --wait), give the new one to the identity provider (kubectl scim token \
                 {name}), and consider spec.renewBefore to renew it automatically."
            )
        }
        Some(ReadyReason::SecretConflict) => format!(
            "Secret {secret} exists but is not managed by this directory, so no token is written to it: delete that \
             Secret if nothing needs it, or create a directory with another spec.secretName."
        ),
        Some(ReadyReason::InvalidSpec) => format!(
            "The spec cannot be acted on ({message}): fix it (kubectl edit scimdir {name} -n {ns}); nothing is \
             written until then."
        ),
        Some(ReadyReason::IssueDeferred) => format!(
            "An automatic re-issue waits for the operator's minimum interval between issues and will happen by \
             itself; if this keeps coming back, something else is rewriting Secret {secret}."
        ),
        Some(ReadyReason::SecretWriteFailed) => format!(
            "The API server refused the operator's write to Secret {secret} ({message}): check the operator's RBAC, \
             admission policies and whether the Secret is immutable; the operator retries with backoff."
        ),
        // A True reason with status False, or a reason from another version of the operator.
        Some(ReadyReason::TokenIssued | ReadyReason::TokenRotated) | None => {
            format!("Ready is False ({}): {message}.", ready.reason)
        }
    })
}

/// The table, then one line per directory that needs attention.
pub fn render(summaries: &[Summary], all_namespaces: bool, now: Timestamp) -> String {
    let mut headers = vec!["NAME", "READY", "REASON", "TOKEN", "ISSUED", "EXPIRES", "OVERLAP", "LAST EVENT"];
    // The identity provider's state, only when some directory pushes to one.
    let idp = summaries.iter().any(|s| s.identity_provider.is_some());
    if idp {
        headers.insert(headers.len() - 1, "IDP");
    }
    if all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    let dash = || "-".to_owned();
    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|s| {
            let mut row = vec![
                s.name.clone(),
                s.ready.clone(),
                s.reason.clone().unwrap_or_else(dash),
                s.token_hash.as_deref().map_or_else(dash, short_hash),
                s.token_issued_at.map_or_else(dash, |t| relative(t, now)),
                match (&s.token_hash, s.token_expires_at) {
                    (None, _) => dash(),
                    (Some(_), None) => "never".to_owned(),
                    (Some(_), Some(t)) => at(t, now),
                },
                overlap(s, now),
                s.last_event.as_ref().map_or_else(dash, |e| {
                    let kind = if e.type_ == "Normal" { String::new() } else { format!("{} ", e.type_) };
                    format!("{kind}{} ({})", e.reason, relative(e.time, now))
                }),
            ];
            if idp {
                let state = s.identity_provider.as_ref().map_or_else(dash, |i| i.reason.clone());
                row.insert(row.len() - 1, state);
            }
            if all_namespaces {
                row.insert(0, s.namespace.clone());
            }
            // Sanitized before the widths are measured, so escapes keep the columns aligned.
            row.into_iter().map(|cell| sanitize(&cell).into_owned()).collect()
        })
        .collect();
    let mut out = table(&headers, &rows);
    for s in summaries {
        let who = if all_namespaces { format!("{}/{}", s.namespace, s.name) } else { s.name.clone() };
        if let Some(explanation) = &s.explanation {
            out.push_str(&format!("\n{}", sanitize(&format!("{who}: {explanation}"))));
        }
        if let Some(i) = s.identity_provider.as_ref().filter(|i| i.synced != "True") {
            let line = format!("{who}: identity provider {} since {}: {}", i.reason, relative(i.since, now), i.message);
            out.push_str(&format!("\n{}", sanitize(&line)));
        }
        if let Some(request) = &s.pending_rotation_request {
            let line =
                format!("{who}: rotation requested ({ROTATE_ANNOTATION}={request}), not acted on yet by the operator.");
            out.push_str(&format!("\n{}", sanitize(&line)));
        }
    }
    if summaries.iter().any(|s| {
        s.explanation.is_some()
            || s.pending_rotation_request.is_some()
            || s.identity_provider.as_ref().is_some_and(|i| i.synced != "True")
    }) {
        out.push('\n');
    }
    out
}

/// `previous valid until <time> (in 5m)` during a rotation overlap.
fn overlap(s: &Summary, now: Timestamp) -> String {
    match (&s.previous_token_hash, s.previous_token_valid_until) {
        (Some(_), Some(until)) if until > now => format!("previous valid until {}", at(until, now)),
        (Some(_), Some(until)) => format!("ended {}", relative(whole_seconds(until), now)),
        _ => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use scim_token_operator::api::{ScimDirectorySpec, ScimDirectoryStatus};

    const HASH: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn dir(reason: Option<(&str, &str, &str)>) -> ScimDirectory {
        let mut d = ScimDirectory::new("acme", ScimDirectorySpec::default());
        d.metadata.namespace = Some("tenants".into());
        d.status = Some(ScimDirectoryStatus {
            token_hash: Some(HASH.into()),
            token_issued_at: Some(Time(t("2026-01-01T00:00:00Z"))),
            token_expires_at: Some(Time(t("2026-01-11T00:00:00Z"))),
            secret_name: Some("acme-scim-token".into()),
            conditions: reason
                .map(|(status, reason, message)| Condition {
                    type_: "Ready".into(),
                    status: status.into(),
                    reason: reason.into(),
                    message: message.into(),
                    observed_generation: None,
                    last_transition_time: Time(t("2026-01-01T00:00:00Z")),
                })
                .into_iter()
                .collect(),
            ..ScimDirectoryStatus::default()
        });
        d
    }

    #[test]
    fn every_not_ready_reason_is_explained_with_what_to_do() {
        let now = t("2026-01-12T00:00:00Z");
        assert_eq!(explain(&dir(Some(("True", "TokenIssued", "issued"))), now), None);
        let cases = [
            ("TokenExpired", "the token expired at …", "expired 24h ago"),
            ("TokenExpired", "", "kubectl scim rotate acme --wait"),
            ("SecretConflict", "Secret acme-scim-token exists …", "Secret acme-scim-token exists but is not managed"),
            ("InvalidSpec", "spec.tokenExpiresIn: must be between 1h and 3650d", "(spec.tokenExpiresIn: must be"),
            ("InvalidSpec", "x", "kubectl edit scimdir acme -n tenants"),
            ("IssueDeferred", "deferred", "will happen by itself"),
            ("SecretWriteFailed", "the API server refused to write Secret acme-scim-token: immutable", "immutable"),
            ("SecretWriteFailed", "x", "RBAC"),
            ("SomethingNew", "odd.", "Ready is False (SomethingNew): odd."),
        ];
        for (reason, message, want) in cases {
            let explained = explain(&dir(Some(("False", reason, message))), now).unwrap();
            assert!(explained.contains(want), "{reason}: {explained:?} lacks {want:?}");
            assert!(!explained.contains('\n') && explained.ends_with('.'), "{explained:?}");
            assert_eq!(explained.matches(". ").count(), 0, "one sentence: {explained:?}");
        }
        let unreported = explain(&dir(None), now).unwrap();
        assert!(unreported.contains("not reported") && unreported.contains("tenants"), "{unreported}");
    }

    #[test]
    fn the_identity_providers_state_shows_when_a_directory_pushes_to_one() {
        let now = t("2026-01-08T00:00:00Z");
        let plain = summarize(&dir(Some(("True", "TokenIssued", "issued"))), None, now);
        assert!(!render(std::slice::from_ref(&plain), false, now).contains("IDP"), "no column without an IdP");
        let mut d = dir(Some(("True", "TokenRotated", "rotated")));
        d.status.as_mut().unwrap().conditions.push(Condition {
            type_: "IdentityProviderSynced".into(),
            status: "False".into(),
            reason: "PushFailed".into(),
            message: "PUT synchronization/secrets failed: HTTP 403, Authorization_RequestDenied: no".into(),
            observed_generation: None,
            last_transition_time: Time(t("2026-01-07T23:58:00Z")),
        });
        let s = summarize(&d, None, now);
        assert_eq!(s.identity_provider.as_ref().map(|i| i.reason.as_str()), Some("PushFailed"));
        let out = render(&[s.clone(), plain], false, now);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("OVERLAP   IDP          LAST EVENT"), "{out}");
        assert!(lines[1].contains("PushFailed") && lines[2].contains(" -  "), "{out}");
        assert!(
            out.contains(
                "acme: identity provider PushFailed since 2m ago: PUT synchronization/secrets failed: HTTP 403"
            ),
            "{out}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["identityProvider"]["synced"], "False");
    }

    #[test]
    fn the_table_shows_hash_expiry_overlap_and_the_last_event() {
        let now = t("2026-01-08T00:00:00Z");
        let mut d = dir(Some(("True", "TokenRotated", "rotated")));
        let status = d.status.as_mut().unwrap();
        status.previous_token_hash = Some(HASH.replace("ba78", "0000"));
        status.previous_token_valid_until = Some(Time(t("2026-01-08T00:05:00Z")));
        let event = EventSummary {
            type_: "Normal".into(),
            reason: "RotationRequested".into(),
            message: "rotated".into(),
            time: t("2026-01-07T23:58:00Z"),
        };
        let s = summarize(&d, Some(event), now);
        assert_eq!(s.explanation, None);
        let out = render(std::slice::from_ref(&s), false, now);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME   READY   REASON"), "{out}");
        for want in [
            "acme",
            "True",
            "sha256:ba7816bf8f01",
            "7d ago",
            "2026-01-11T00:00:00Z (in 3d)",
            "previous valid until 2026-01-08T00:05:00Z (in 5m)",
            "RotationRequested (2m ago)",
        ] {
            assert!(lines[1].contains(want), "{want:?} missing: {out}");
        }
        assert_eq!(lines.len(), 2);

        // Past the overlap, a pending request, all namespaces, a perpetual token.
        let later = t("2026-01-09T00:00:00Z");
        d.metadata.annotations = Some([(ROTATE_ANNOTATION.to_owned(), "r2".to_owned())].into());
        d.status.as_mut().unwrap().token_expires_at = None;
        let out = render(&[summarize(&d, None, later)], true, later);
        assert!(out.starts_with("NAMESPACE   NAME"), "{out}");
        assert!(out.contains("never") && out.contains("ended 23h ago"), "{out}");
        assert!(out.contains("tenants/acme: rotation requested (scim.tokenops.dev/rotate=r2)"), "{out}");

        // Not ready: the explanation follows the table.
        let much_later = t("2026-01-14T00:00:00Z");
        let expired = summarize(&dir(Some(("False", "TokenExpired", "expired"))), None, much_later);
        assert_eq!(expired.ready, "False");
        let out = render(&[expired], false, much_later);
        assert!(out.contains("\nacme: The token expired 3d ago"), "{out}");
    }

    /// No raw control or bidi character from the cluster reaches the terminal.
    fn assert_terminal_safe(out: &str) {
        for c in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}', '\r'] {
            assert!(!out.contains(c), "{c:?} in {out:?}");
        }
    }

    #[test]
    fn tenant_written_text_cannot_steer_the_terminal() {
        let now = t("2026-01-12T00:00:00Z");
        let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{202e}\r";
        let mut d = dir(Some(("False", "InvalidSpec", &format!("bad {evil}\nacme: forged line"))));
        d.metadata.annotations = Some([(ROTATE_ANNOTATION.to_owned(), format!("r{evil}"))].into());
        let event = EventSummary {
            type_: format!("Warning{evil}"),
            reason: format!("Reason{evil}"),
            message: format!("message{evil}\nforged"),
            time: t("2026-01-11T23:58:00Z"),
        };
        let s = summarize(&d, Some(event.clone()), now);
        let out = render(std::slice::from_ref(&s), true, now);
        assert_terminal_safe(&out);
        assert!(out.contains("\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u{202e}\\r"), "shown escaped: {out}");
        // The table, the explanation, the pending request: no line forged by a newline in a message.
        assert_eq!(out.lines().filter(|l| !l.is_empty()).count(), 4, "{out}");
        let line = last_event_line(&event, now);
        assert_terminal_safe(&line);
        assert!(!line.contains('\n') && line.contains("message\\x1b]0;pwned"), "{line:?}");
    }
}
