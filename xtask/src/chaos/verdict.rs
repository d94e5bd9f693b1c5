//! The verdict, from the cluster and the API server, never from the operator's word: convergence
//! (every directory Ready, its status hash the SHA-256 of its Secret's token, the token issued for
//! the latest request), tokens per directory as the independent watch saw them, and what the
//! audit log says was written and by whom.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use scim_token_operator::api::ScimDirectory;
use scim_token_operator::secret::{GENERATION_ANNOTATION, REQUEST_ANNOTATION, TOKEN_KEY};
use scim_token_operator::token::TokenHash;

use super::observer::Observed;
use super::workload::{Dir, name, secret_name};

/// The cluster's state at one instant, against what was asked.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) ready: usize,
    /// Status hash != SHA-256 of the Secret's token (or either missing).
    pub(crate) mismatched: Vec<String>,
    /// The Secret's token was not issued for the latest request (a lost rotation, until it is).
    pub(crate) unserved: Vec<String>,
    /// The independent watch has not seen the Secret's current token yet.
    pub(crate) unwatched: usize,
    /// Token Secrets without a controller reference to their directory.
    pub(crate) unowned: Vec<String>,
}

impl Snapshot {
    pub(crate) fn converged(&self, n: usize) -> bool {
        self.ready == n && self.mismatched.is_empty() && self.unserved.is_empty() && self.unwatched == 0
    }
}

pub(crate) async fn snapshot(client: &kube::Client, ns: &str, dirs: &[Dir], observed: &Observed) -> Result<Snapshot> {
    let listed = Api::<ScimDirectory>::namespaced(client.clone(), ns).list(&ListParams::default()).await?;
    let by_name: BTreeMap<String, ScimDirectory> =
        listed.items.into_iter().map(|d| (d.metadata.name.clone().unwrap_or_default(), d)).collect();
    let secrets = Api::<Secret>::namespaced(client.clone(), ns).list(&ListParams::default()).await?;
    let secrets: BTreeMap<String, Secret> =
        secrets.items.into_iter().map(|s| (s.metadata.name.clone().unwrap_or_default(), s)).collect();
    let mut snap = Snapshot::default();
    for (i, want) in dirs.iter().enumerate() {
        let (dir_name, secret) = (name(i), secret_name(i));
        let Some(dir) = by_name.get(&dir_name) else {
            snap.unserved.push(format!("{dir_name}: not found"));
            continue;
        };
        if dir.ready_condition().is_some_and(|c| c.status == "True") {
            snap.ready += 1;
        }
        let status_hash = dir.status.as_ref().and_then(|s| s.token_hash.clone());
        let stored = secrets.get(&secret);
        let token_hash =
            stored.and_then(|s| s.data.as_ref()?.get(TOKEN_KEY).map(|t| TokenHash::of_bytes(&t.0).to_string()));
        if status_hash.is_none() || status_hash != token_hash {
            snap.mismatched.push(dir_name.clone());
        }
        let annotations = stored.and_then(|s| s.metadata.annotations.clone()).unwrap_or_default();
        let record = (annotations.get(GENERATION_ANNOTATION).cloned(), annotations.get(REQUEST_ANNOTATION).cloned());
        if record != want.record() {
            snap.unserved.push(format!("{dir_name}: Secret issued for {record:?}, asked {:?}", want.record()));
        }
        if token_hash.is_some() && observed.secrets.get(&secret).and_then(|h| h.current.clone()) != token_hash {
            snap.unwatched += 1;
        }
        let uid = dir.metadata.uid.clone();
        let owned = stored.is_some_and(|s| {
            s.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
        });
        if stored.is_some() && !owned {
            snap.unowned.push(secret);
        }
    }
    Ok(snap)
}

