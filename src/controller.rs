//! The reconciler: reads the cluster, asks [`policy::decide`], and performs the writes in a crash-safe
//! order: the Secret (token + issue record, one request) first, then the status derived from it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{END_OVERLAP_ANNOTATION, ROTATE_ANNOTATION, ReadyReason, ScimDirectory, ScimDirectoryStatus};
use crate::events::{EventType, Publisher};
use crate::leader::{Fence, Fenced};
use crate::metrics::{DirectoryLabels, ErrorLabels, Metrics, ReasonLabels, ScopeLabels};
use crate::policy::{self, Decision, Desired, IssueReason, IssueRecord, SecretState};
use crate::secret::{self, ObservedSecret, RecordKey, SecretCache, SecretView};
use crate::status;
use crate::token::Token;

pub const FIELD_MANAGER: &str = "scim-token-operator";
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
    /// Becomes true once the Secret cache holds its initial list. Reconciles wait on this channel rather
    /// than on `Store::wait_until_ready` directly: several tasks awaiting that at once were observed to
    /// wake only the first (found by the end-to-end suite with three directories at startup).
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

/// What re-triggers a directory: spec changes (generation) and rotation requests (an annotation, which
/// does not bump the generation). Status writes, including our own, change neither.
fn directory_trigger(dir: &ScimDirectory) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.metadata.generation.hash(&mut h);
    dir.rotation_request().hash(&mut h);
    dir.end_overlap_request().hash(&mut h);
    Some(h.finish())
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

