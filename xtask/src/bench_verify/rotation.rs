//! How soon a rotation reaches the verifier, through both protocols: R directories rotated one at a
//! time (spec patch), the old and the new token polled every millisecond (the resolution) over HTTP
//! and over gRPC, and two watches timestamping the new token in the Secret and the new hash in the
//! status.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use scim_token_operator::api::ScimDirectory;
use scim_token_operator::token::TokenHash;
use serde_json::json;

use super::grpc::Grpc;
use super::http::Http;
use super::{NS, token_of};

#[derive(Default)]
pub(super) struct Rotations {
    /// New token in the Secret (seen by the benchmark's watch) → its first 200.
    pub new_from_secret: Vec<Duration>,
    /// New hash in the status (seen by the benchmark's watch) → the new token's first 200.
    pub new_from_status: Vec<Duration>,
    /// New token in the Secret → the old token's first 401.
    pub old_from_secret: Vec<Duration>,
    /// Rotation requested (spec patch) → the old token's first 401, the whole path.
    pub old_from_patch: Vec<Duration>,
    /// The same over gRPC: new token in the Secret → its first OK, and → the old token's first denial.
    pub grpc_new_from_secret: Vec<Duration>,
    pub grpc_old_from_secret: Vec<Duration>,
}

enum Seen {
    Secret(String, String, Instant),
    Status(String, String, Instant),
}

/// The verifier's two endpoints.
#[derive(Clone, Copy)]
pub(super) struct Ports {
    pub http: u16,
    pub grpc: u16,
}

/// Rotates `count` directories one at a time and times when the verifier's answers change. Both
/// tokens are polled on keep-alive connections every millisecond (the resolution), over each protocol.
pub(super) async fn rotations(
    client: &kube::Client,
    ports: Ports,
    tokens: &mut BTreeMap<String, String>,
    count: usize,
) -> anyhow::Result<Rotations> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), NS);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    let (synced_tx, mut synced) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watch_secrets = {
        let (tx, synced_tx) = (tx.clone(), synced_tx.clone());
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(secrets, watcher::Config::default()));
            while let Ok(Some(e)) = events.try_next().await {
                match e {
                    watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                        let (name, token) = (s.metadata.name.clone().unwrap_or_default(), token_of(&s));
                        let _ = tx.send(Seen::Secret(name, token.unwrap_or_default(), Instant::now()));
                    }
                    watcher::Event::InitDone => {
                        let _ = synced_tx.send(());
                    }
                    _ => {}
                }
            }
        })
    };
    let watch_dirs = tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(dirs.clone(), watcher::Config::default()));
        while let Ok(Some(e)) = events.try_next().await {
            match e {
                watcher::Event::Apply(d) | watcher::Event::InitApply(d) => {
                    let hash = d.status.as_ref().and_then(|s| s.token_hash.clone()).unwrap_or_default();
                    let _ = tx.send(Seen::Status(d.metadata.name.clone().unwrap_or_default(), hash, Instant::now()));
                }
                watcher::Event::InitDone => {
                    let _ = synced_tx.send(());
                }
                _ => {}
            }
        }
    });
    for _ in 0..2 {
        synced.recv().await.context("a watch ended before its initial list")?;
    }

    let dirs: Api<ScimDirectory> = Api::namespaced(client.clone(), NS);
    let mut out = Rotations::default();
    for i in 0..count {
        let name = format!("tenant-{i:05}");
        let secret = format!("{name}-scim-token");
        let old = tokens.get(&name).with_context(|| format!("no token for {name}"))?.clone();
        let old_hash = TokenHash::of_bytes(old.as_bytes()).to_string();
        while rx.try_recv().is_ok() {} // events from before this rotation
        let patched = Instant::now();
        let old_refused = tokio::spawn(first(Poll::Http(ports.http), old.clone(), 401, 200));
        let grpc_old_refused = tokio::spawn(first(Poll::Grpc(ports.grpc), old.clone(), 401, 200));
        dirs.patch(&name, &PatchParams::default(), &Patch::Merge(json!({ "spec": { "rotationGeneration": 1 } })))
            .await?;
        let (mut in_secret, mut in_status, mut new_accepted, mut grpc_new_accepted) = (None, None, None, None);
        let deadline = patched + Duration::from_secs(60);
        while in_secret.is_none() || in_status.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let seen = tokio::time::timeout(remaining, rx.recv())
                .await
                .with_context(|| format!("no new token for {name} within 60s"))?
                .context("a watch ended")?;
            match seen {
                Seen::Secret(s, token, at) if s == secret && token != old && in_secret.is_none() => {
                    new_accepted = Some(tokio::spawn(first(Poll::Http(ports.http), token.clone(), 200, 401)));
                    grpc_new_accepted = Some(tokio::spawn(first(Poll::Grpc(ports.grpc), token.clone(), 200, 401)));
                    tokens.insert(name.clone(), token);
                    in_secret = Some(at);
                }
                Seen::Status(d, hash, at) if d == name && !hash.is_empty() && hash != old_hash => {
                    in_status.get_or_insert(at);
                }
                _ => {}
            }
        }
        let (in_secret, in_status) = (in_secret.expect("seen"), in_status.expect("seen"));
        let accepted = new_accepted.expect("spawned").await??;
        let refused = old_refused.await??;
        let grpc_accepted = grpc_new_accepted.expect("spawned").await??;
        let grpc_refused = grpc_old_refused.await??;
        out.new_from_secret.push(accepted.saturating_duration_since(in_secret));
        out.new_from_status.push(accepted.saturating_duration_since(in_status));
        out.old_from_secret.push(refused.saturating_duration_since(in_secret));
        out.old_from_patch.push(refused - patched);
        out.grpc_new_from_secret.push(grpc_accepted.saturating_duration_since(in_secret));
        out.grpc_old_from_secret.push(grpc_refused.saturating_duration_since(in_secret));
    }
    watch_secrets.abort();
    watch_dirs.abort();
    Ok(out)
}

/// Where a poll asks: the HTTP endpoint or the gRPC service (on that port).
enum Poll {
    Http(u16),
    Grpc(u16),
}

/// Polls the verifier with `token` until it answers `want` (and only `want` or `before` meanwhile);
/// returns when the first `want` arrived. Over gRPC the status is the one Envoy gives the client.
async fn first(poll: Poll, token: String, want: u16, before: u16) -> anyhow::Result<Instant> {
    enum Client {
        Http(Http),
        Grpc(Box<Grpc>),
    }
    let mut client = match poll {
        Poll::Http(port) => Client::Http(Http::new(port)),
        Poll::Grpc(port) => Client::Grpc(Box::new(Grpc::connect(port).await?)),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = match &mut client {
            Client::Http(http) => http.verify(&token, None).await?.status,
            Client::Grpc(grpc) => grpc.check(&token, None).await?.status,
        };
        if status == want {
            return Ok(Instant::now());
        }
        ensure!(status == before, "the verifier answered {status} during a rotation (expected {before} or {want})");
        ensure!(Instant::now() < deadline, "the verifier did not answer {want} within 60s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