/// Polls until converged; returns how long it took, or the last snapshot on timeout.
pub(crate) async fn converge(
    client: &kube::Client,
    ns: &str,
    dirs: impl Fn() -> Vec<Dir>,
    observed: &std::sync::Mutex<Observed>,
    timeout: Duration,
) -> (Option<Duration>, Snapshot) {
    let started = Instant::now();
    loop {
        let dirs = dirs();
        let snap = {
            // The observer's state is copied out so that the lock is not held across the lists.
            let current: Observed = {
                let o = observed.lock().expect("poisoned");
                Observed { secrets: o.secrets.clone(), ..Observed::default() }
            };
            snapshot(client, ns, &dirs, &current).await
        };
        match snap {
            Ok(snap) if snap.converged(dirs.len()) => return (Some(started.elapsed()), snap),
            Ok(snap) if started.elapsed() > timeout => return (None, snap),
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Tokens per directory as the watch saw them, against the rotations asked.
#[derive(Debug, Default)]
pub(crate) struct TokenCounts {
    /// Tokens beyond one per request.
    pub(crate) double: usize,
    /// Requests no token was seen for.
    pub(crate) lost: usize,
    /// Two tokens written with the same record (one request, two tokens).
    pub(crate) same_record: usize,
    pub(crate) examples: Vec<String>,
}

pub(crate) fn token_counts(dirs: &[Dir], observed: &Observed) -> TokenCounts {
    let mut out = TokenCounts::default();
    let initial = (Some("0".to_string()), None);
    for (i, want) in dirs.iter().enumerate() {
        let tokens = observed.secrets.get(&secret_name(i)).map(|h| h.tokens.clone()).unwrap_or_default();
        // A rotation asked before the first token was issued is served by that first token.
        let expected = if want.racing && !tokens.iter().any(|t| t.record == initial) {
            want.rotations() as usize
        } else {
            1 + want.rotations() as usize
        };
        let records: BTreeSet<_> = tokens.iter().map(|t| t.record.clone()).collect();
        out.same_record += tokens.len() - records.len();
        if tokens.len() != expected {
            if tokens.len() > expected {
                out.double += tokens.len() - expected;
            } else {
                out.lost += expected - tokens.len();
            }
            if out.examples.len() < 10 {
                let seen: Vec<_> = tokens.iter().map(|t| &t.record).collect();
                out.examples.push(format!(
                    "{}: {} tokens seen {seen:?}, {expected} expected ({want:?})",
                    name(i),
                    tokens.len()
                ));
            }
        }
    }
    out
}

/// Percentile (nearest rank) of `values`.
pub(crate) fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    let mut v = values.to_vec();
    v.sort();
    let rank = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::super::observer::TokenSeen;
    use super::*;

    fn seen(records: &[(&str, Option<&str>)]) -> Observed {
        let mut o = Observed::default();
        let h = o.secrets.entry(secret_name(0)).or_default();
        for (k, (generation, request)) in records.iter().enumerate() {
            h.tokens.push(TokenSeen {
                hash: format!("h{k}"),
                record: (Some(generation.to_string()), request.map(str::to_string)),
            });
        }
        o
    }

    #[test]
    fn one_token_per_request() {
        let dir = Dir { created: true, generation: 1, declarative: 1, ..Dir::default() };
        let c = token_counts(std::slice::from_ref(&dir), &seen(&[("0", None), ("1", None)]));
        assert_eq!((c.double, c.lost, c.same_record), (0, 0, 0));
        let c = token_counts(std::slice::from_ref(&dir), &seen(&[("0", None), ("1", None), ("1", None)]));
        assert_eq!((c.double, c.same_record), (1, 1));
        let c = token_counts(&[dir], &seen(&[("0", None)]));
        assert_eq!(c.lost, 1);
    }

    #[test]
    fn a_rotation_racing_the_first_issue_may_be_served_by_it() {
        let dir = Dir { created: true, generation: 1, declarative: 1, racing: true, ..Dir::default() };
        assert_eq!(token_counts(std::slice::from_ref(&dir), &seen(&[("1", None)])).lost, 0);
        assert_eq!(token_counts(std::slice::from_ref(&dir), &seen(&[("0", None), ("1", None)])).lost, 0);
        assert_eq!(token_counts(&[dir], &seen(&[("0", None)])).lost, 1);
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=10).map(Duration::from_secs).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_secs(5)));
        assert_eq!(percentile(&v, 1.0), Some(Duration::from_secs(10)));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
