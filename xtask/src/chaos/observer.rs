//! An independent watch on the namespace's Secrets, with its own client: every version of every
//! token Secret the API server ever served, reduced to token hashes and the issue record. It resumes
//! from the last resourceVersion across API server and etcd restarts; a resume the server refuses
//! (410 Gone) would hide versions, so it is counted as a gap and makes the run inconclusive.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use scim_token_operator::secret::{GENERATION_ANNOTATION, HASH_ANNOTATION, REQUEST_ANNOTATION, TOKEN_KEY};
use scim_token_operator::token::TokenHash;

/// The issue record a token was written with: (rotation generation, rotation request).
pub(crate) type Record = (Option<String>, Option<String>);

/// One distinct token of a Secret, in the order first seen.
#[derive(Clone, Debug)]
pub(crate) struct TokenSeen {
    pub(crate) hash: String,
    pub(crate) record: Record,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct SecretHistory {
    pub(crate) tokens: Vec<TokenSeen>,
    /// The token hash of the latest version seen.
    pub(crate) current: Option<String>,
    pub(crate) deletions: u32,
}

#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub(crate) secrets: BTreeMap<String, SecretHistory>,
    /// Watch resumes the API server refused (410): versions may have been missed.
    pub(crate) gaps: u32,
    /// Versions whose token-hash annotation disagreed with the token they carried: the token and
    /// its record are written in one request, so this must never be seen.
    pub(crate) torn: Vec<String>,
    pub(crate) events: u64,
    pub(crate) reconnects: u32,
}

impl Observed {
    /// Whether the latest version of `secret` carries a token issued for `record`.
    pub(crate) fn serves(&self, secret: &str, record: &Record) -> bool {
        self.secrets.get(secret).is_some_and(|h| {
            h.current.as_ref().is_some_and(|cur| h.tokens.iter().any(|t| &t.hash == cur && &t.record == record))
        })
    }

    fn apply(&mut self, s: &Secret) {
        self.events += 1;
        let name = s.metadata.name.clone().unwrap_or_default();
        let Some(token) = s.data.as_ref().and_then(|d| d.get(TOKEN_KEY)) else { return };
        let hash = TokenHash::of_bytes(&token.0).to_string();
        let annotations = s.metadata.annotations.clone().unwrap_or_default();
        if let Some(claimed) = annotations.get(HASH_ANNOTATION)
            && claimed != &hash
        {
            self.torn.push(format!("{name} rv {}", s.metadata.resource_version.clone().unwrap_or_default()));
        }
        let record = (annotations.get(GENERATION_ANNOTATION).cloned(), annotations.get(REQUEST_ANNOTATION).cloned());
        let history = self.secrets.entry(name).or_default();
        if !history.tokens.iter().any(|t| t.hash == hash) {
            history.tokens.push(TokenSeen { hash: hash.clone(), record });
        }
        history.current = Some(hash);
    }
}

/// Starts watching; the returned state fills in as events arrive. Call it before anything is created.
pub(crate) async fn start(client: kube::Client, namespace: &str) -> anyhow::Result<Arc<Mutex<Observed>>> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let observed = Arc::new(Mutex::new(Observed::default()));
    let list = api.list(&ListParams::default()).await?;
    {
        let mut o = observed.lock().expect("poisoned");
        for s in &list.items {
            o.apply(s);
        }
    }
    let rv = list.metadata.resource_version.unwrap_or_default();
    tokio::spawn(watch(api, rv, observed.clone()));
    Ok(observed)
}

async fn watch(api: Api<Secret>, mut rv: String, observed: Arc<Mutex<Observed>>) {
    loop {
        let params = WatchParams::default().timeout(290).disable_bookmarks();
        let stream = match api.watch(&params, &rv).await {
            Ok(stream) => stream,
            Err(_) => {
                // The API server or etcd is down: try again from the same version.
                observed.lock().expect("poisoned").reconnects += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let expired = {
                let mut o = observed.lock().expect("poisoned");
                match event {
                    Ok(WatchEvent::Added(s)) | Ok(WatchEvent::Modified(s)) => {
                        rv = s.metadata.resource_version.clone().unwrap_or(rv);
                        o.apply(&s);
                        false
                    }
                    Ok(WatchEvent::Deleted(s)) => {
                        rv = s.metadata.resource_version.clone().unwrap_or(rv);
                        let name = s.metadata.name.clone().unwrap_or_default();
                        o.secrets.entry(name).or_default().deletions += 1;
                        false
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        rv = b.metadata.resource_version;
                        false
                    }
                    Ok(WatchEvent::Error(status)) if status.code == 410 => {
                        o.gaps += 1;
                        true
                    }
                    Ok(WatchEvent::Error(_)) | Err(_) => break,
                }
            };
            if expired {
                // Too old to resume: start over from a fresh list (the gap is counted above).
                rv = relist(&api, &observed).await;
                break;
            }
        }
        observed.lock().expect("poisoned").reconnects += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn relist(api: &Api<Secret>, observed: &Mutex<Observed>) -> String {
    loop {
        if let Ok(list) = api.list(&ListParams::default()).await {
            let mut o = observed.lock().expect("poisoned");
            for s in &list.items {
                o.apply(s);
            }
            return list.metadata.resource_version.unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
