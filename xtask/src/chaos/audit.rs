//! What the API server's audit log says the replicas wrote: every successful write to a Secret or a
//! ScimDirectory in the namespace, by process (each has its own client certificate). From it: the
//! interval in which each process wrote (no two may overlap), writes to Secrets that are not token
//! Secrets, and Secret writes per directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::replicas::USER_PREFIX;

/// The audit policy of the run: metadata only (never a request body, so no token reaches the
/// audit log), for writes to the resources the operator writes; Leases too, to explain failovers.
pub(crate) const POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
  resources:
  - group: ""
    resources: [secrets]
  - group: scim.tokenops.dev
    resources: [scimdirectories, scimdirectories/status]
  - group: coordination.k8s.io
    resources: [leases]
- level: None
"#;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Write {
    pub(crate) user: String,
    pub(crate) at: Timestamp,
    pub(crate) verb: String,
    /// `secrets`, `scimdirectories`, `scimdirectories/status` or `leases`.
    pub(crate) resource: String,
    pub(crate) name: String,
}

/// Successful writes by the replicas in `namespace`, in the order received.
pub(crate) fn writes(audit_log: &Path, namespace: &str) -> Result<Vec<Write>> {
    let text = std::fs::read_to_string(audit_log).with_context(|| format!("reading {}", audit_log.display()))?;
    let mut out: Vec<Write> = text.lines().filter_map(|line| parse(line, namespace)).collect();
    out.sort_by_key(|w| w.at);
    Ok(out)
}

fn parse(line: &str, namespace: &str) -> Option<Write> {
    let e: Value = serde_json::from_str(line).ok()?;
    let user = e["user"]["username"].as_str()?;
    let object = &e["objectRef"];
    if !user.starts_with(USER_PREFIX) || object["namespace"].as_str() != Some(namespace) {
        return None;
    }
    let code = e["responseStatus"]["code"].as_i64()?;
    if !(200..300).contains(&code) {
        return None;
    }
    let resource = match object["subresource"].as_str() {
        Some(sub) if !sub.is_empty() => format!("{}/{sub}", object["resource"].as_str()?),
        _ => object["resource"].as_str()?.to_string(),
    };
    Some(Write {
        user: user.to_string(),
        at: e["requestReceivedTimestamp"].as_str()?.parse().ok()?,
        verb: e["verb"].as_str()?.to_string(),
        resource,
        name: object["name"].as_str().unwrap_or_default().to_string(),
    })
}

/// A process's first and last write to the state (Secrets, ScimDirectories); Leases are left out,
/// a standby writes one to take over.
#[derive(Clone, Debug)]
pub(crate) struct Term {
    pub(crate) user: String,
    pub(crate) first: Timestamp,
    pub(crate) last: Timestamp,
    pub(crate) writes: usize,
}

pub(crate) fn terms(writes: &[Write]) -> Vec<Term> {
    let mut by_user: BTreeMap<&str, Term> = BTreeMap::new();
    for w in writes.iter().filter(|w| w.resource != "leases") {
        by_user
            .entry(&w.user)
            .and_modify(|t| {
                t.first = t.first.min(w.at);
                t.last = t.last.max(w.at);
                t.writes += 1;
            })
            .or_insert(Term { user: w.user.clone(), first: w.at, last: w.at, writes: 1 });
    }
    let mut terms: Vec<Term> = by_user.into_values().collect();
    terms.sort_by_key(|t| t.first);
    terms
}

/// Pairs of processes whose write intervals overlap: a process that started writing while another
/// one still wrote (a request received after the next leader's first). Each process leads at most
/// once (losing the Lease stops it), so its writes must lie in one interval disjoint from the others.
pub(crate) fn overlaps(terms: &[Term], writes: &[Write]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in terms.iter().enumerate() {
        for b in &terms[i + 1..] {
            if b.first <= a.last {
                // The earlier process's writes from the moment the later one began.
                let late: Vec<String> = writes
                    .iter()
                    .filter(|w| w.user == a.user && w.resource != "leases" && w.at >= b.first)
                    .take(5)
                    .map(|w| format!("{} {} {}/{}", w.at, w.verb, w.resource, w.name))
                    .collect();
                out.push(format!(
                    "{} wrote {} .. {} and {} wrote {} .. {}; {}'s writes since: {late:?}",
                    a.user, a.first, a.last, b.user, b.first, b.last, a.user
                ));
            }
        }
    }
    out
}

