//! The reconciler: reads the cluster, asks [`policy::decide`], and performs the writes in a crash-safe
//! order: the Secret (token + issue record, one request) first, then the status derived from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{ScimDirectory, ScimDirectoryStatus};
use crate::metrics::{DirectoryLabels, ErrorLabels, Metrics, ReasonLabels};
use crate::policy::{self, Decision, Desired, IssueReason, IssueRecord, SecretState, StatusView};
use crate::secret;
use crate::token::{Token, TokenHash};

pub const FIELD_MANAGER: &str = "scim-token-operator";
/// Set to `after-secret-write` to make the process exit right after writing a Secret and before
/// writing the status: the end-to-end suite uses it to prove crash safety.
pub const FAILPOINT_ENV: &str = "SCIM_TOKEN_OPERATOR_FAILPOINT";
pub const FAILPOINT_EXIT_CODE: i32 = 86;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("Secret {0} exists and is not controlled by this ScimDirectory; it is left untouched")]
    SecretConflict(String),
    #[error("the Secret cache never became ready")]
    CacheNotReady,
    #[error("ScimDirectory has no namespace")]
    NotNamespaced,
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "write_conflict",
            Error::Kube(_) => "kube",
            Error::SecretConflict(_) => "secret_conflict",
            Error::CacheNotReady => "cache_not_ready",
            Error::NotNamespaced => "not_namespaced",
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
}

/// Shared state of all reconciliations.
pub struct Context {
    pub client: Client,
    pub secrets: Store<Secret>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub failpoint: Option<String>,
    /// Becomes true once the Secret cache holds its initial list. Reconciles wait on this channel rather
    /// than on `Store::wait_until_ready` directly: several tasks awaiting that at once were observed to
    /// wake only the first (found by the end-to-end suite with three directories at startup).
    secrets_synced: tokio::sync::watch::Receiver<bool>,
    /// Consecutive failures per directory, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<ScimDirectory>, u32>>,
}

impl Context {
    /// Drops what is kept per directory (its expiry series, its backoff state) once it is deleted.
    fn forget(&self, dir: &ScimDirectory) {
        let labels = DirectoryLabels { namespace: dir.namespace().unwrap_or_default(), name: dir.name_any() };
        self.metrics.token_expiry.remove(&labels);
        self.failures.lock().expect("poisoned").remove(&ObjectRef::from(dir));
    }
}

/// What re-triggers a directory: spec changes (generation) and rotation requests (an annotation, which
/// does not bump the generation). Status writes, including our own, change neither.
fn directory_trigger(dir: &ScimDirectory) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.metadata.generation.hash(&mut h);
    dir.rotation_request().hash(&mut h);
    Some(h.finish())
}

