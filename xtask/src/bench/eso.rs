//! The peer: External Secrets Operator's `Password` generator, what a user who wants a random token in
//! a Secret reaches for today. One `Password` generator per namespace and, per directory, one
//! `ExternalSecret` whose `dataFrom` references it, with `refreshInterval: 0s` (generate once, never
//! refresh: the settings for one stable token) and `creationPolicy: Owner` (the default), writing
//! `tenant-NNNNN-scim-token`. ESO is built from the Go module proxy by hack/eso.sh.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail};
use envtest::ControlPlane;
use futures::{StreamExt, TryStreamExt, stream};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;

use super::cluster::{self, directory_name, free_port, wait_ready};
use super::{Options, Sample, Steady, measure_issuance, ready_timeout, writes_during};

/// How ESO is run: as a user gets it, or with concurrency and client limits matched to the operator's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Settings {
    /// ESO's defaults: `--concurrent 1`, client QPS 50 / burst 100.
    Defaults,
    /// `--concurrent 16` (the operator's `--concurrency`) and client QPS/burst 10000, i.e. unlimited as
    /// the operator's client is (it bounds in-flight requests at 32, not their rate).
    Matched,
}

impl Settings {
    pub(crate) fn args(self) -> &'static [&'static str] {
        match self {
            Settings::Defaults => &[],
            Settings::Matched => &["--concurrent", "16", "--client-qps", "10000", "--client-burst", "10000"],
        }
    }
}

/// The built controller and its CRDs (hack/eso.sh).
pub(crate) struct Eso {
    binary: PathBuf,
}

/// The metric ESO's reconciler counts its passes with (controller-runtime's).
pub(crate) const RECONCILED_METRIC: &str = "controller_runtime_reconcile_total{controller=\"externalsecret\"";

impl Eso {
    /// Builds (or finds) ESO and installs its CRDs on the control plane.
    pub(crate) fn prepare(root: &Path, cp: &ControlPlane) -> anyhow::Result<Eso> {
        println!("==> External Secrets Operator (hack/eso.sh; the first run builds it, ~6 min)");
        let out = Command::new("bash").arg(root.join("hack/eso.sh")).output().context("running hack/eso.sh")?;
        if !out.status.success() {
            bail!("hack/eso.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let dir = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        let bundle = dir.join("bundle.yaml");
        // Server-side: ESO's CRDs are too large for client-side apply's last-applied annotation.
        let applied = cp.kubectl().args(["apply", "--server-side", "-f"]).arg(&bundle).output()?;
        if !applied.status.success() {
            bail!("installing ESO's CRDs failed: {}", String::from_utf8_lossy(&applied.stderr));
        }
        // `kubectl wait` fails at once on a CRD that has no conditions yet: ask again until Established.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let waited = cp
                .kubectl()
                .args(["wait", "--for=condition=Established", "--timeout=10s"])
                .args(["crd/externalsecrets.external-secrets.io", "crd/passwords.generators.external-secrets.io"])
                .output()?;
            if waited.status.success() {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("ESO's CRDs did not become established: {}", String::from_utf8_lossy(&waited.stderr));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(Eso { binary: dir.join("external-secrets") })
    }

    /// Starts the controller (all namespaces, as by default); returns it and its metrics port.
    pub(crate) fn start(&self, cp: &ControlPlane, settings: Settings, log: &Path) -> anyhow::Result<(Child, u16)> {
        let port = free_port()?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(&self.binary)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(settings.args())
            .env("KUBECONFIG", cp.kubeconfig_path())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        Ok((child, port))
    }

    /// One run: N ExternalSecrets to N synced Secrets, then (first run only) silence while idle and
    /// across a restart, all counted by the API server.
    pub(crate) async fn run(
        &self,
        cp: &ControlPlane,
        settings: Settings,
        ns: &str,
        log: &Path,
        o: &Options,
        steady: bool,
    ) -> anyhow::Result<(Sample, Option<Steady>)> {
        let client = cp.client().await;
        create_generator(&client, ns).await?;
        let mut eso = self.start(cp, settings, log)?;
        wait_started(eso.1).await?;
        let sample = measure_issuance(
            cp,
            &client,
            eso.0.id(),
            create_external_secrets(&client, ns, o.n, o.client_concurrency),
            wait_all_synced(&client, ns, o.n, ready_timeout(o.n)),
        )
        .await?;

        let mut quiet = None;
        if steady {
            println!("    idle for {:?}", o.idle);
            let ((), idle) = writes_during(&client, async {
                tokio::time::sleep(o.idle).await;
                Ok(())
            })
            .await?;
            let ((), restart) = writes_during(&client, async {
                crate::terminate(&mut eso.0);
                eso = self.start(cp, settings, log)?;
                wait_started(eso.1).await?;
                cluster::wait_reconciled(eso.1, RECONCILED_METRIC, o.n).await?;
                tokio::time::sleep(o.idle.min(Duration::from_secs(30))).await;
                Ok(())
            })
            .await?;
            quiet = Some(Steady { idle, restart, restart_peak_rss_kib: vec![cluster::peak_rss_kib(eso.0.id())] });
        }
        crate::terminate(&mut eso.0);
        Ok((sample, quiet))
    }
}

/// Until the ExternalSecret controller has started its workers (its informers are synced by then).
async fn wait_started(port: u16) -> anyhow::Result<()> {
    cluster::poll("ESO's ExternalSecret controller to start", Duration::from_secs(120), || async {
        cluster::metric_value(port, "controller_runtime_active_workers{controller=\"externalsecret\"").is_some()
    })
    .await
}

fn external_secrets(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

/// The namespace's `Password` generator (before the clock starts: it is set-up, not per directory).
pub(crate) async fn create_generator(client: &kube::Client, ns: &str) -> anyhow::Result<()> {
    let gvk = GroupVersionKind::gvk("generators.external-secrets.io", "v1alpha1", "Password");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk));
    // 43 characters from 62 (no symbols) ≈ 256 bits, the operator's token entropy.
    let generator: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "generators.external-secrets.io/v1alpha1",
        "kind": "Password",
        "metadata": { "name": "scim-token" },
        "spec": { "length": 43, "digits": 10, "symbols": 0, "noUpper": false, "allowRepeat": true },
    }))?;
    api.create(&PostParams::default(), &generator).await?;
    Ok(())
}

pub(crate) async fn create_external_secrets(
    client: &kube::Client,
    ns: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let api = external_secrets(client, ns);
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = directory_name(i);
                let es: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "external-secrets.io/v1",
                    "kind": "ExternalSecret",
                    "metadata": { "name": name },
                    "spec": {
                        "refreshInterval": "0s",
                        "target": { "name": format!("{name}-scim-token"), "creationPolicy": "Owner" },
                        "dataFrom": [{ "sourceRef": { "generatorRef": {
                            "apiVersion": "generators.external-secrets.io/v1alpha1",
                            "kind": "Password",
                            "name": "scim-token",
                        } } }],
                    },
                }))?;
                cluster::create(&api, &es).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

pub(crate) async fn wait_all_synced(
    client: &kube::Client,
    ns: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_ready(&external_secrets(client, ns), n, timeout, |es| {
        es.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
    })
    .await
}