/// The first complete list of each cache of a scope, seen on the watch streams (`InitDone`, after the
/// reflector has stored the list): reconciles wait for the Secret cache, readiness for both. Not
/// `Store::wait_until_ready`: with several waiters on one store (the controller runtime is one), only
/// one was observed to wake, which left a new leader not ready for good.
struct InitialLists {
    secrets: AtomicBool,
    directories: AtomicBool,
    secrets_synced: tokio::sync::watch::Sender<bool>,
    on_synced: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl InitialLists {
    fn new(secrets_synced: tokio::sync::watch::Sender<bool>, on_synced: impl FnOnce() + Send + 'static) -> Self {
        InitialLists {
            secrets: AtomicBool::new(false),
            directories: AtomicBool::new(false),
            secrets_synced,
            on_synced: Mutex::new(Some(Box::new(on_synced))),
        }
    }

    fn secrets_listed(&self) {
        self.secrets.store(true, Ordering::SeqCst);
        self.secrets_synced.send_replace(true);
        self.both_listed();
    }

    fn directories_listed(&self) {
        self.directories.store(true, Ordering::SeqCst);
        self.both_listed();
    }

    fn both_listed(&self) {
        if self.secrets.load(Ordering::SeqCst) && self.directories.load(Ordering::SeqCst) {
            let on_synced = self.on_synced.lock().expect("poisoned").take();
            if let Some(on_synced) = on_synced {
                on_synced();
            }
        }
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
    // Only Secrets carrying our label are watched, never every Secret of the cluster; of those, only
    // the ones a directory controls are cached, and only as what decisions read (a `SecretView`):
    // anyone can put the label on a Secret of their own, of any size.
    let secret_cache = SecretCache::default();
    let cached = metrics.cached_secrets.get_or_create(&ScopeLabels { scope: scope.unwrap_or_default().into() }).clone();
    let cache = secret_cache.clone();
    let (synced_tx, secrets_synced) = tokio::sync::watch::channel(false);
    let initial_lists = Arc::new(InitialLists::new(synced_tx, on_synced));
    let lists = initial_lists.clone();
    let secret_stream =
        watcher(secrets_api, watcher::Config::default().labels(secret::MANAGED_SELECTOR).any_semantic())
            .default_backoff()
            .filter_map(|event| std::future::ready(only_directory_secrets(event)))
            // Every event goes into the cache; the echoes of our own writes go no further.
            .try_filter_map(move |mut event| {
                let trigger = cache.apply(&mut event);
                cached.set(i64::try_from(cache.len()).unwrap_or(i64::MAX));
                if matches!(event, watcher::Event::InitDone) {
                    lists.secrets_listed();
                }
                std::future::ready(Ok(trigger.then_some(event)))
            })
            .touched_objects()
            .predicate_filter(predicates::resource_version, Default::default());

    let ctx = Arc::new(Context {
        client: client.clone(),
        secrets: secret_cache,
        events: Publisher::new(client, FIELD_MANAGER, &settings.instance),
        metrics,
        failpoint: settings.failpoint.clone(),
        fence: settings.fence.clone(),
        record_key: settings.record_key.clone(),
        min_issue_interval: SignedDuration::try_from(settings.min_issue_interval).unwrap_or(SignedDuration::MAX),
        secrets_synced,
        failures: Mutex::default(),
        exported: Mutex::default(),
        directories: dir_reader.clone(),
        unechoed_status: Mutex::default(),
    });

    let forget = ctx.clone();
    let cache = dir_reader.clone();
    let directory_stream = watcher(dirs, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(strip_directory_noise)
        .reflect(dir_writer)
        // A deleted directory gets no reconcile to clean up after it: drop its expiry series and
        // backoff state here, so neither outlives it.
        .inspect_ok(move |event| match event {
            watcher::Event::Delete(dir) => forget.forget(&ObjectRef::from(dir)),
            watcher::Event::InitDone => {
                forget.prune(&cache);
                initial_lists.directories_listed();
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(directory_trigger, Default::default());

    // A reconcile request needs the directory's name and namespace only. Made from the object, as
    // `for_stream` makes it, it would also copy the UID and resourceVersion: two more strings per
    // directory in each of the scheduler's two indexes, where every directory waits for its renewal.
    let directory_triggers = directory_stream.filter_map(|triggered| {
        std::future::ready(match triggered {
            Ok(dir) => Some(ObjectRef::new(&dir.name_any()).within(&dir.namespace().unwrap_or_default())),
            Err(error) => {
                warn!(%error, "watching ScimDirectories failed; retrying with backoff");
                None
            }
        })
    });

    Controller::for_stream(futures::stream::empty::<Result<ScimDirectory, watcher::Error>>(), dir_reader)
        .reconcile_on(directory_triggers)
        .owns_stream(secret_stream)
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

/// Keeps Secrets without a directory's controller reference out of the cache: one seen before is
/// evicted (as if deleted), one seen in a fresh list is skipped.
fn only_directory_secrets(
    event: Result<watcher::Event<ObservedSecret>, watcher::Error>,
) -> Option<Result<watcher::Event<ObservedSecret>, watcher::Error>> {
    use watcher::Event::{Apply, Delete, InitApply};
    match event {
        Ok(Apply(s)) if !secret::is_directory_controlled(&s.metadata) => Some(Ok(Delete(s))),
        Ok(InitApply(s)) if !secret::is_directory_controlled(&s.metadata) => None,
        other => Some(other),
    }
}

/// The cache keeps what decisions read. Of the metadata maps that is two annotations: managedFields,
/// labels and other tools' annotations (kubectl's last-applied copy of the whole object, Argo CD's
/// tracking id) are never read, and at 10,000 directories their maps would be a good part of the
/// memory (a B-tree node is ~540 bytes however few entries it holds).
fn strip_directory_noise(d: &mut ScimDirectory) {
    d.metadata.managed_fields = None;
    d.metadata.labels = None;
    if let Some(annotations) = d.metadata.annotations.as_mut() {
        annotations.retain(|key, _| key == ROTATE_ANNOTATION || key == END_OVERLAP_ANNOTATION);
        if annotations.is_empty() {
            d.metadata.annotations = None;
        }
    }
}

pub async fn reconcile(dir: Arc<ScimDirectory>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let mut dir = ctx.fresh(dir).await;
    let mut rounds = 0;
    let result = loop {
        match reconcile_inner(&dir, &ctx).await {
            Err(Error::StaleDirectory(current)) if rounds < 2 => {
                rounds += 1;
                dir = Arc::new(*current);
            }
            other => break other,
        }
    };
    ctx.metrics.observe_reconcile(started.elapsed());
    if result.is_ok() {
        ctx.failures.lock().expect("poisoned").remove(&ObjectRef::from(dir.as_ref()));
    }
    result
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

async fn reconcile_inner(dir: &ScimDirectory, ctx: &Context) -> Result<Action> {
    let ns = dir.namespace().ok_or(Error::NotNamespaced)?;
    let name = dir.name_any();
    let secret_name = dir.secret_name();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut synced = ctx.secrets_synced.clone();
    tokio::time::timeout(Duration::from_secs(60), synced.wait_for(|s| *s))
        .await
        .map_err(|_| Error::CacheNotReady)?
        .map_err(|_| Error::CacheNotReady)?;

    let desired = Desired::parse(
        dir.spec.rotation_generation,
        dir.spec.token_expires_in.as_deref(),
        dir.spec.renew_before.as_deref(),
        dir.rotation_request(),
    )
    .and_then(|d| d.with_overlap(dir.spec.rotation_overlap.as_deref(), dir.end_overlap_request()));
    let status_view = status::view(dir);
    let mut observed: Option<Arc<SecretView>> = ctx.secrets.get(&ns, &secret_name);
    // The cache holds only Secrets that carry our label and a directory's controller reference, so a
    // miss proves nothing: a token is generated once the API server confirms there is no Secret. One
    // exception saves a new directory a round trip: the first token of a directory that has no status
    // yet. Its create is the check, refused without writing anything if any Secret has the name (then
    // the Secret is looked up and the decision made again), and a refused create is the only request
    // that carries a token that never becomes valid: once per directory, since the status written
    // after it (a conflict, say) sends every later attempt through the look-up first. Any other issue
    // replaces a token the status records, and a Secret whose label was stripped must be repaired, not
    // deferred or replaced: confirmed first.
    let mut confirmed = observed.is_some();
    let mut create_refused = false;

    // A few rounds at most: after a cache miss turned out to be a Secret the cache cannot see (one
    // whose labels were stripped, or a foreign one), and after a create lost a race with another writer.
    for _ in 0..4 {
        let now = Timestamp::now();
        let state = secret::observe(dir, observed.as_deref(), &ctx.record_key);
        let decision = policy::decide(desired.as_ref().map_err(String::as_str), &status_view, &state, now);
        let first_token =
            matches!(decision, Decision::Issue(IssueReason::Initial)) && dir.status.is_none() && !create_refused;
        if matches!(decision, Decision::Issue(_)) && !confirmed && !first_token {
            // Confirmed before anything is throttled or generated: the Secret may well be there (its
            // label stripped, or someone else's), and then nothing is to be issued at all.
            confirmed = true;
            observed = look_up(ctx, dir, &secrets).await?.map(Arc::new);
            if observed.is_some() {
                // A Secret read afresh may record an issue for a newer spec than the cached directory
                // shows: deciding on both would issue a token for a spec that no longer exists.
                current_directory(ctx, dir).await?;
            }
            continue;
        }
        let decision = policy::throttle(decision, &status_view, &state, now, ctx.min_issue_interval);
        debug!(namespace = %ns, name = %name, ?decision, "decided");
        match decision {
            Decision::InvalidSpec(message) => {
                let status = status::with(dir, None, status::condition(dir, ReadyReason::InvalidSpec, &message, now));
                if write_status(ctx, dir, status).await? {
                    publish(ctx, dir, EventType::Warning, ReadyReason::InvalidSpec.as_str(), &message).await;
                }
                return Ok(Action::await_change());
            }
            Decision::Conflict => {
                // Who controls the Secret is not said: the reader of this status may not be allowed to know.
                let message = format!(
                    "Secret {secret_name} exists and is not managed by this ScimDirectory; it is left untouched. Delete it or choose another spec.secretName"
                );
                // Fail closed: the token fields leave the status, so the verifier stops accepting a
                // token the operator can no longer rotate or revoke (the Secret is no longer its own).
                let status =
                    status::without_token(dir, status::condition(dir, ReadyReason::SecretConflict, &message, now));
                if write_status(ctx, dir, status).await? {
                    publish(ctx, dir, EventType::Warning, ReadyReason::SecretConflict.as_str(), &message).await;
                }
                return Err(Error::SecretConflict(secret_name));
            }
            Decision::Deferred { reason, last_issued_at, until } => {
                ctx.metrics.issues_deferred.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
                let message = format!(
                    "a new token ({}) is deferred until {until}: the last one was issued at {last_issued_at}, \
                     less than the minimum interval between automatic issues ago. If this repeats, something \
                     else is rewriting Secret {secret_name}",
                    reason.as_str()
                );
                let status = status::with(dir, None, status::condition(dir, ReadyReason::IssueDeferred, &message, now));
                if write_status(ctx, dir, status).await? {
                    publish(ctx, dir, EventType::Warning, ReadyReason::IssueDeferred.as_str(), &message).await;
                }
                warn!(namespace = %ns, name = %name, reason = reason.as_str(), %until, "automatic issue deferred");
                return Ok(Action::requeue(duration_until(until, now)));
            }
            Decision::Issue(reason) => {
                let desired = desired.as_ref().expect("an Issue decision implies a valid spec");
                let token = Token::generate();
                let record = policy::IssueRecord {
                    previous: policy::overlap(desired, reason, &state, now),
                    ..policy::new_record(desired, token.hash(), reason, now)
                };
                let manifest = secret::desired_secret(dir, &token, &record, &ctx.record_key);
                let written = match &state {
                    SecretState::Missing => {
                        ctx.fence.check()?;
                        match secrets
                            .create(&post_params(), &secret::initial_secret(dir, &token, &record, &ctx.record_key))
                            .await
                        {
                            // The template goes on with server-side apply, so that removing a key from it
                            // later removes it from the Secret. A crash in between leaves a Secret that
                            // already holds the token and its record: it is adopted, and the template
                            // applied then, as a metadata repair.
                            Ok(created) if secret::has_template(dir) => {
                                ctx.secrets.expect_echo(&created.metadata);
                                apply_secret(ctx, &secrets, manifest, created.metadata.resource_version.clone()).await
                            }
                            Ok(created) => {
                                ctx.secrets.expect_echo(&created.metadata);
                                Ok(())
                            }
                            Err(kube::Error::Api(s)) if s.code == 409 => {
                                // A Secret the cache did not show, or one created since we looked: look
                                // (again) and decide again.
                                create_refused = true;
                                confirmed = false;
                                observed = None;
                                continue;
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                    _ => {
                        let version = observed.as_ref().and_then(|s| s.resource_version.clone());
                        apply_secret(ctx, &secrets, manifest, version).await
                    }
                };
                if let Err(error) = written {
                    return Err(report_write_failure(ctx, dir, error, &token, now).await);
                }
                failpoint(ctx, "after-secret-write");
                ctx.metrics.tokens_issued.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
                info!(namespace = %ns, name = %name, secret = %secret_name, reason = reason.as_str(), token_hash = %record.token_hash, "token issued");
                // A first token gets no Event: the status this reconcile writes (Ready=True TokenIssued,
                // its time, hash and Secret) already says all an Event would, and at a mass issuance
                // the Event was a fourth write per new directory (measured in BENCHMARKS.md). A token
                // replacing another, a repair and every warning do get one: the status shows only
                // the latest state, not that it changed.
                if reason == IssueReason::Initial {
                    return finish(ctx, dir, desired, &record, false, now).await;
                }
                let event_type = if reason.is_repair() { EventType::Warning } else { EventType::Normal };
                let mut note =
                    format!("{} ({}); Secret {secret_name}, {}", reason.describe(), reason.as_str(), record.token_hash);
                if let Some(previous) = &record.previous {
                    note.push_str(&format!("; the previous token stays valid until {}", previous.valid_until));
                }
                // The Event goes out beside the status write rather than before it: Ready is what the
                // user waits for, and a reconcile holds one of `--concurrency` slots for as many round
                // trips as it makes one after the other. Its reason names the cause: Events of a
                // directory with equal reasons fold into one series that keeps the first note (see
                // `events`), so one generic reason would hide later causes.
                let (finished, ()) = tokio::join!(
                    finish(ctx, dir, desired, &record, false, now),
                    publish(ctx, dir, event_type, reason.as_str(), &note)
                );
                return finished;
            }
            Decision::Keep { record, restore_record, expired, overlap_ended } => {
                let desired = desired.as_ref().expect("a Keep decision implies a valid spec");
                if let Some(current) = &observed
                    && (restore_record || secret::metadata_drifted(dir, current, &record, &ctx.record_key))
                {
                    restore_metadata(ctx, dir, &secrets, current, &record, now).await?;
                    if overlap_ended {
                        info!(namespace = %ns, name = %name, secret = %secret_name, "ended the overlap window on request");
                        let note = format!(
                            "the previous token is no longer accepted: the overlap was ended with the {END_OVERLAP_ANNOTATION} annotation"
                        );
                        publish(ctx, dir, EventType::Normal, "OverlapEnded", &note).await;
                    } else {
                        info!(namespace = %ns, name = %name, secret = %secret_name, "restored the Secret's labels and annotations");
                    }
                }
                return finish(ctx, dir, desired, &record, expired, now).await;
            }
        }
    }
    // The Secret kept changing under us: let the backoff retry.
    Err(Error::Kube(kube::Error::Api(Box::new(
        kube::core::Status::failure("the Secret changed while being written", "Conflict").with_code(409),
    ))))
}

/// Re-applies the Secret's labels and annotations around the token it already holds. The only place
/// the operator reads a stored plaintext, and only to write it back unchanged: server-side apply of
/// the complete Secret would otherwise drop the key. The write is guarded by the resourceVersion the
/// decision was made on, and the token must still be the one the record names.
async fn restore_metadata(
    ctx: &Context,
    dir: &ScimDirectory,
    secrets: &Api<Secret>,
    current: &SecretView,
    record: &IssueRecord,
    now: Timestamp,
) -> Result<()> {
    let full = secrets.get(&dir.secret_name()).await?;
    let token = secret::stored_token(&full).filter(|t| t.hash() == record.token_hash).ok_or_else(|| {
        Error::Kube(kube::Error::Api(Box::new(
            kube::core::Status::failure("the Secret's token changed while its metadata was restored", "Conflict")
                .with_code(409),
        )))
    })?;
    let manifest = secret::desired_secret(dir, &token, record, &ctx.record_key);
    match apply_secret(ctx, secrets, manifest, current.resource_version.clone()).await {
        Ok(()) => Ok(()),
        Err(error) => Err(report_write_failure(ctx, dir, error, &token, now).await),
    }
}

/// A Secret write the API server refused for good (422: invalid, e.g. an immutable Secret or a
/// template label value it rejects; 403: RBAC or an admission policy) needs a human: it is put in the
/// status as `Ready=False, reason=SecretWriteFailed` with the API server's message and a Warning Event,
/// and retried with backoff. Anything else (a 409, a timeout) is an ordinary retry.
async fn report_write_failure(
    ctx: &Context,
    dir: &ScimDirectory,
    error: Error,
    token: &Token,
    now: Timestamp,
) -> Error {
    // The API server does not echo data values today, but neither the status, an Event nor the log
    // that `error_policy` writes may ever be how a token leaks, whatever the status code.
    let error = scrub(error, token);
    let Error::Kube(kube::Error::Api(status)) = &error else { return error };
    if !matches!(status.code, 403 | 422) {
        return error;
    }
    let reason = &status.message;
    let message = format!("the API server refused to write Secret {}: {reason}", dir.secret_name());
    let status = status::with(dir, None, status::condition(dir, ReadyReason::SecretWriteFailed, &message, now));
    match write_status(ctx, dir, status).await {
        Ok(true) => publish(ctx, dir, EventType::Warning, ReadyReason::SecretWriteFailed.as_str(), &message).await,
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not report the failed Secret write in the status"),
    }
    Error::SecretWriteRefused(message)
}

/// The error of a request that carried `token`, with the token (plaintext or base64) removed from
/// every message the API server sent back.
fn scrub(error: Error, token: &Token) -> Error {
    match error {
        Error::Kube(kube::Error::Api(mut status)) => {
            status.message = token.redact_from(&status.message);
            status.reason = token.redact_from(&status.reason);
            if let Some(details) = status.details.as_mut() {
                for cause in &mut details.causes {
                    cause.message = token.redact_from(&cause.message);
                    cause.field = token.redact_from(&cause.field);
                }
            }
            Error::Kube(kube::Error::Api(status))
        }
        other => other,
    }
}

fn duration_until(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// Reads the directory's Secret from the API server, past the cache: metadata first (a foreign
/// Secret's data is none of our business), then, for one of ours, its token hash.
async fn look_up(ctx: &Context, dir: &ScimDirectory, secrets: &Api<Secret>) -> Result<Option<SecretView>> {
    let name = dir.secret_name();
    Ok(match secrets.get_metadata_opt(&name).await? {
        None => None,
        Some(found) if secret::is_controlled_by(dir, &found.metadata) => {
            let observed: Api<ObservedSecret> =
                Api::namespaced(ctx.client.clone(), &dir.namespace().unwrap_or_default());
            observed.get_opt(&name).await?.as_ref().map(SecretView::from)
        }
        Some(found) => {
            Some(SecretView::from(&ObservedSecret { metadata: found.metadata, ..ObservedSecret::default() }))
        }
    })
}

/// Fails with [`Error::StaleDirectory`] if the API server holds a newer version of `dir` than the cache.
/// A list by name, not a get: the operator's RBAC grants list and watch on directories, not get, and a
/// list without a resourceVersion is as fresh a read as a get.
async fn current_directory(ctx: &Context, dir: &ScimDirectory) -> Result<()> {
    let api: Api<ScimDirectory> = Api::namespaced(ctx.client.clone(), &dir.namespace().unwrap_or_default());
    let by_name = kube::api::ListParams::default().fields(&format!("metadata.name={}", dir.name_any()));
    match api.list(&by_name).await?.items.into_iter().next() {
        Some(current) if current.metadata.resource_version != dir.metadata.resource_version => {
            Err(Error::StaleDirectory(Box::new(current)))
        }
        // Deleted meanwhile: the Secret goes with it (garbage collection); a write would 404 or 409.
        _ => Ok(()),
    }
}

/// Writes the status for a token that stands and schedules the next wake-up (renewal or expiry).
async fn finish(
    ctx: &Context,
    dir: &ScimDirectory,
    desired: &Desired,
    record: &IssueRecord,
    expired: bool,
    now: Timestamp,
) -> Result<Action> {
    let ready = if expired {
        let message = format!(
            "the token expired at {}; rotate it (increase spec.rotationGeneration or set the scim.tokenops.dev/rotate annotation)",
            record.expires_at.map(|t| t.to_string()).unwrap_or_default()
        );
        status::condition(dir, ReadyReason::TokenExpired, &message, now)
    } else if record.reason == IssueReason::Initial {
        status::condition(dir, ReadyReason::TokenIssued, record.reason.describe(), now)
    } else {
        let message = format!("{} ({})", record.reason.describe(), record.reason.as_str());
        status::condition(dir, ReadyReason::TokenRotated, &message, now)
    };
    ctx.export_expiry(dir, record.expires_at);
    // An overlap that has ended leaves the status (the verifier would refuse the token anyway).
    let shown = policy::with_live_overlap(record, now);
    if write_status(ctx, dir, status::with(dir, Some(&shown), ready)).await? && expired {
        publish(ctx, dir, EventType::Warning, ReadyReason::TokenExpired.as_str(), "the token has expired").await;
    }
    Ok(match policy::next_wakeup(desired, record, now) {
        Some(at) => Action::requeue(duration_until(at, now)),
        None => Action::await_change(),
    })
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }
}

/// Server-side applies our complete Secret, guarded by the resourceVersion we decided on: a concurrent
/// change (or a stale cache) makes the write fail with 409 instead of acting on outdated facts, which is
/// what keeps one request from rotating twice.
async fn apply_secret(
    ctx: &Context,
    api: &Api<Secret>,
    mut manifest: Secret,
    resource_version: Option<String>,
) -> Result<()> {
    manifest.metadata.resource_version = resource_version;
    let mut value = serde_json::to_value(&manifest).expect("a Secret serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    let name = manifest.metadata.name.clone().unwrap_or_default();
    ctx.fence.check()?;
    let written = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(value)).await?;
    ctx.secrets.expect_echo(&written.metadata);
    Ok(())
}

/// Exits the process at a named point, for the crash-safety tests. Compiled only with the
/// `failpoints` feature (the test command enables it), so a release binary has no such switch.
fn failpoint(ctx: &Context, name: &str) {
    if cfg!(feature = "failpoints") && ctx.failpoint.as_deref() == Some(name) {
        warn!(failpoint = name, "failpoint hit: exiting");
        std::process::exit(FAILPOINT_EXIT_CODE);
    }
}

/// Writes the status if it differs from the current one. Returns whether it wrote. Guarded by the
/// resourceVersion the decision was made on: a status decided on a stale directory fails with 409.
async fn write_status(ctx: &Context, dir: &ScimDirectory, status: ScimDirectoryStatus) -> Result<bool> {
    if dir.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<ScimDirectory> = Api::namespaced(ctx.client.clone(), &dir.namespace().unwrap_or_default());
    let mut patch = json!({
        "apiVersion": ScimDirectory::api_version(&()),
        "kind": ScimDirectory::kind(&()),
        "status": status,
    });
    if let Some(version) = &dir.metadata.resource_version {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    ctx.fence.check()?;
    let written =
        api.patch_status(&dir.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch)).await?;
    if let Some(replaced) = dir.metadata.resource_version.clone()
        && written.metadata.resource_version.as_ref() != Some(&replaced)
    {
        ctx.unechoed_status.lock().expect("poisoned").insert(ObjectRef::from(dir), replaced);
    }
    Ok(true)
}

async fn publish(ctx: &Context, dir: &ScimDirectory, type_: EventType, reason: &str, note: &str) {
    if let Err(e) = ctx.fence.check() {
        warn!(error = %e, reason, "Event not published: no longer the leader");
        return;
    }
    if let Err(e) = ctx.events.publish(dir, type_, reason, note).await {
        warn!(error = %e, "failed to publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScimDirectorySpec;
    use std::collections::BTreeMap;

    #[test]
    fn cached_directories_keep_the_annotations_decisions_read_and_nothing_else() {
        let mut dir = ScimDirectory::new("acme", ScimDirectorySpec::default());
        dir.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/instance".into(), "tenants".into())]));
        dir.metadata.annotations = Some(BTreeMap::from([
            (ROTATE_ANNOTATION.into(), "r-1".into()),
            (END_OVERLAP_ANNOTATION.into(), "e-1".into()),
            ("argocd.argoproj.io/tracking-id".into(), "tenants:scim.tokenops.dev/ScimDirectory:x/acme".into()),
            ("kubectl.kubernetes.io/last-applied-configuration".into(), "{}".into()),
        ]));
        let trigger = directory_trigger(&dir);
        strip_directory_noise(&mut dir);
        assert_eq!((dir.rotation_request(), dir.end_overlap_request()), (Some("r-1"), Some("e-1")));
        assert_eq!(dir.metadata.annotations.as_ref().map(BTreeMap::len), Some(2));
        assert_eq!(dir.metadata.labels, None);
        assert_eq!(directory_trigger(&dir), trigger, "what triggers a reconcile is kept");

        dir.metadata.annotations = Some(BTreeMap::from([("other".into(), "x".into())]));
        strip_directory_noise(&mut dir);
        assert_eq!(dir.metadata.annotations, None);
    }

    #[test]
    fn errors_of_token_writes_are_scrubbed_whatever_their_code() {
        let token = Token::generate();
        let b64 = serde_json::to_string(&k8s_openapi::ByteString(token.expose().as_bytes().to_vec())).unwrap();
        for code in [400, 403, 409, 422, 500] {
            let mut status =
                kube::core::Status::failure(&format!("bad {} / {b64}", token.expose()), "Invalid").with_code(code);
            status.details = Some(
                serde_json::from_value(json!({ "causes": [{
                    "reason": "FieldValueInvalid",
                    "message": format!("Invalid value: {b64}"),
                    "field": "data.token",
                }] }))
                .unwrap(),
            );
            let scrubbed = scrub(Error::Kube(kube::Error::Api(Box::new(status))), &token);
            let shown = format!("{scrubbed} {scrubbed:?}");
            assert!(!shown.contains(token.expose()) && !shown.contains(b64.trim_matches('"')), "{code}: {shown}");
        }
    }
}
