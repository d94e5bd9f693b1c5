//! The controller: the run loop over one or more namespace scopes, the shared [`Context`], and the
//! error policy. A reconcile ([`reconcile`]) reads the cluster, asks [`crate::policy`], and performs
//! the writes in a crash-safe order: the Secret (token + issue record, one request) first, then the
//! status derived from it.
//!
//! - `streams.rs`: the Secret and directory watch streams and the caches they feed.
//! - `reconcile.rs`: one reconcile, as its steps.
//! - `writes.rs`: every write to the API server (Secret, status, Events) and the reads past the cache.
//! - `tests.rs`: the reconcile's branches, one reconcile at a time against a real API server.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tracing::{debug, warn};

use crate::api::ScimDirectory;
use crate::entra::Entra;
use crate::events::Publisher;
use crate::leader::{Fence, Fenced};
use crate::metrics::{DirectoryLabels, ErrorLabels, Metrics, ScopeLabels};
use crate::secret::{ObservedSecret, RecordKey, SecretCache};

mod reconcile;
mod streams;
#[cfg(test)]
mod tests;
mod writes;

pub use reconcile::reconcile;
use streams::InitialLists;

pub use crate::FIELD_MANAGER;
/// Set to `after-secret-write` to make the process exit right after writing a Secret and before
/// writing the status: the end-to-end suite uses it to prove crash safety. Only honoured by a binary
/// built with the `failpoints` feature.
pub const FAILPOINT_ENV: &str = "SCIM_TOKEN_OPERATOR_FAILPOINT";
pub const FAILPOINT_EXIT_CODE: i32 = 86;
/// Longest wait for the directory cache to show our own status write (see [`Context::fresh`]).
const STATUS_ECHO_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("Secret {0} exists and is not controlled by this ScimDirectory; it is left untouched")]
    SecretConflict(String),
    #[error("{0}")]
    SecretWriteRefused(String),
    #[error("the Secret cache never became ready")]
    CacheNotReady,
    #[error("ScimDirectory has no namespace")]
    NotNamespaced,
    /// This replica may no longer be the leader: nothing is written, nothing retried (it is stopping).
    #[error("write refused: {0}")]
    Fenced(#[from] Fenced),
    /// Every decision of one reconcile met a Secret that had changed since (writes lost their race
    /// with another writer): retried with backoff.
    #[error("the Secret changed while being written")]
    SecretKeptChanging,
    /// The Secret's token changed between the decision to restore its metadata and the read of the
    /// token to write back: retried with backoff.
    #[error("the Secret's token changed while its metadata was restored")]
    TokenChangedDuringRestore,
    /// The Secret read from the API server is newer than the cached directory: decide again on the
    /// directory as read now.
    #[error("the cached ScimDirectory is older than the Secret read from the API server")]
    StaleDirectory(Box<ScimDirectory>),
}

