//! The reconcile's branches, one reconcile at a time, against the real API server of the test
//! control plane (envtest: etcd + kube-apiserver). The caches are the controller's own, fed by its
//! own watch streams; only the scheduler is left out: each test calls [`reconcile`] itself, as the
//! controller would for one trigger, and reads back every request that reconcile sent (a
//! pass-through layer on the client records them; the API server answers them all).
//!
//! Which decision a situation leads to is `policy`'s table; these show what the reconcile does with
//! it: which requests, in which order, and what the cluster holds afterwards.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::Request;
use envtest::ControlPlane;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::SignedDuration;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::client::{Body, ClientBuilder};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::streams::{self, InitialLists};
use super::*;
use crate::api::{ReadyReason, ScimDirectorySpec};
use crate::secret::{self, MANAGED_BY_LABEL};
use crate::token::TokenHash;

/// Requests as `METHOD path`, the path from the namespace on (`POST secrets`,
/// `PATCH scimdirectories/acme/status`); a GET of a collection is a list. `(metadata)` marks a read of
/// metadata only.
type Calls = Arc<Mutex<Vec<String>>>;

/// One namespace, and a [`Context`] like the one `run_scope` builds for it.
struct Harness {
    ns: String,
    /// Not recorded: the test's own reads and writes.
    client: Client,
    ctx: Arc<Context>,
    calls: Calls,
}

impl Harness {
    async fn new(prefix: &str, min_issue_interval: SignedDuration) -> Harness {
        let cp = ControlPlane::shared();
        let client = cp.client().await;
        let ns = cp.create_namespace(prefix).await.expect("namespace");
        let calls = Calls::default();
        let recording = recording_client(cp.config().clone(), calls.clone(), &ns);
        let (dir_reader, dir_writer) = reflector::store();
        let (synced_tx, secrets_synced) = tokio::sync::watch::channel(false);
        let lists = Arc::new(InitialLists::new(synced_tx, || {}));
        let ctx = Arc::new(Context {
            client: recording.clone(),
            secrets: SecretCache::default(),
            events: Publisher::new(recording, FIELD_MANAGER, "reconcile-test"),
            metrics: Arc::new(Metrics::default()),
            failpoint: None,
            min_issue_interval,
            fence: Fence::open(),
            record_key: RecordKey::generate(),
            entra: Arc::new(no_identity_provider()),
            secrets_synced,
            failures: Mutex::default(),
            exported: Mutex::default(),
            directories: dir_reader,
            unechoed_status: Mutex::default(),
        });
        let secret_changes = streams::secret_changes(
            Api::namespaced(client.clone(), &ns),
            ctx.secrets.clone(),
            Default::default(),
            lists.clone(),
        );
        let directory_triggers =
            streams::directory_triggers(Api::namespaced(client.clone(), &ns), dir_writer, ctx.clone(), lists);
        tokio::spawn(secret_changes.for_each(|_| async {}));
        tokio::spawn(directory_triggers.for_each(|_| async {}));
        Harness { ns, client, ctx, calls }
    }

    /// The same caches, client and record key with another minimum interval between automatic issues.
    fn with_min_issue_interval(self, min_issue_interval: SignedDuration) -> Harness {
        let ctx = &self.ctx;
        let ctx = Arc::new(Context {
            client: ctx.client.clone(),
            secrets: ctx.secrets.clone(),
            events: Publisher::new(ctx.client.clone(), FIELD_MANAGER, "reconcile-test"),
            metrics: ctx.metrics.clone(),
            failpoint: None,
            min_issue_interval,
            fence: ctx.fence.clone(),
            record_key: ctx.record_key.clone(),
            entra: ctx.entra.clone(),
            secrets_synced: ctx.secrets_synced.clone(),
            failures: Mutex::default(),
            exported: Mutex::default(),
            directories: ctx.directories.clone(),
            unechoed_status: Mutex::default(),
        });
        Harness { ctx, ..self }
    }

