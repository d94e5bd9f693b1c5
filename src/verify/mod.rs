//! `scim-token-operator verify`: the verifier. A stateless, read-only server that authenticates SCIM
//! requests for proxies, holding only token hashes.
//!
//! It watches ScimDirectories (never Secrets: it has no access to them), keeps an [`index::Index`]
//! from token hash to directory, and answers external-auth requests over it ([`http`]). Every
//! replica serves (no leader election); a replica is ready once its initial list is in, and until its
//! watch has been failing for longer than `--max-staleness` ([`freshness`]). It makes no writes to
//! the API server. Every listener is bounded: connections, request heads, time (see
//! [`crate::server`]), and gRPC messages and streams.

pub mod directory;
pub mod freshness;
pub mod grpc;
pub mod http;
pub mod index;
pub mod metrics;
pub mod verifier;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Args;
use futures::TryStreamExt;
use kube::Client;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::task::JoinHandle;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use envoy_types::ext_authz::v3::pb::AuthorizationServer;

use self::directory::WatchedDirectory;
use self::freshness::Freshness;
use self::index::Index;
use self::metrics::{DirectoryLabels, VerifierMetrics};
use self::verifier::Verifier;
use crate::server::{self, Health, Limits};
use crate::telemetry::{self, LogFormat};

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Address of the external-auth endpoint (`/verify`).
    #[arg(long, env = "VERIFY_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    /// Address of Envoy's gRPC authorization service (`envoy.service.auth.v3.Authorization`) and the
    /// gRPC health service.
    #[arg(long, env = "VERIFY_GRPC_LISTEN", default_value = "0.0.0.0:8082")]
    pub grpc_listen: SocketAddr,
    /// gRPC: have Envoy remove the `Authorization` header from an allowed request before it reaches
    /// the backend (the SCIM server then never sees a token).
    #[arg(long, env = "VERIFY_STRIP_AUTHORIZATION", default_value_t = false, action = clap::ArgAction::Set)]
    pub strip_authorization: bool,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Only watch these namespaces, comma-separated or repeated (default: all namespaces).
    #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',', value_parser = crate::process::namespace_name)]
    pub namespaces: Vec<String>,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Connections open at once on each listener (`--listen`, `--grpc-listen`, `--metrics-addr`); a
    /// connection past it is accepted and closed at once.
    #[arg(long, env = "VERIFY_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// HTTP: from a request's first byte (a connection's accept, for its first request) to its
    /// complete head, or the connection is closed. gRPC: the HTTP/2 preface after the accept, and
    /// each Check call as a whole.
    #[arg(long, env = "VERIFY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,
    /// HTTP: a keep-alive connection without a request for this long is closed. Keep the proxies'
    /// upstream keep-alive timeout below it (nginx `keepalive_timeout` in an `upstream`: 60s by
    /// default; Envoy: the cluster's `idle_timeout`, 1h by default).
    #[arg(long, env = "VERIFY_IDLE_TIMEOUT", default_value = "90s", value_parser = positive_duration)]
    pub idle_timeout: Duration,
    /// HTTP: largest request head (request line and headers) in bytes, at least 8192; a larger one
    /// is answered 431. Also gRPC's HTTP/2 header list.
    #[arg(long, env = "VERIFY_MAX_HEADER_BYTES", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,
    /// gRPC: largest Check request in bytes; a larger one is refused (OUT_OF_RANGE).
    #[arg(long, env = "VERIFY_GRPC_MAX_MESSAGE_BYTES", default_value_t = grpc::MAX_MESSAGE_BYTES as u32, value_parser = clap::value_parser!(u32).range(1024..))]
    pub grpc_max_message_bytes: u32,
    /// Once the ScimDirectory watch has been failing without recovering for this long, the replica
    /// reports not ready (`/readyz` 503, gRPC health NOT_SERVING) until it recovers; it still answers
    /// from its index. A watch that works but sees no change is never stale.
    #[arg(long, env = "VERIFY_MAX_STALENESS", default_value = "5m", value_parser = positive_duration)]
    pub max_staleness: Duration,
    /// Length of each watch request before it is renewed (a permission withdrawn meanwhile is
    /// noticed at the renewal).
    #[arg(long, env = "VERIFY_WATCH_TIMEOUT", default_value = "290s", value_parser = positive_duration)]
    pub watch_timeout: Duration,
}

fn positive_duration(value: &str) -> Result<Duration, String> {
    let lifetime: crate::duration::TokenLifetime = value.parse().map_err(|e| format!("{e}"))?;
    let duration = lifetime.as_std();
    if duration.is_zero() { Err("must be longer than 0s".into()) } else { Ok(duration) }
}