impl Error {
    /// The fence's refusal, whether the controller checked it (`Error::Fenced`) or the client did once
    /// the write held its permit (inside a `kube::Error::Service`).
    pub fn fenced(&self) -> Option<&Fenced> {
        match self {
            Error::Fenced(fenced) => Some(fenced),
            Error::Kube(e) => Fenced::in_kube_error(e),
            _ => None,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        if self.fenced().is_some() {
            return "fenced";
        }
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "write_conflict",
            Error::Kube(_) => "kube",
            Error::SecretConflict(_) => "secret_conflict",
            Error::SecretWriteRefused(_) => "secret_write_refused",
            Error::CacheNotReady => "cache_not_ready",
            Error::NotNamespaced => "not_namespaced",
            Error::Fenced(_) => "fenced",
            Error::StaleDirectory(_) => "stale_directory",
            // Races with another writer, like a 409: retried, and expected under concurrent writers.
            Error::SecretKeptChanging | Error::TokenChangedDuringRestore => "write_conflict",
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the controller runtime.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty watches all namespaces.
    pub namespaces: Vec<String>,
    /// Maximum number of directories reconciled at once.
    pub concurrency: u16,
    pub failpoint: Option<String>,
    /// Identity written into Events (`reportingInstance`).
    pub instance: String,
    /// Shortest time between two automatic issues (renewals, repairs) for one directory.
    pub min_issue_interval: Duration,
    /// Checked right before every write: closed once this replica may no longer be the leader.
    pub fence: Fence,
    /// Seals the issue records the operator writes, and tells them from records it did not write.
    pub record_key: RecordKey,
    /// The Graph client that pushes new tokens to Microsoft Entra ID.
    pub entra: Arc<Entra>,
}

/// Shared state of all reconciliations.
pub struct Context {
    pub client: Client,
    pub secrets: SecretCache,
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub failpoint: Option<String>,
    pub min_issue_interval: SignedDuration,
    pub fence: Fence,
    pub record_key: RecordKey,
    pub entra: Arc<Entra>,
    /// Becomes true once the Secret cache holds its initial list. Reconciles wait on this channel rather
    /// than on `Store::wait_until_ready` directly, which wakes only the first of several tasks
    /// awaiting it at once (see [`InitialLists`]).
    secrets_synced: tokio::sync::watch::Receiver<bool>,
    /// Consecutive failures per directory, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<ScimDirectory>, u32>>,
    /// Directories with an expiry series, so that the series of one deleted unseen can be found.
    exported: Mutex<HashSet<ObjectRef<ScimDirectory>>>,
    /// The directory cache, read again at the start of a reconcile (see [`Context::fresh`]).
    directories: Store<ScimDirectory>,
    /// Status writes the directory cache has not shown yet: directory -> the resourceVersion the write
    /// replaced. See [`Context::fresh`].
    unechoed_status: Mutex<HashMap<ObjectRef<ScimDirectory>, String>>,
}

impl Context {
    /// Drops what is kept per directory (its expiry series, its backoff state) once it is deleted.
    fn forget(&self, dir: &ObjectRef<ScimDirectory>) {
        let labels = DirectoryLabels { namespace: dir.namespace.clone().unwrap_or_default(), name: dir.name.clone() };
        self.metrics.token_expiry.remove(&labels);
        self.failures.lock().expect("poisoned").remove(dir);
        self.exported.lock().expect("poisoned").remove(dir);
        self.unechoed_status.lock().expect("poisoned").remove(dir);
        self.entra.succeeded(&format!("{}/{}", labels.namespace, labels.name));
    }

    /// The directory as of our own last status write. A reconcile that starts right after one (the
    /// echo of our Secret write when it beat the write's response, see `SecretCache::expect_echo`, or
    /// any other trigger) may find the cache without that write yet: decided on the stale copy, it
    /// would write the status a second time (a new condition timestamp). So a reconcile that follows
    /// one of our status writes waits, briefly, for the cache to move past the version the write
    /// replaced. Waiting is bounded: a lagging watch costs at most one redundant write, never a wrong
    /// decision (writes stay guarded by resourceVersions).
    async fn fresh(&self, dir: Arc<ScimDirectory>) -> Arc<ScimDirectory> {
        let key = ObjectRef::from(dir.as_ref());
        let Some(replaced) = self.unechoed_status.lock().expect("poisoned").get(&key).cloned() else { return dir };
        let deadline = Instant::now() + STATUS_ECHO_WAIT;
        let latest = loop {
            match self.directories.get(&key) {
                None => break dir,
                Some(cached) if cached.metadata.resource_version.as_ref() != Some(&replaced) => break cached,
                Some(_) if Instant::now() >= deadline => {
                    self.metrics.status_echo_timeouts.inc();
                    break dir;
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        self.unechoed_status.lock().expect("poisoned").remove(&key);
        latest
    }

    /// Forgets every directory the cache no longer holds. After a re-list (a watch that expired, an
    /// API server restart), a directory deleted in between never shows up as a Delete event.
    fn prune(&self, cache: &Store<ScimDirectory>) {
        let live: HashSet<ObjectRef<ScimDirectory>> =
            cache.state().iter().map(|d| ObjectRef::from(d.as_ref())).collect();
        let known: Vec<ObjectRef<ScimDirectory>> = {
            let failures = self.failures.lock().expect("poisoned");
            let exported = self.exported.lock().expect("poisoned");
            failures.keys().chain(exported.iter()).filter(|d| !live.contains(*d)).cloned().collect()
        };
        for dir in known {
            self.forget(&dir);
        }
    }

    fn export_expiry(&self, dir: &ScimDirectory, expires_at: Option<Timestamp>) {
        let labels = DirectoryLabels { namespace: dir.namespace().unwrap_or_default(), name: dir.name_any() };
        // Name and namespace only: `ObjectRef::from` also copies the UID and resourceVersion, which
        // equality ignores and 10,000 entries would carry for nothing.
        let key = ObjectRef::new(&labels.name).within(&labels.namespace);
        let mut exported = self.exported.lock().expect("poisoned");
        match expires_at {
            Some(at) => {
                self.metrics.token_expiry.get_or_create(&labels).set(at.as_second());
                exported.insert(key);
            }
            None => {
                self.metrics.token_expiry.remove(&labels);
                exported.remove(&key);
            }
        }
    }
}

/// Runs the controller until `shutdown` resolves (in-flight reconciliations finish) or `abort` does
/// (they are dropped where they stand: a replica that lost its Lease must not finish work). One
/// controller over all namespaces, or one per watched namespace (each with its own namespaced watches
/// and caches, so the operator needs no cluster-wide permission on Secrets). `ready` turns true once
/// every cache holds its initial list.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    abort: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let scopes: Vec<Option<&str>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().map(|n| Some(n.as_str())).collect()
    };
    let shutdown = shutdown.shared();
    let unsynced = Arc::new(AtomicUsize::new(scopes.len()));
    let on_synced = move || {
        if unsynced.fetch_sub(1, Ordering::SeqCst) == 1 {
            ready.store(true, Ordering::SeqCst);
        }
    };
    let scopes = futures::future::join_all(scopes.into_iter().map(|scope| {
        run_scope(client.clone(), scope, &settings, metrics.clone(), on_synced.clone(), shutdown.clone())
    }));
    tokio::select! {
        _ = scopes => {}
        _ = abort => warn!("in-flight reconciliations aborted"),
    }
}

/// One controller over `scope` (a namespace, or `None` for all of them).
async fn run_scope(
    client: Client,
    scope: Option<&str>,
    settings: &Settings,
    metrics: Arc<Metrics>,
    on_synced: impl FnOnce() + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (dirs, secrets_api) = match scope {
        Some(ns) => (
            Api::<ScimDirectory>::namespaced(client.clone(), ns),
            Api::<ObservedSecret>::namespaced(client.clone(), ns),
        ),
        None => (Api::<ScimDirectory>::all(client.clone()), Api::<ObservedSecret>::all(client.clone())),
    };
    let (dir_reader, dir_writer) = reflector::store();
    let secret_cache = SecretCache::default();
    let cached = metrics.cached_secrets.get_or_create(&ScopeLabels { scope: scope.unwrap_or_default().into() }).clone();
    let (synced_tx, secrets_synced) = tokio::sync::watch::channel(false);
    let initial_lists = Arc::new(InitialLists::new(synced_tx, on_synced));
    let secret_changes = streams::secret_changes(secrets_api, secret_cache.clone(), cached, initial_lists.clone());

    let ctx = Arc::new(Context {
        client: client.clone(),
        secrets: secret_cache,
        events: Publisher::new(client, FIELD_MANAGER, &settings.instance),
        metrics,
        failpoint: settings.failpoint.clone(),
        fence: settings.fence.clone(),
        record_key: settings.record_key.clone(),
        entra: settings.entra.clone(),
        min_issue_interval: SignedDuration::try_from(settings.min_issue_interval).unwrap_or(SignedDuration::MAX),
        secrets_synced,
        failures: Mutex::default(),
        exported: Mutex::default(),
        directories: dir_reader.clone(),
        unechoed_status: Mutex::default(),
    });
    let directory_triggers = streams::directory_triggers(dirs, dir_writer, ctx.clone(), initial_lists);

    Controller::for_stream(futures::stream::empty::<Result<ScimDirectory, watcher::Error>>(), dir_reader)
        .reconcile_on(directory_triggers)
        .owns_stream(secret_changes)
        .with_config(kube::runtime::controller::Config::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile failed");
            }
        })
        .await;
}

pub fn error_policy(dir: Arc<ScimDirectory>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&ErrorLabels { error: error.metric_label().into() }).inc();
    if let Some(fenced) = error.fenced() {
        // Not a conflict to retry: this replica is stopping, the next leader reconciles everything.
        tracing::error!(namespace = dir.namespace().unwrap_or_default(), name = dir.name_any(), error = %fenced, "write refused: no longer the leader");
        return Action::await_change();
    }
    let mut failures = ctx.failures.lock().expect("poisoned");
    let n = failures.entry(ObjectRef::from(dir.as_ref())).or_default();
    *n = n.saturating_add(1);
    // 1s, 2s, 4s ... capped at 5 minutes: no hot loop on a conflict that needs a human.
    let delay = Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300));
    warn!(namespace = dir.namespace().unwrap_or_default(), name = dir.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