    fn dirs(&self) -> Api<ScimDirectory> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create_directory(&self, name: &str) {
        let dir = ScimDirectory::new(name, ScimDirectorySpec::default());
        self.dirs().create(&PostParams::default(), &dir).await.expect("create the directory");
    }

    /// One reconcile of `name`, once both caches show what the API server holds; returns its result
    /// and the requests it sent.
    async fn reconcile(&self, name: &str) -> (Result<Action>, Vec<String>) {
        self.reconcile_as(self.settled(name).await).await
    }

    /// One reconcile of `dir` as given (a cache may hold an older version).
    async fn reconcile_as(&self, dir: Arc<ScimDirectory>) -> (Result<Action>, Vec<String>) {
        self.calls.lock().unwrap().clear();
        let result = reconcile(dir, self.ctx.clone()).await;
        (result, std::mem::take(&mut *self.calls.lock().unwrap()))
    }

    /// The directory from the cache, once the directory cache holds its latest version and the Secret
    /// cache holds its Secret's (or nothing, for a Secret the label-filtered watch cannot see).
    async fn settled(&self, name: &str) -> Arc<ScimDirectory> {
        let latest = self.dirs().get(name).await.expect("the directory");
        let secret = self.secrets().get_opt(&latest.secret_name()).await.expect("read the Secret");
        let cacheable = secret.filter(|s| {
            secret::is_directory_controlled(&s.metadata)
                && s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(secret::MANAGED_BY_VALUE)
        });
        let want = cacheable.and_then(|s| s.metadata.resource_version);
        let key = ObjectRef::new(name).within(&self.ns);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let cached = self.ctx.directories.get(&key);
            let secret = self.ctx.secrets.get(&self.ns, &latest.secret_name());
            if let Some(dir) = cached.filter(|d| d.resource_version() == latest.resource_version())
                && secret.and_then(|s| s.resource_version.clone()) == want
            {
                return dir;
            }
            assert!(Instant::now() < deadline, "the caches did not catch up with {name}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn secret(&self, name: &str) -> Secret {
        self.secrets().get(name).await.expect("the Secret")
    }

    async fn token_hash(&self, name: &str) -> TokenHash {
        let token = secret::take_stored_token(&mut self.secret(name).await).expect("a token");
        token.hash()
    }

    async fn ready(&self, name: &str) -> (ReadyReason, Option<String>) {
        let dir = self.dirs().get(name).await.expect("the directory");
        (dir.ready_reason().expect("a Ready condition"), dir.status.and_then(|s| s.token_hash))
    }

    /// The reasons of the Events about `name`, oldest first.
    async fn events(&self, name: &str) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let mut events: Vec<Event> = events
            .list(&ListParams::default())
            .await
            .expect("list Events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        events.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
        events.into_iter().filter_map(|e| e.reason).collect()
    }
}

/// A client of the test control plane that records every request it sends, as [`Calls`].
/// The Graph client as the operator starts it with its defaults; no directory here names an identity
/// provider, so it is never called.
fn no_identity_provider() -> crate::entra::Entra {
    crate::entra::Entra::new(crate::entra::Config {
        graph_endpoint: "https://graph.microsoft.com".into(),
        authority_host: "https://login.microsoftonline.com/".into(),
        ca_file: None,
        federated_token_file: None,
        poll_interval: std::time::Duration::from_secs(30),
    })
    .expect("the default Graph settings")
}

fn recording_client(config: kube::Config, calls: Calls, ns: &str) -> Client {
    let prefix = format!("/namespaces/{ns}/");
    let record = tower::ServiceBuilder::new().map_request(move |request: Request<Body>| {
        let path = request.uri().path();
        let path = path.split_once(&prefix).map_or(path, |(_, rest)| rest);
        let metadata = request
            .headers()
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("as=PartialObjectMetadata"));
        let line = format!("{} {path}{}", request.method(), if metadata { " (metadata)" } else { "" });
        calls.lock().unwrap().push(line);
        request
    });
    ClientBuilder::try_from(config).expect("a client").with_layer(&record).build()
}

