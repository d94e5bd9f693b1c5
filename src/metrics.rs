//! Prometheus metrics, served on `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectoryLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// A watched namespace, or "" for all namespaces.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

pub struct Metrics {
    pub registry: Registry,
    /// Unix time at which each directory's token expires (absent for perpetual tokens).
    pub token_expiry: Family<DirectoryLabels, Gauge>,
    pub tokens_issued: Family<ReasonLabels, Counter>,
    /// Automatic issues held back by the minimum interval between them.
    pub issues_deferred: Family<ReasonLabels, Counter>,
    /// Secrets in the operator's cache, per watched scope.
    pub cached_secrets: Family<ScopeLabels, Gauge>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// 1 while this replica holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
    /// Reconciles that gave up waiting for the directory cache to show the operator's own status write.
    pub status_echo_timeouts: Counter,
    /// Steps of pushes to the identity provider, by result (pushed, synced, or the failed step).
    pub idp_pushes: Family<ResultLabels, Counter>,
    /// Seconds from a token's issue to the identity provider's first successful run with it.
    pub idp_first_success: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("scim_token_operator");
        let token_expiry = Family::<DirectoryLabels, Gauge>::default();
        let tokens_issued = Family::<ReasonLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let issues_deferred = Family::<ReasonLabels, Counter>::default();
        let cached_secrets = Family::<ScopeLabels, Gauge>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "token_expiry_timestamp_seconds",
            "Unix time at which the directory's current token expires",
            token_expiry.clone(),
        );
        registry.register(
            "tokens_issued",
            "Tokens issued, by reason (Initial, RotationGenerationChanged, ...)",
            tokens_issued.clone(),
        );
        registry.register(
            "issues_deferred",
            "Automatic issues (renewals, repairs) deferred by the minimum interval between them, by reason",
            issues_deferred.clone(),
        );
        registry.register(
            "cached_secrets",
            "Secrets held in the cache (metadata and token hash only), per watched namespace (\"\" = all)",
            cached_secrets.clone(),
        );
        registry.register("reconcile_errors", "Failed reconciliations, by error kind", reconcile_errors.clone());
        registry.register("reconcile_duration_seconds", "Duration of one reconciliation", reconcile_duration.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads and reconciles", leader.clone());
        let status_echo_timeouts = Counter::default();
        registry.register(
            "status_echo_timeouts",
            "Reconciles that stopped waiting for the directory cache to show the operator's own last status write \
             (each may write that status once more)",
            status_echo_timeouts.clone(),
        );
        let idp_pushes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "identity_provider_pushes",
            "Pushes of new tokens to the identity provider (Microsoft Entra ID), by result: pushed, synced, or the \
             step that failed (AuthenticationFailed, ValidationFailed, PushFailed, ...)",
            idp_pushes.clone(),
        );
        // 10 s to ~45 h: Entra's cycle is about 40 minutes.
        let idp_first_success = Histogram::new(exponential_buckets(10.0, 2.0, 15));
        registry.register(
            "identity_provider_first_success_seconds",
            "Time from a token's issue to the identity provider's first successful provisioning run with it",
            idp_first_success.clone(),
        );
        Metrics {
            registry,
            idp_pushes,
            idp_first_success,
            token_expiry,
            tokens_issued,
            issues_deferred,
            cached_secrets,
            reconcile_errors,
            reconcile_duration,
            leader,
            status_echo_timeouts,
        }
    }
}

impl Metrics {
    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
