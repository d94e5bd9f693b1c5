//! Command line: `run` (the default), `verify` and `crd`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Args, Parser, Subcommand};
use kube::CustomResourceExt;
use tokio::sync::watch;
use tracing::info;

use crate::api::ScimDirectory;
use crate::controller::{self, FAILPOINT_ENV, Settings};
use crate::leader::{self, Elector, Fence, Leadership, LeaseSettings};
use crate::metrics::Metrics;
use crate::process::{self, dedup, disable_core_dumps, fenced_client, namespace_name, shutdown_signal};
use crate::server::{self, Health};
use crate::telemetry::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "scim-token-operator",
    version,
    about = "Issues and rotates SCIM bearer tokens for ScimDirectory resources"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator (the default).
    Run(RunArgs),
    /// Print the ScimDirectory CustomResourceDefinition as YAML.
    Crd,
    /// Run the verifier: an external-auth endpoint for proxies that authenticates SCIM requests by
    /// token hash. Read-only, no access to Secrets, every replica serves.
    Verify(crate::verify::VerifyArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Only watch these namespaces, comma-separated or repeated (default: all namespaces). Each gets
    /// its own namespaced watches, so no cluster-wide permission is needed.
    #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',', value_parser = namespace_name)]
    pub namespaces: Vec<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Directories reconciled at once (per watched namespace; --max-inflight-requests bounds the total).
    #[arg(long, env = "RECONCILE_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// Upper bound on requests in flight to the API server (protects it during mass issuance).
    #[arg(long, env = "MAX_INFLIGHT_REQUESTS", default_value_t = 32)]
    pub max_inflight_requests: usize,
    /// Elect a leader through a coordination.k8s.io Lease so that only one replica writes.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    #[arg(long, env = "LEADER_ELECTION_LEASE", default_value = "scim-token-operator")]
    pub lease_name: String,
    /// How long a standby waits, after it last saw the Lease renewed, before it takes over (whole
    /// seconds): a crashed leader is replaced after at most this long.
    #[arg(long, env = "LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = interval)]
    pub lease_duration: std::time::Duration,
    /// How long the leader goes on writing after its last confirmed Lease renewal; past it, it refuses
    /// every write and stops. Shorter than --lease-duration: the difference covers writes in flight.
    #[arg(long, env = "LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s", value_parser = interval)]
    pub renew_deadline: std::time::Duration,
    /// How often the leader renews the Lease and a standby tries to take it.
    #[arg(long, env = "LEADER_ELECTION_RETRY_PERIOD", default_value = "2s", value_parser = interval)]
    pub retry_period: std::time::Duration,
    /// Namespace of the Lease and of the record key Secret (default: the pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Secret, in the operator's namespace, holding the key that seals the issue records on token
    /// Secrets (created with a random key on the first start; keep it as private as the operator's
    /// own credentials). See the README's "Issue records are sealed".
    #[arg(long, env = "RECORD_KEY_SECRET", default_value = crate::secret::seal::DEFAULT_KEY_SECRET)]
    pub record_key_secret: String,
    /// This replica's identity in the Lease and in Events (default: the pod name, else host name + pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Shortest time between two automatic issues (renewals, repairs) for one directory, e.g. "1m" or
    /// "30s": bounds what a fight with another writer of the Secret can cost. Requested rotations are
    /// never held back.
    #[arg(long, env = "MIN_ISSUE_INTERVAL", default_value = "1m", value_parser = interval)]
    pub min_issue_interval: std::time::Duration,
    /// Microsoft Graph, for directories with spec.identityProvider.entra (https only).
    #[arg(long, env = "GRAPH_ENDPOINT", default_value = "https://graph.microsoft.com")]
    pub graph_endpoint: String,
    /// The Microsoft identity platform (the variable AKS workload identity sets); the token endpoint
    /// is `<this><tenantId>/oauth2/v2.0/token` (https only).
    #[arg(long, env = "AZURE_AUTHORITY_HOST", default_value = "https://login.microsoftonline.com/")]
    pub entra_authority_host: String,
    /// PEM file of trust roots added to the system's for Graph and the token endpoint (a
    /// TLS-inspecting egress proxy's CA).
    #[arg(long, env = "ENTRA_CA_FILE")]
    pub entra_ca_file: Option<std::path::PathBuf>,
    /// The projected ServiceAccount token used as the client assertion of workload identity
    /// federation (AKS sets the variable); read afresh for every access token.
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE")]
    pub entra_federated_token_file: Option<std::path::PathBuf>,
    /// How often the provisioning job of a pushed token is read until Entra has run with it (its
    /// cycle is about 40 minutes).
    #[arg(long, env = "ENTRA_POLL_INTERVAL", default_value = "1m", value_parser = interval)]
    pub entra_poll_interval: std::time::Duration,
}

fn interval(value: &str) -> Result<std::time::Duration, String> {
    let lifetime: crate::duration::TokenLifetime = value.parse().map_err(|e| format!("{e}"))?;
    Ok(lifetime.as_std())
}