const NO_INTERVAL: SignedDuration = SignedDuration::ZERO;
const MINUTE: SignedDuration = SignedDuration::from_secs(60);

#[tokio::test]
async fn a_first_token_is_created_without_a_look_up_and_then_costs_no_request() {
    let h = Harness::new("first-token", MINUTE).await;
    h.create_directory("acme").await;

    let (result, calls) = h.reconcile("acme").await;
    assert_eq!(result.expect("reconciled"), Action::await_change());
    assert_eq!(calls, ["POST secrets", "PATCH scimdirectories/acme/status"]);
    let hash = h.token_hash("acme-scim-token").await;
    assert_eq!(h.ready("acme").await, (ReadyReason::TokenIssued, Some(hash.to_string())));
    assert_eq!(h.events("acme").await, Vec::<String>::new(), "a first token gets no Event");

    let (result, calls) = h.reconcile("acme").await;
    assert_eq!(result.expect("reconciled"), Action::await_change());
    assert_eq!(calls, Vec::<String>::new(), "the Secret and the status agree: nothing to read or write");
}

#[tokio::test]
async fn a_secret_the_cache_cannot_see_is_looked_up_and_repaired_not_replaced() {
    let h = Harness::new("confirm-missing", MINUTE).await;
    h.create_directory("acme").await;
    h.reconcile("acme").await.0.expect("the first token");
    let hash = h.token_hash("acme-scim-token").await;
    // Without its label the Secret leaves the label-filtered watch, and so the cache.
    let unlabel = json!({ "metadata": { "labels": { MANAGED_BY_LABEL: null } } });
    h.secrets().patch("acme-scim-token", &PatchParams::default(), &Patch::Merge(unlabel)).await.unwrap();

    let (result, calls) = h.reconcile("acme").await;
    assert_eq!(result.expect("reconciled"), Action::await_change());
    assert_eq!(
        calls,
        [
            "GET secrets/acme-scim-token (metadata)", // a miss proves nothing: ask the API server
            "GET secrets/acme-scim-token",            // ours: its token hash, past the cache
            "GET scimdirectories",                    // a Secret read afresh: is the directory current?
            "GET secrets/acme-scim-token",            // the token to write back with the labels
            "PATCH secrets/acme-scim-token",
        ]
    );
    assert_eq!(h.token_hash("acme-scim-token").await, hash, "the same token");
    assert_eq!(
        h.secret("acme-scim-token").await.labels().get(MANAGED_BY_LABEL).map(String::as_str),
        Some(secret::MANAGED_BY_VALUE)
    );
    assert_eq!(h.ready("acme").await, (ReadyReason::TokenIssued, Some(hash.to_string())));
}

#[tokio::test]
async fn a_first_create_refused_by_a_foreign_secret_is_looked_up_and_every_later_reconcile_looks_first() {
    let h = Harness::new("create-refused", MINUTE).await;
    let foreign = Secret {
        metadata: kube::api::ObjectMeta { name: Some("acme-scim-token".into()), ..Default::default() },
        data: Some([("token".to_owned(), ByteString(b"someone else's".to_vec()))].into()),
        ..Secret::default()
    };
    let foreign = h.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    h.create_directory("acme").await;

    let (result, calls) = h.reconcile("acme").await;
    assert!(matches!(result, Err(Error::SecretConflict(_))), "{result:?}");
    assert_eq!(
        calls,
        [
            "POST secrets", // refused (409): some Secret has the name
            "GET secrets/acme-scim-token (metadata)",
            "GET scimdirectories",
            "PATCH scimdirectories/acme/status",
            "POST events",
        ]
    );
    assert_eq!(h.ready("acme").await, (ReadyReason::SecretConflict, None));
    assert_eq!(h.events("acme").await, ["SecretConflict"]);
    assert_eq!(h.secret("acme-scim-token").await.resource_version(), foreign.resource_version(), "left untouched");

    // The directory has a status now: no request carries a token any more.
    let (result, calls) = h.reconcile("acme").await;
    assert!(matches!(result, Err(Error::SecretConflict(_))), "{result:?}");
    assert_eq!(calls, ["GET secrets/acme-scim-token (metadata)", "GET scimdirectories"]);
    assert_eq!(h.events("acme").await, ["SecretConflict"], "an unchanged status gets no second Event");
}