impl VerifyArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections as usize,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_header_bytes: self.max_header_bytes as usize,
        }
    }
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    crate::process::disable_core_dumps();
    crate::allocator::keep_freed_heap();
    // A watch per namespace and nothing else: a handful of requests in flight at most.
    let client = crate::process::client(16).await?;
    let metrics = Arc::new(VerifierMetrics::default());
    let verifier = Verifier { index: Arc::new(RwLock::new(Index::default())), metrics: metrics.clone() };
    // `synced`: the initial list of every scope is in; `ready`: synced and not stale.
    let (synced, ready) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let freshness = Arc::new(Freshness::default());
    let limits = args.limits();

    let encode = metrics.clone();
    let health = Health { encode: Arc::new(move || encode.encode()), ready: ready.clone() };
    let probes = tokio::spawn(server::serve_with(
        args.metrics_addr,
        health,
        limits,
        metrics.connections("metrics"),
        std::future::pending(),
    ));
    let endpoint = serve_http(&args, verifier.clone()).await?;
    let (grpc_task, health_reporter) = serve_grpc(&args, verifier.clone()).await?;
    tokio::spawn(report_readiness(
        synced.clone(),
        ready,
        freshness.clone(),
        metrics,
        args.max_staleness,
        health_reporter,
    ));
    watch_scopes(&args, client, verifier, synced, freshness);

    endpoint.await??;
    grpc_task.await??;
    probes.abort();
    info!("stopped");
    Ok(())
}

/// The HTTP external-auth endpoint (`/verify`) on `--listen`, until the stop signal.
async fn serve_http(args: &VerifyArgs, verifier: Verifier) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let limits = args.limits();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --listen {}: {e}", args.listen))?;
    info!(addr = %args.listen, ?limits, "serving /verify");
    let connections = verifier.metrics.connections("http");
    Ok(tokio::spawn(server::serve_http(
        listener,
        http::router(verifier),
        limits,
        connections,
        crate::process::shutdown_signal(),
    )))
}