/// The writes but the creates of the operator's record key Secret (see `secret::seal`).
pub(crate) fn without_record_key_create(writes: Vec<Write>) -> Vec<Write> {
    let key = scim_token_operator::secret::seal::DEFAULT_KEY_SECRET;
    writes.into_iter().filter(|w| !(w.resource == "secrets" && w.verb == "create" && w.name == key)).collect()
}

/// Secret writes to names outside `token_secrets`.
pub(crate) fn foreign_secret_writes(writes: &[Write], token_secrets: &BTreeSet<String>) -> Vec<String> {
    writes
        .iter()
        .filter(|w| w.resource == "secrets" && !token_secrets.contains(&w.name))
        .map(|w| format!("{} {} secrets/{} at {}", w.user, w.verb, w.name, w.at))
        .collect()
}

/// Successful Secret writes (create, patch, update) per Secret name.
pub(crate) fn secret_writes(writes: &[Write]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for w in writes.iter().filter(|w| w.resource == "secrets" && w.verb != "delete") {
        *out.entry(w.name.clone()).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: &str, at: &str, resource: &str, name: &str, code: i64) -> String {
        serde_json::json!({
            "kind": "Event", "stage": "ResponseComplete", "verb": "patch",
            "user": { "username": user },
            "objectRef": { "resource": resource, "namespace": "ns", "name": name },
            "responseStatus": { "code": code },
            "requestReceivedTimestamp": at,
        })
        .to_string()
    }

    fn parsed(lines: &[String]) -> Vec<Write> {
        lines.iter().filter_map(|l| parse(l, "ns")).collect()
    }

    #[test]
    fn only_successful_writes_of_replicas_in_the_namespace_count() {
        let w = parsed(&[
            event("chaos-op-a-1", "2026-01-01T00:00:01.000000Z", "secrets", "x-scim-token", 201),
            event("chaos-op-a-1", "2026-01-01T00:00:02.000000Z", "secrets", "x-scim-token", 409),
            event("admin", "2026-01-01T00:00:03.000000Z", "secrets", "x-scim-token", 200),
        ]);
        assert_eq!(w.len(), 1);
        assert_eq!(secret_writes(&w)["x-scim-token"], 1);
    }

    #[test]
    fn a_write_after_the_next_leaders_first_is_an_overlap() {
        let ok = parsed(&[
            event("chaos-op-a-1", "2026-01-01T00:00:01Z", "secrets", "s", 200),
            event("chaos-op-a-1", "2026-01-01T00:00:02Z", "secrets", "s", 200),
            // A Lease write by the next leader before the old one's last write is fine.
            event("chaos-op-b-1", "2026-01-01T00:00:01.500Z", "leases", "l", 200),
            event("chaos-op-b-1", "2026-01-01T00:00:03Z", "secrets", "s", 200),
        ]);
        assert!(overlaps(&terms(&ok), &ok).is_empty());
        let bad = parsed(&[
            event("chaos-op-a-1", "2026-01-01T00:00:01Z", "secrets", "s", 200),
            event("chaos-op-b-1", "2026-01-01T00:00:02Z", "scimdirectories", "d", 200),
            event("chaos-op-a-1", "2026-01-01T00:00:03Z", "secrets", "s", 200),
        ]);
        assert_eq!(overlaps(&terms(&bad), &bad).len(), 1);
    }

    #[test]
    fn the_record_key_create_is_no_foreign_write_but_its_update_would_be() {
        let key = scim_token_operator::secret::seal::DEFAULT_KEY_SECRET;
        let mut w = parsed(&[event("chaos-op-a-1", "2026-01-01T00:00:01Z", "secrets", key, 201)]);
        w[0].verb = "create".into();
        assert!(without_record_key_create(w.clone()).is_empty());
        w[0].verb = "patch".into();
        assert_eq!(foreign_secret_writes(&without_record_key_create(w), &BTreeSet::new()).len(), 1);
    }

    #[test]
    fn writes_to_other_secrets_are_foreign() {
        let w = parsed(&[
            event("chaos-op-a-1", "2026-01-01T00:00:01Z", "secrets", "t-scim-token", 200),
            event("chaos-op-a-1", "2026-01-01T00:00:02Z", "secrets", "foreign-1", 200),
        ]);
        let ours = BTreeSet::from(["t-scim-token".to_string()]);
        assert_eq!(foreign_secret_writes(&w, &ours).len(), 1);
    }
}
