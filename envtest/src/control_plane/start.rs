//! Starting etcd, kube-apiserver and kube-controller-manager (garbage collector only).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::components::{APISERVER, Components, ETCD, apiserver_ready};
use super::{ControlPlane, Options, StartupTimings};
use crate::assets::{Assets, locate_assets};
use crate::certificates::Pki;
use crate::crds::{read_crds, wait_for_create_delay};
use crate::processes::{Processes, free_ports, remove_stale_tmpdirs, wait_until};
use crate::{TMP_PREFIX, workspace_root};

/// How long etcd may take to report healthy.
pub(super) const ETCD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long kube-apiserver may take until `/readyz` answers `ok` (two cores, cold page cache).
pub(super) const APISERVER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long kube-controller-manager may take until `/healthz` answers `ok` (two cores, cold page
/// cache, other builds running).
const CONTROLLER_MANAGER_TIMEOUT: Duration = Duration::from_secs(120);

impl ControlPlane {
    /// Locate assets (`KUBEBUILDER_ASSETS` if it holds kube-apiserver, etcd and kubectl, else the
    /// directory printed by `<workspace>/hack/envtest-assets.sh`; kube-controller-manager from the
    /// same directory or, when `KUBEBUILDER_ASSETS` lacks it, from
    /// `hack/envtest-assets.sh --controller-manager`, which builds it into the cache), start etcd and
    /// kube-apiserver on free loopback ports, wait for `/readyz` and the `default` namespace, install
    /// every `*.yaml` CRD in `<workspace>/crds/` and wait until each is Established, then start
    /// kube-controller-manager with only the garbage collector and wait for its `/healthz`.
    pub async fn start() -> Result<ControlPlane> {
        ControlPlane::start_with(Options::default()).await
    }

    /// [`ControlPlane::start`] with [`Options`] (an audit log, extra kube-apiserver flags).
    pub async fn start_with(options: Options) -> Result<ControlPlane> {
        let started = Instant::now();
        let Assets { dir: assets_dir, controller_manager: controller_manager_bin } = locate_assets()?;
        let (etcd_bin, apiserver_bin) = (assets_dir.join("etcd"), assets_dir.join("kube-apiserver"));

        remove_stale_tmpdirs();
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempdir()
            .context("creating the envtest temporary directory")?;
        let root = tmp.path().to_path_buf();
        std::fs::write(root.join("owner.pid"), std::process::id().to_string())?;

        let extra_sans = match &options.cluster {
            Some(c) => vec![c.address.to_string(), c.kubernetes_service_ip.to_string()],
            None => Vec::new(),
        };
        let pki = Pki::generate(&extra_sans).context("generating certificates")?;
        let pki_dir = root.join("pki");
        std::fs::create_dir_all(&pki_dir)?;
        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let path = pki_dir.join(name);
            std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let serving_cert = write("apiserver.crt", &pki.serving_cert)?;
        let serving_key = write("apiserver.key", &pki.serving_key)?;
        write("client-ca.crt", &pki.client_ca)?;
        write("ca.crt", &pki.ca)?;
        write("admin.crt", &pki.admin_cert)?;
        write("admin.key", &pki.admin_key)?;
        write("sa.pub", &pki.sa_public)?;
        write("sa.key", &pki.sa_private)?;

        let audit_policy = match &options.audit_policy {
            Some(policy) => {
                let path = root.join("audit-policy.yaml");
                std::fs::write(&path, policy).context("writing the audit policy")?;
                Some(path)
            }
            None => None,
        };

        let [etcd_client_port, etcd_peer_port, apiserver_port, controller_manager_port] = free_ports()?;
        let host = options.cluster.as_ref().map_or("127.0.0.1".to_string(), |c| c.address.to_string());
        let server_url = format!("https://{host}:{apiserver_port}");
        let components = Components {
            etcd_bin,
            apiserver_bin,
            root: root.clone(),
            pki_dir,
            etcd_client_port,
            etcd_peer_port,
            apiserver_port,
            audit_policy,
            extra_apiserver_args: options.apiserver_args.clone(),
            cluster: options.cluster.clone(),
        };

        let processes = Processes::default();

        let etcd_started = Instant::now();
        processes.spawn(ETCD, components.etcd(), &components.etcd_log())?;
        wait_until("etcd to report healthy", ETCD_TIMEOUT, &processes, || components.etcd_healthy()).await?;
        let etcd_ready = etcd_started.elapsed();

        let apiserver_started = Instant::now();
        processes.spawn(APISERVER, components.apiserver(), &components.apiserver_log())?;

        let kubeconfig_path = root.join("kubeconfig");
        std::fs::write(&kubeconfig_path, pki.kubeconfig(&server_url)).context("writing the kubeconfig")?;
        let kubeconfig = Kubeconfig::read_from(&kubeconfig_path)
            .with_context(|| format!("reading {}", kubeconfig_path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .context("building a kube::Config from the generated kubeconfig")?;

        let mut probe_config = config.clone();
        probe_config.connect_timeout = Some(Duration::from_secs(2));
        probe_config.read_timeout = Some(Duration::from_secs(5));
        let probe = kube::Client::try_from(probe_config).context("building a kube client")?;
        wait_until("kube-apiserver /readyz", APISERVER_TIMEOUT, &processes, || apiserver_ready(&probe)).await?;
        let namespaces: Api<Namespace> = Api::all(probe.clone());
        wait_until("the default namespace", APISERVER_TIMEOUT, &processes, || {
            let namespaces = namespaces.clone();
            async move { Ok(namespaces.get_opt("default").await?.is_some()) }
        })
        .await?;
        let apiserver_ready = apiserver_started.elapsed();

        let controller_manager_log_path = root.join("kube-controller-manager.log");
        let mut cp = ControlPlane {
            processes,
            tmp: Mutex::new(Some(tmp)),
            root,
            assets_dir,
            server_url,
            kubeconfig_path,
            apiserver_log_path: components.apiserver_log(),
            etcd_log_path: components.etcd_log(),
            audit_log_path: components.audit_log(),
            components,
            pki,
            controller_manager_log_path,
            no_garbage_collector: None,
            config,
            ns_counter: AtomicU64::new(0),
            timings: StartupTimings {
                etcd_ready,
                apiserver_ready,
                controller_manager_ready: Duration::ZERO,
                total: Duration::ZERO,
            },
        };

        let crd_dir = workspace_root().join("crds");
        let crds = if options.cluster.is_some() { Vec::new() } else { read_crds(&crd_dir)? };
        let (_, established) =
            cp.install_crds(&crds).await.with_context(|| format!("installing the CRDs from {}", crd_dir.display()))?;
        // The garbage collector discovers the served resources when it starts and then only every
        // 30 s: starting it once the CRDs are served lets it collect their dependents right away.
        // Its start-up overlaps the create delay of the new CRDs, which is waited out afterwards.
        match &controller_manager_bin {
            Ok(bin) => {
                cp.timings.controller_manager_ready =
                    cp.start_controller_manager(bin, controller_manager_port, &serving_cert, &serving_key).await?;
            }
            Err(why) => cp.no_garbage_collector = Some(why.clone()),
        }
        wait_for_create_delay(established).await;
        cp.timings.total = started.elapsed();
        Ok(cp)
    }

    /// Start kube-controller-manager with only `garbage-collector-controller` and wait until its
    /// `/healthz` answers `ok`; returns how long that took.
    async fn start_controller_manager(
        &self,
        bin: &Path,
        port: u16,
        serving_cert: &Path,
        serving_key: &Path,
    ) -> Result<Duration> {
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig_path.display()));
        if self.components.cluster.is_some() {
            // Every default controller; service-account tokens signed with the API server's key, and
            // the CA pods trust (the `kube-root-ca.crt` ConfigMaps) is the serving CA.
            cmd.arg("--controllers=*")
                .arg(format!("--service-account-private-key-file={}", self.components.pki_dir.join("sa.key").display()))
                .arg(format!("--root-ca-file={}", self.components.pki_dir.join("ca.crt").display()));
        } else {
            cmd.arg("--controllers=garbage-collector-controller");
        }
        cmd.arg("--leader-elect=false")
            // Every controller uses the admin credentials of --kubeconfig: no service accounts,
            // tokens or RBAC bindings are needed.
            .arg("--use-service-account-credentials=false")
            .arg(format!("--secure-port={port}"))
            .arg("--bind-address=127.0.0.1")
            // The API server's certificate is valid for 127.0.0.1 and signed by the kubeconfig's CA,
            // so the health probe verifies TLS and no self-signed key is generated at start-up.
            .arg(format!("--tls-cert-file={}", serving_cert.display()))
            .arg(format!("--tls-private-key-file={}", serving_key.display()))
            // No --authentication-kubeconfig / --authorization-kubeconfig: no delegated
            // TokenReview/SubjectAccessReview lookups and no RBAC for them. Requests are anonymous;
            // /healthz, /readyz and /livez are in the default --authorization-always-allow-paths,
            // everything else (metrics, debug) is forbidden.
            .arg("--profiling=false")
            // The garbage collector lists and watches every resource at start-up; the default
            // client rate limit (20 QPS, burst 30) would throttle that for seconds.
            .arg("--kube-api-qps=500")
            .arg("--kube-api-burst=1000")
            // Level 2 logs every object the garbage collector deletes ("Deleting item"), which
            // tests can look for; the extra start-up lines (one per informer) are a one-off.
            .arg("--v=2")
            .current_dir(&self.root);
        let started = Instant::now();
        self.processes.spawn("kube-controller-manager", cmd, &self.controller_manager_log_path)?;

        let mut config = self.config.clone();
        config.cluster_url = format!("https://127.0.0.1:{port}").parse().context("the controller-manager URL")?;
        config.auth_info = kube::config::AuthInfo::default();
        config.connect_timeout = Some(Duration::from_secs(2));
        config.read_timeout = Some(Duration::from_secs(5));
        let probe = kube::Client::try_from(config).context("building the controller-manager health probe")?;
        wait_until("kube-controller-manager /healthz", CONTROLLER_MANAGER_TIMEOUT, &self.processes, || {
            let probe = probe.clone();
            async move {
                let req = http::Request::get("/healthz").body(Vec::new())?;
                Ok(probe.request_text(req).await.map(|body| body.trim() == "ok")?)
            }
        })
        .await?;
        Ok(started.elapsed())
    }
}