/// Envoy's gRPC authorization service and gRPC health on `--grpc-listen`, until the stop signal;
/// health reports NOT_SERVING until [`report_readiness`] says otherwise.
async fn serve_grpc(
    args: &VerifyArgs,
    verifier: Verifier,
) -> anyhow::Result<(JoinHandle<Result<(), tonic::transport::Error>>, HealthReporter)> {
    let limits = args.limits();
    let connections = verifier.metrics.connections("grpc");
    let grpc = grpc::GrpcVerifier { verifier, strip_authorization: args.strip_authorization };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_not_serving::<AuthorizationServer<grpc::GrpcVerifier>>().await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    // Bound here, before anything is served: a port that cannot be had stops the verifier at once
    // rather than leaving it running HTTP-only.
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --grpc-listen {}: {e}", args.grpc_listen))?;
    info!(addr = %args.grpc_listen, max_message_bytes = args.grpc_max_message_bytes, "serving envoy.service.auth.v3.Authorization (gRPC)");
    // The accepted connections within --max-connections, each with TCP_NODELAY and its preface due
    // within --header-read-timeout.
    let incoming = server::incoming_h2(grpc_listener, grpc::PREFACE_BYTES, limits, connections);
    let grpc_server = tonic::transport::Server::builder()
        // The whole Check call (its message trickled, say): the handler itself takes microseconds.
        .timeout(limits.header_read_timeout)
        .max_concurrent_streams(grpc::MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(args.max_header_bytes)
        .http2_keepalive_interval(Some(grpc::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(grpc::KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(AuthorizationServer::new(grpc).max_decoding_message_size(args.grpc_max_message_bytes as usize))
        .serve_with_incoming_shutdown(incoming, crate::process::shutdown_signal());
    Ok((tokio::spawn(grpc_server), health_reporter))
}

/// Readiness (`/readyz` and gRPC health), every 200 ms: synced, and not stale (the watch not failing
/// for longer than `max_staleness`), with the staleness in the metrics.
async fn report_readiness(
    synced: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    freshness: Arc<Freshness>,
    metrics: Arc<VerifierMetrics>,
    max_staleness: Duration,
    health_reporter: HealthReporter,
) {
    let mut serving: Option<bool> = None;
    let mut was_stale = false;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let failing = freshness.failing_for();
        let stale = failing.is_some_and(|d| d >= max_staleness);
        metrics.staleness_seconds.set(failing.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
        metrics.stale.set(i64::from(stale));
        if stale != was_stale {
            was_stale = stale;
            if stale {
                warn!(
                    ?max_staleness,
                    "the ScimDirectory watch has been failing for longer than --max-staleness: not ready until it recovers"
                );
            } else {
                info!("the ScimDirectory watch recovered: the index is current again");
            }
        }
        let now = synced.load(Ordering::SeqCst) && !stale;
        ready.store(now, Ordering::SeqCst);
        if serving != Some(now) {
            serving = Some(now);
            set_serving(&health_reporter, now).await;
        }
    }
}

async fn set_serving(health_reporter: &HealthReporter, serving: bool) {
    let status = if serving { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
    if serving {
        health_reporter.set_serving::<AuthorizationServer<grpc::GrpcVerifier>>().await;
    } else {
        health_reporter.set_not_serving::<AuthorizationServer<grpc::GrpcVerifier>>().await;
    }
    // Also the overall status ("" service), which most health checkers ask for.
    health_reporter.set_service_status("", status).await;
}

/// One watch per scope (each watched namespace, or all of them), each feeding the index; `synced`
/// turns true once every scope's initial list is in.
fn watch_scopes(
    args: &VerifyArgs,
    client: Client,
    verifier: Verifier,
    synced: Arc<AtomicBool>,
    freshness: Arc<Freshness>,
) {
    let namespaces = crate::process::dedup(&args.namespaces);
    info!(?namespaces, "watching ScimDirectories");
    let scopes: Vec<Option<String>> =
        if namespaces.is_empty() { vec![None] } else { namespaces.into_iter().map(Some).collect() };
    let unsynced = Arc::new(AtomicUsize::new(scopes.len()));
    let config = watcher::Config::default()
        .any_semantic()
        .timeout(u32::try_from(args.watch_timeout.as_secs().max(1)).unwrap_or(u32::MAX));
    for (n, scope) in scopes.into_iter().enumerate() {
        let (client, verifier, synced, unsynced) = (client.clone(), verifier.clone(), synced.clone(), unsynced.clone());
        let (freshness, config) = (freshness.clone(), config.clone());
        tokio::spawn(async move {
            let mut done = false;
            let on_synced = move || {
                if !done {
                    done = true;
                    if unsynced.fetch_sub(1, Ordering::SeqCst) == 1 {
                        synced.store(true, Ordering::SeqCst);
                        info!("index ready");
                    }
                }
            };
            let scope = Scope { namespace: scope, n, freshness, config };
            watch(client, scope, verifier, on_synced).await;
        });
    }
}

/// One scope the verifier watches (a namespace, or all of them).
struct Scope {
    namespace: Option<String>,
    /// Its number, for [`Freshness`].
    n: usize,
    freshness: Arc<Freshness>,
    config: watcher::Config,
}

/// Keeps the index in step with the directories of one scope.
///
/// A failed list or watch starts the watch over with a fresh list (after a backoff): kube's watcher
/// resumes a watch without telling, so only a list that completes, or an event, proves the index
/// current again. Until then the scope counts as failing ([`Freshness`]).
async fn watch(client: Client, scope: Scope, verifier: Verifier, mut on_synced: impl FnMut()) {
    let api: Api<WatchedDirectory> = match &scope.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut backoff = watcher::DefaultBackoff::default();
    loop {
        // A fresh list is indexed on the side and swapped in whole, so requests never see half a list.
        let mut fresh: Option<Index> = None;
        let events = watcher(api.clone(), scope.config.clone());
        futures::pin_mut!(events);
        loop {
            let event = match events.try_next().await {
                Ok(Some(event)) => event,
                Ok(None) => return,
                Err(e) => {
                    verifier.metrics.watch_errors.inc();
                    scope.freshness.failed(scope.n);
                    warn!(error = %e, "watching ScimDirectories failed; retrying with a fresh list");
                    break;
                }
            };
            let metrics = &verifier.metrics;
            match event {
                watcher::Event::Init => fresh = Some(Index::default()),
                watcher::Event::InitApply(dir) => {
                    fresh.get_or_insert_with(Index::default).apply(&dir);
                    export_overlap(metrics, &dir);
                }
                watcher::Event::InitDone => {
                    let fresh = fresh.take().unwrap_or_default();
                    let mut index = verifier.index.write().expect("poisoned");
                    for gone in index.replace_scope(scope.namespace.as_deref(), fresh) {
                        metrics.forget(&gone);
                    }
                    metrics.directories.set(i64::try_from(index.directories()).unwrap_or(i64::MAX));
                    drop(index);
                    scope.freshness.current(scope.n);
                    on_synced();
                }
                watcher::Event::Apply(dir) => {
                    let mut index = verifier.index.write().expect("poisoned");
                    index.apply(&dir);
                    metrics.directories.set(i64::try_from(index.directories()).unwrap_or(i64::MAX));
                    drop(index);
                    export_overlap(metrics, &dir);
                    scope.freshness.current(scope.n);
                }
                watcher::Event::Delete(dir) => {
                    let Some(id) = dir.id() else { continue };
                    let mut index = verifier.index.write().expect("poisoned");
                    index.remove(&id);
                    metrics.directories.set(i64::try_from(index.directories()).unwrap_or(i64::MAX));
                    drop(index);
                    metrics.forget(&id);
                    scope.freshness.current(scope.n);
                }
            }
        }
        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(30))).await;
    }
}

fn export_overlap(metrics: &VerifierMetrics, dir: &WatchedDirectory) {
    let Some(id) = dir.id() else { return };
    let labels = DirectoryLabels { namespace: id.namespace, name: id.name };
    let status = dir.status.as_ref();
    match status.and_then(|s| s.previous_token_hash.as_ref().and(s.previous_token_valid_until.as_ref())) {
        Some(until) => {
            metrics.previous_valid_until.get_or_create(&labels).set(until.0.as_second());
        }
        None => {
            metrics.previous_valid_until.remove(&labels);
        }
    }
}
