//! The verifier's metrics: requests by result, and per directory when each of its tokens last
//! authenticated, so a user sees whether the identity provider switched to the new token before an
//! overlap window ends. All of it without a single API write.

use k8s_openapi::jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::index::{DirectoryId, TokenKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub namespace: String,
    pub name: String,
    /// `current` or `previous`.
    pub token: String,
}

/// `http` (`/verify`), `grpc` or `metrics` (this endpoint and the probes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

/// One series per directory, labelled as the operator's are.
pub use crate::metrics::DirectoryLabels;

pub struct VerifierMetrics {
    registry: Registry,
    requests: Family<ResultLabels, Counter>,
    last_used: Family<UsageLabels, Gauge>,
    /// End of each open overlap window, for the "previous token still in use" alert.
    pub previous_valid_until: Family<DirectoryLabels, Gauge>,
    pub directories: Gauge,
    /// Failed attempts to list or watch ScimDirectories.
    pub watch_errors: Counter,
    /// Seconds the watch has been failing without recovering (0 while it works).
    pub staleness_seconds: Gauge,
    /// 1 while the watch has been failing for longer than `--max-staleness` (the replica is not ready).
    pub stale: Gauge,
    connections_open: Family<ListenerLabels, Gauge>,
    connections_refused: Family<ListenerLabels, Counter>,
}

impl Default for VerifierMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("scim_token_verifier");
        let requests = Family::<ResultLabels, Counter>::default();
        let last_used = Family::<UsageLabels, Gauge>::default();
        let previous_valid_until = Family::<DirectoryLabels, Gauge>::default();
        let directories = Gauge::default();
        registry.register(
            "requests",
            "Verification requests by result (allowed, missing, malformed, unknown, expired, wrong_directory)",
            requests.clone(),
        );
        registry.register(
            "token_last_used_timestamp_seconds",
            "Unix time at which a directory's current or previous token last authenticated (this replica)",
            last_used.clone(),
        );
        registry.register(
            "previous_token_valid_until_timestamp_seconds",
            "Unix time at which a directory's overlap window ends and its previous token stops working",
            previous_valid_until.clone(),
        );
        registry.register("directories", "Directories with a token in the index", directories.clone());
        let (watch_errors, staleness_seconds, stale) = (Counter::default(), Gauge::default(), Gauge::default());
        registry.register("watch_errors", "Failed attempts to list or watch ScimDirectories", watch_errors.clone());
        registry.register(
            "index_staleness_seconds",
            "Seconds the ScimDirectory watch has been failing without recovering: how far behind the index may be (0 while the watch works, quiet or not)",
            staleness_seconds.clone(),
        );
        registry.register(
            "index_stale",
            "1 while the watch has been failing for longer than --max-staleness: the replica reports not ready",
            stale.clone(),
        );
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        let connections_refused = Family::<ListenerLabels, Counter>::default();
        registry.register("connections", "Connections open, by listener", connections_open.clone());
        registry.register(
            "connections_refused",
            "Connections closed at once because --max-connections were open, by listener",
            connections_refused.clone(),
        );
        VerifierMetrics {
            registry,
            requests,
            last_used,
            previous_valid_until,
            directories,
            watch_errors,
            staleness_seconds,
            stale,
            connections_open,
            connections_refused,
        }
    }
}

impl VerifierMetrics {
    pub fn result(&self, result: &str) {
        self.requests.get_or_create(&ResultLabels { result: result.to_owned() }).inc();
    }

    pub fn allowed(&self, directory: &DirectoryId, kind: TokenKind) {
        self.result("allowed");
        let labels = UsageLabels {
            namespace: directory.namespace.clone(),
            name: directory.name.clone(),
            token: kind.as_str().to_owned(),
        };
        self.last_used.get_or_create(&labels).set(Timestamp::now().as_second());
    }

    /// Drops a deleted directory's series.
    pub fn forget(&self, directory: &DirectoryId) {
        for kind in [TokenKind::Current, TokenKind::Previous] {
            self.last_used.remove(&UsageLabels {
                namespace: directory.namespace.clone(),
                name: directory.name.clone(),
                token: kind.as_str().to_owned(),
            });
        }
        self.previous_valid_until
            .remove(&DirectoryLabels { namespace: directory.namespace.clone(), name: directory.name.clone() });
    }

    /// The connection counts of one listener (`http`, `grpc` or `metrics`).
    pub fn connections(&self, listener: &str) -> crate::server::ConnectionMetrics {
        let labels = ListenerLabels { listener: listener.to_owned() };
        crate::server::ConnectionMetrics {
            open: self.connections_open.get_or_create(&labels).clone(),
            refused: self.connections_refused.get_or_create(&labels).clone(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