/// Runs the controller until `shutdown` resolves: one controller over all namespaces, or one per
/// watched namespace (each with its own namespaced watches and caches, so the operator needs no
/// cluster-wide permission on Secrets). `ready` turns true once every cache holds its initial list.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
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
    futures::future::join_all(scopes.into_iter().map(|scope| {
        run_scope(client.clone(), scope, &settings, metrics.clone(), on_synced.clone(), shutdown.clone())
    }))
    .await;
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
        Some(ns) => {
            (Api::<ScimDirectory>::namespaced(client.clone(), ns), Api::<Secret>::namespaced(client.clone(), ns))
        }
        None => (Api::<ScimDirectory>::all(client.clone()), Api::<Secret>::all(client.clone())),
    };

    let (dir_reader, dir_writer) = reflector::store();
    let (secret_reader, secret_writer) = reflector::store();
    // Only Secrets carrying our label are watched and cached, never every Secret of the cluster.
    let secret_stream =
        watcher(secrets_api, watcher::Config::default().labels(secret::MANAGED_SELECTOR).any_semantic())
            .default_backoff()
            .modify(strip_secret_noise)
            .reflect(secret_writer)
            .touched_objects()
            .predicate_filter(predicates::resource_version, Default::default());

    let (synced_tx, secrets_synced) = tokio::sync::watch::channel(false);
    let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(settings.instance.clone()) };
    let ctx = Arc::new(Context {
        client: client.clone(),
        secrets: secret_reader.clone(),
        recorder: Recorder::new(client, reporter),
        metrics,
        failpoint: settings.failpoint.clone(),
        secrets_synced,
        failures: Mutex::default(),
    });

    let forget = ctx.clone();
    let directory_stream = watcher(dirs, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(strip_directory_noise)
        .reflect(dir_writer)
        // A deleted directory gets no reconcile to clean up after it: drop its expiry series and
        // backoff state here, so neither outlives it.
        .inspect_ok(move |event| {
            if let watcher::Event::Delete(dir) = event {
                forget.forget(dir);
            }
        })
        .applied_objects()
        .predicate_filter(directory_trigger, Default::default());

    {
        let (d, s) = (dir_reader.clone(), secret_reader.clone());
        tokio::spawn(async move {
            if s.wait_until_ready().await.is_ok() {
                let _ = synced_tx.send(true);
                if d.wait_until_ready().await.is_ok() {
                    on_synced();
                }
            }
        });
    }

    Controller::for_stream(directory_stream, dir_reader)
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

/// Drops managedFields from cached Secrets: they are never read and cost memory at scale.
fn strip_secret_noise(s: &mut Secret) {
    s.metadata.managed_fields = None;
}

/// The cache keeps what decisions read: managedFields and kubectl's last-applied copy of the whole
/// object are never read, and at 10,000 directories they are a good part of the memory.
fn strip_directory_noise(d: &mut ScimDirectory) {
    d.metadata.managed_fields = None;
    if let Some(annotations) = d.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

pub async fn reconcile(dir: Arc<ScimDirectory>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&dir, &ctx).await;
    ctx.metrics.observe_reconcile(started.elapsed());
    if result.is_ok() {
        ctx.failures.lock().expect("poisoned").remove(&ObjectRef::from(dir.as_ref()));
    }
    result
}

pub fn error_policy(dir: Arc<ScimDirectory>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&ErrorLabels { error: error.metric_label().into() }).inc();
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
    );
    let status_view = status_view(dir);
    let mut observed: Option<Secret> = ctx.secrets.get(&ObjectRef::new(&secret_name).within(&ns)).map(|s| (*s).clone());

    // At most two rounds: the second only after a create found a Secret our label-filtered cache cannot
    // see (for example one whose labels were stripped, or a foreign one).
    for _ in 0..2 {
        let now = Timestamp::now();
        let state = secret::observe(dir, observed.as_ref());
        let decision = policy::decide(desired.as_ref().map_err(String::as_str), &status_view, &state, now);
        debug!(namespace = %ns, name = %name, ?decision, "decided");
        match decision {
            Decision::InvalidSpec(message) => {
                let status = status_with(dir, None, condition(dir, false, "InvalidSpec", &message, now));
                if write_status(ctx, dir, status).await? {
                    publish(ctx, dir, EventType::Warning, "InvalidSpec", &message).await;
                }
                return Ok(Action::await_change());
            }
            Decision::Conflict { controller } => {
                let message = match controller {
                    Some(owner) => format!("Secret {secret_name} is controlled by {owner}; it is left untouched"),
                    None => format!(
                        "Secret {secret_name} exists and is not managed by this ScimDirectory; it is left untouched. Delete it or choose another spec.secretName"
                    ),
                };
                let status = status_with(dir, None, condition(dir, false, "SecretConflict", &message, now));
                if write_status(ctx, dir, status).await? {
                    publish(ctx, dir, EventType::Warning, "SecretConflict", &message).await;
                }
                return Err(Error::SecretConflict(secret_name));
            }
            Decision::Issue(reason) => {
                let desired = desired.as_ref().expect("an Issue decision implies a valid spec");
                let token = Token::generate();
                let record = policy::new_record(desired, token.hash(), reason, now);
                let manifest = secret::desired_secret(dir, &token, &record);
                match &state {
                    SecretState::Missing => {
                        match secrets.create(&post_params(), &secret::initial_secret(dir, &token, &record)).await {
                            // The template goes on with server-side apply, so that removing a key from it
                            // later removes it from the Secret. A crash in between leaves a Secret that
                            // already holds the token and its record: it is adopted, and the template
                            // applied then, as a metadata repair.
                            Ok(created) if secret::has_template(dir) => {
                                apply_secret(&secrets, manifest, Some(&created)).await?
                            }
                            Ok(_) => {}
                            Err(kube::Error::Api(s)) if s.code == 409 => {
                                // Invisible to our cache: look at it directly and decide again.
                                observed = secrets.get_opt(&secret_name).await?;
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    _ => apply_secret(&secrets, manifest, observed.as_ref()).await?,
                }
                failpoint(ctx, "after-secret-write");
                ctx.metrics.tokens_issued.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
                info!(namespace = %ns, name = %name, secret = %secret_name, reason = reason.as_str(), token_hash = %record.token_hash, "token issued");
                let event_type = if reason.is_repair() { EventType::Warning } else { EventType::Normal };
                // The Event's reason names the cause: the Recorder folds Events with equal reasons into one
                // series that keeps the first note, so one generic reason would hide later causes.
                let event_reason = if reason == IssueReason::Initial { "TokenIssued" } else { reason.as_str() };
                let note =
                    format!("{} ({}); Secret {secret_name}, {}", reason.describe(), reason.as_str(), record.token_hash);
                publish(ctx, dir, event_type, event_reason, &note).await;
                return finish(ctx, dir, desired, &record, false, now).await;
            }
            Decision::Keep { record, restore_record, expired } => {
                let desired = desired.as_ref().expect("a Keep decision implies a valid spec");
                if let Some(current) = &observed
                    && (restore_record || secret::metadata_drifted(dir, current, &record))
                    && let Some(token) = secret::stored_token(current)
                {
                    apply_secret(&secrets, secret::desired_secret(dir, &token, &record), Some(current)).await?;
                    info!(namespace = %ns, name = %name, secret = %secret_name, "restored the Secret's labels and annotations");
                }
                return finish(ctx, dir, desired, &record, expired, now).await;
            }
        }
    }
    // Two creates in a row hit a Secret that then vanished: let the backoff retry.
    Err(Error::Kube(kube::Error::Api(Box::new(
        kube::core::Status::failure("the Secret changed while being written", "Conflict").with_code(409),
    ))))
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
        condition(dir, false, "TokenExpired", &message, now)
    } else if record.reason == IssueReason::Initial {
        condition(dir, true, "TokenIssued", record.reason.describe(), now)
    } else {
        condition(dir, true, "TokenRotated", &format!("{} ({})", record.reason.describe(), record.reason.as_str()), now)
    };
    let labels = DirectoryLabels { namespace: dir.namespace().unwrap_or_default(), name: dir.name_any() };
    match record.expires_at {
        Some(at) => {
            ctx.metrics.token_expiry.get_or_create(&labels).set(at.as_second());
        }
        None => {
            ctx.metrics.token_expiry.remove(&labels);
        }
    }
    if write_status(ctx, dir, status_with(dir, Some(record), ready)).await? && expired {
        publish(ctx, dir, EventType::Warning, "TokenExpired", "the token has expired").await;
    }
    Ok(match policy::next_wakeup(desired, record, now) {
        Some(at) => Action::requeue(Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)),
        None => Action::await_change(),
    })
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }
}