#[tokio::test]
async fn a_repair_within_the_minimum_interval_is_deferred_and_one_after_it_replaces_the_token() {
    let h = Harness::new("deferred", MINUTE).await;
    h.create_directory("acme").await;
    h.reconcile("acme").await.0.expect("the first token");
    let first = h.token_hash("acme-scim-token").await;
    let edit = json!({ "data": { "token": ByteString(b"edited by hand".to_vec()) } });
    h.secrets().patch("acme-scim-token", &PatchParams::default(), &Patch::Merge(edit)).await.unwrap();

    let (result, calls) = h.reconcile("acme").await;
    assert_ne!(result.expect("reconciled"), Action::await_change(), "a wake-up once the interval has passed");
    assert_eq!(calls, ["PATCH scimdirectories/acme/status", "POST events"]);
    assert_eq!(h.ready("acme").await, (ReadyReason::IssueDeferred, Some(first.to_string())));
    assert_eq!(h.events("acme").await, ["IssueDeferred"]);

    // The same Secret once the interval has passed (here: without one).
    let later = h.with_min_issue_interval(NO_INTERVAL);
    let (result, mut calls) = later.reconcile("acme").await;
    assert_eq!(result.expect("reconciled"), Action::await_change());
    calls[1..].sort(); // the status write and the Event go out together
    assert_eq!(calls, ["PATCH secrets/acme-scim-token", "PATCH scimdirectories/acme/status", "POST events"]);
    let second = later.token_hash("acme-scim-token").await;
    assert_ne!(second, first);
    assert_eq!(later.ready("acme").await, (ReadyReason::TokenRotated, Some(second.to_string())));
    assert_eq!(later.events("acme").await, ["IssueDeferred", "TokenChanged"]);
}

#[tokio::test]
async fn a_secret_read_afresh_for_a_newer_spec_than_the_cached_directory_is_decided_on_the_current_one() {
    let h = Harness::new("stale-directory", MINUTE).await;
    h.create_directory("acme").await;
    h.reconcile("acme").await.0.expect("the first token");
    let cached = h.settled("acme").await;
    let spec = json!({ "spec": { "rotationGeneration": 1 } });
    h.dirs().patch("acme", &PatchParams::default(), &Patch::Merge(spec)).await.unwrap();
    h.reconcile("acme").await.0.expect("rotated for generation 1");
    let (_, calls) = h.reconcile("acme").await;
    assert_eq!(calls, Vec::<String>::new());
    let rotated = h.token_hash("acme-scim-token").await;
    let unlabel = json!({ "metadata": { "labels": { MANAGED_BY_LABEL: null } } });
    h.secrets().patch("acme-scim-token", &PatchParams::default(), &Patch::Merge(unlabel)).await.unwrap();
    h.settled("acme").await;

    // Decided on generation 0 and the Secret's record of generation 1, it would rotate back.
    let (result, calls) = h.reconcile_as(cached).await;
    assert_eq!(result.expect("reconciled"), Action::await_change());
    let look_up = ["GET secrets/acme-scim-token (metadata)", "GET secrets/acme-scim-token", "GET scimdirectories"];
    let restore = ["GET secrets/acme-scim-token", "PATCH secrets/acme-scim-token"];
    assert_eq!(calls, [&look_up[..], &look_up[..], &restore[..]].concat(), "read again, then decided on generation 1");
    assert_eq!(h.token_hash("acme-scim-token").await, rotated, "no token for the old spec");
    assert_eq!(h.ready("acme").await, (ReadyReason::TokenRotated, Some(rotated.to_string())));
}