pub fn crd_yaml() -> String {
    let mut crd = ScimDirectory::crd();
    // Deleting the CRD deletes every ScimDirectory and, through the ownerReferences, every token
    // Secret. Helm never deletes CRDs from a chart's crds/, but Argo CD renders them into the
    // Application and would delete them with it (cascading delete, prune): tell it not to.
    crd.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("argocd.argoproj.io/sync-options".into(), "Delete=false".into());
    serde_yaml::to_string(&crd).expect("the CRD serializes")
}

pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", crd_yaml());
            Ok(())
        }
        Some(Command::Run(args)) => run(args).await,
        Some(Command::Verify(args)) => crate::verify::run(args).await,
        None => run(cli.run).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    disable_core_dumps();
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    // The fence first: the controller's client checks it on every write once the write holds its
    // permit (see `leader::limited`).
    let fence = if args.leader_election { Fence::new(args.renew_deadline) } else { Fence::open() };
    let client = fenced_client(args.max_inflight_requests, &fence).await?;
    // Before leadership (so with a client the write fence does not hold back): a replica that cannot
    // read or create the key fails at once, not on takeover. Two replicas racing to create it is
    // harmless: the create is refused for the second, which reads the first one's key.
    let record_key =
        crate::secret::seal::load_or_create(process::client(2).await?, &args.lease_namespace, &args.record_key_secret)
            .await
            .map_err(anyhow::Error::msg)?;

    let entra = crate::entra::Entra::new(crate::entra::Config {
        graph_endpoint: args.graph_endpoint.clone(),
        authority_host: args.entra_authority_host.clone(),
        ca_file: args.entra_ca_file.clone(),
        federated_token_file: args.entra_federated_token_file.clone().filter(|p| !p.as_os_str().is_empty()),
        poll_interval: args.entra_poll_interval,
    })
    .map_err(anyhow::Error::msg)?;

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let encode = metrics.clone();
    let health = Health { encode: Arc::new(move || encode.encode()), ready: ready.clone() };
    let server = tokio::spawn(server::serve(args.metrics_addr, health));

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested; finishing in-flight reconciliations");
        let _ = stop_tx.send(true);
    });

    let elector = match lease_settings(&args, &identity)? {
        Some(settings) => {
            // Its own client: Lease renewals must not queue behind a burst of the controller's requests.
            let mut elector = Elector::new(process::client(4).await?, settings, fence.clone());
            info!(lease = %args.lease_name, namespace = %args.lease_namespace, %identity, "waiting for leadership");
            if !leader::acquire(&mut elector, &ready, stop_rx.clone()).await {
                return Ok(());
            }
            info!(%identity, "acquired leadership");
            Some(elector)
        }
        None => None,
    };
    let (leadership, lost) = Leadership::keep(elector);

    let namespaces = dedup(&args.namespaces);
    info!(?namespaces, concurrency = args.concurrency, "starting controller");
    let settings = Settings {
        namespaces,
        concurrency: args.concurrency,
        failpoint: std::env::var(FAILPOINT_ENV).ok().filter(|v| !v.is_empty()),
        instance: identity,
        min_issue_interval: args.min_issue_interval,
        fence,
        record_key,
        entra: Arc::new(entra),
    };
    let mut stop = stop_rx.clone();
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    metrics.leader.set(1);
    controller::run(client, settings, metrics.clone(), ready, shutdown, lost).await;
    metrics.leader.set(0);
    server.abort();
    leadership.end().await
}

/// The Lease to elect a leader on, validated; `None` without leader election.
fn lease_settings(args: &RunArgs, identity: &str) -> anyhow::Result<Option<LeaseSettings>> {
    if !args.leader_election {
        return Ok(None);
    }
    let settings = LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity: identity.to_owned(),
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    settings.validate().map_err(anyhow::Error::msg)?;
    Ok(Some(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces(args: &[&str]) -> Result<Vec<String>, String> {
        let cli = Cli::try_parse_from([&["scim-token-operator", "run"], args].concat()).map_err(|e| e.to_string())?;
        match cli.command {
            Some(Command::Run(run)) => Ok(dedup(&run.namespaces)),
            _ => unreachable!(),
        }
    }

    #[test]
    fn namespaces_are_comma_separated_or_repeated() {
        assert_eq!(namespaces(&[]).unwrap(), Vec::<String>::new());
        assert_eq!(namespaces(&["--namespace", "team-a"]).unwrap(), ["team-a"]);
        assert_eq!(namespaces(&["--namespace", "team-a,team-b"]).unwrap(), ["team-a", "team-b"]);
        assert_eq!(namespaces(&["--namespace", "a", "--namespace", "b", "--namespace", "a"]).unwrap(), ["a", "b"]);
        // Empty means all namespaces (WATCH_NAMESPACE="" as operators usually read it); empty entries are ignored.
        assert_eq!(namespaces(&["--namespace="]).unwrap(), Vec::<String>::new());
        assert_eq!(namespaces(&["--namespace=a,,b,"]).unwrap(), ["a", "b"]);
    }

    #[test]
    fn bad_namespaces_are_refused_naming_the_value() {
        for bad in ["Team", "team_a", "-a", "a-", "a,B", &"x".repeat(64)] {
            let err = namespaces(&[&format!("--namespace={bad}")]).unwrap_err();
            assert!(err.contains("is not a namespace name"), "{bad:?}: {err}");
        }
    }
}