/// Server-side applies our complete Secret, guarded by the resourceVersion we decided on: a concurrent
/// change (or a stale cache) makes the write fail with 409 instead of acting on outdated facts, which is
/// what keeps one request from rotating twice.
async fn apply_secret(api: &Api<Secret>, mut manifest: Secret, observed: Option<&Secret>) -> Result<()> {
    manifest.metadata.resource_version = observed.and_then(|s| s.metadata.resource_version.clone());
    let mut value = serde_json::to_value(&manifest).expect("a Secret serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    let name = manifest.metadata.name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(value)).await?;
    Ok(())
}

fn failpoint(ctx: &Context, name: &str) {
    if ctx.failpoint.as_deref() == Some(name) {
        warn!(failpoint = name, "failpoint hit: exiting");
        std::process::exit(FAILPOINT_EXIT_CODE);
    }
}

/// The issue record the status vouches for, used to restore a Secret's stripped annotations.
fn status_view(dir: &ScimDirectory) -> StatusView {
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
fn status_with(dir: &ScimDirectory, record: Option<&IssueRecord>, ready: Condition) -> ScimDirectoryStatus {
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

fn condition(dir: &ScimDirectory, ready: bool, reason: &str, message: &str, now: Timestamp) -> Condition {
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

/// Writes the status if it differs from the current one. Returns whether it wrote.
async fn write_status(ctx: &Context, dir: &ScimDirectory, status: ScimDirectoryStatus) -> Result<bool> {
    if dir.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<ScimDirectory> = Api::namespaced(ctx.client.clone(), &dir.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": ScimDirectory::api_version(&()),
        "kind": ScimDirectory::kind(&()),
        "status": status,
    });
    api.patch_status(&dir.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch)).await?;
    Ok(true)
}

async fn publish(ctx: &Context, dir: &ScimDirectory, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &dir.object_ref(&())).await {
        warn!(error = %e, "failed to publish event");
    }
}
