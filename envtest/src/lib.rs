//! A real `etcd` + `kube-apiserver` (+ the garbage collector of `kube-controller-manager`) for tests,
//! in the spirit of controller-runtime's envtest.
//!
//! [`ControlPlane::start`] locates the binaries (see [`ControlPlane::start`] for the rules), generates
//! a throw-away PKI with `rcgen`, starts etcd and kube-apiserver on free loopback ports, waits until
//! both are ready, writes an admin kubeconfig, installs the CRDs found in `<workspace>/crds/` and
//! starts kube-controller-manager running only `garbage-collector-controller`.
//!
//! Deleting an owner therefore deletes its dependents through their `ownerReferences`, as in a real
//! cluster. No other controller, no scheduler and no kubelet runs: objects are stored and validated,
//! RBAC is enforced, but nothing else reconciles them (pods never start, namespaces never finish
//! terminating).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cp = scim_envtest::ControlPlane::shared();
//! let client = cp.client().await;
//! let ns = cp.create_namespace("demo").await?;
//! # let _ = (client, ns); Ok(()) }
//! ```
//!
//! Child processes never outlive the test process: they are spawned with
//! `prctl(PR_SET_PDEATHSIG, SIGKILL)` from a thread that lives as long as the process, a shared
//! plane is torn down from an `atexit` handler, and an owned plane on [`Drop`].
//!
//! Set `SCIM_ENVTEST_KEEP_TMPDIR=1` to keep the temporary directory (certificates, logs, etcd data,
//! kubeconfig) after teardown for debugging.

use std::{
    fmt::Write as _,
    fs::File,
    future::Future,
    io::{self, BufRead, BufReader},
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long etcd may take to report healthy.
const ETCD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long kube-apiserver may take until `/readyz` answers `ok` (two cores, cold page cache).
const APISERVER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long kube-controller-manager may take until `/healthz` answers `ok` (two cores, cold page
/// cache, other builds running).
const CONTROLLER_MANAGER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a CRD may take to become Established and discoverable.
const CRD_TIMEOUT: Duration = Duration::from_secs(60);
/// Polling interval of every readiness wait.
const POLL: Duration = Duration::from_millis(100);
/// SIGTERM grace period before SIGKILL at teardown.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Field manager for the server-side applies done by the harness.
const FIELD_MANAGER: &str = "scim-envtest";
/// Prefix of the temporary directories (also used to clean up after killed test processes).
const TMP_PREFIX: &str = "scim-envtest-";

/// The root of the cargo workspace (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// How long each phase of [`ControlPlane::start`] took.
#[derive(Clone, Copy, Debug)]
pub struct StartupTimings {
    /// From spawning etcd until its `/health` reported true.
    pub etcd_ready: Duration,
    /// From spawning kube-apiserver until `/readyz` answered `ok` and the `default` namespace existed.
    pub apiserver_ready: Duration,
    /// From spawning kube-controller-manager until its `/healthz` answered `ok` (it starts after the
    /// CRDs are installed, so the garbage collector's first discovery already sees them).
    pub controller_manager_ready: Duration,
    /// The whole of `start()`, including locating assets, certificates and CRD installation.
    pub total: Duration,
}

/// A running etcd + kube-apiserver + kube-controller-manager (garbage collector only) with an admin
/// kubeconfig.
pub struct ControlPlane {
    // Declared first so the processes are stopped before anything else is dropped.
    processes: Processes,
    tmp: Mutex<Option<tempfile::TempDir>>,
    root: PathBuf,
    assets_dir: PathBuf,
    server_url: String,
    kubeconfig_path: PathBuf,
    apiserver_log_path: PathBuf,
    etcd_log_path: PathBuf,
    controller_manager_log_path: PathBuf,
    /// Why kube-controller-manager is not running, when it is not.
    no_garbage_collector: Option<String>,
    config: kube::Config,
    ns_counter: AtomicU64,
    timings: StartupTimings,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("root", &self.root)
            .field("assets_dir", &self.assets_dir)
            .finish_non_exhaustive()
    }
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

extern "C" fn teardown_shared() {
    // Never unwind out of an extern "C" function.
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(cp)) = SHARED.get() {
            cp.shutdown();
        }
    });
}

impl ControlPlane {
    /// Locate assets (`KUBEBUILDER_ASSETS` if it holds kube-apiserver, etcd and kubectl, else the
    /// directory printed by `<workspace>/hack/envtest-assets.sh`; kube-controller-manager from the
    /// same directory or, when `KUBEBUILDER_ASSETS` lacks it, from
    /// `hack/envtest-assets.sh --controller-manager`, which builds it into the cache), start etcd and
    /// kube-apiserver on free loopback ports, wait for `/readyz` and the `default` namespace, install
    /// every `*.yaml` CRD in `<workspace>/crds/` and wait until each is Established, then start
    /// kube-controller-manager with only the garbage collector and wait for its `/healthz`.
    pub async fn start() -> Result<ControlPlane> {
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

        let pki = Pki::generate().context("generating certificates")?;
        let pki_dir = root.join("pki");
        std::fs::create_dir_all(&pki_dir)?;
        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let path = pki_dir.join(name);
            std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let serving_cert = write("apiserver.crt", &pki.serving_cert)?;
        let serving_key = write("apiserver.key", &pki.serving_key)?;
        let client_ca = write("client-ca.crt", &pki.client_ca)?;
        write("ca.crt", &pki.ca)?;
        write("admin.crt", &pki.admin_cert)?;
        write("admin.key", &pki.admin_key)?;
        let sa_pub = write("sa.pub", &pki.sa_public)?;
        let sa_key = write("sa.key", &pki.sa_private)?;

        let [etcd_client_port, etcd_peer_port, apiserver_port, controller_manager_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let server_url = format!("https://127.0.0.1:{apiserver_port}");

        let processes = Processes::default();

        // etcd
        let etcd_log_path = root.join("etcd.log");
        let mut etcd = Command::new(&etcd_bin);
        etcd.arg(format!("--data-dir={}", root.join("etcd-data").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-cluster=default={etcd_peer_url}"))
            // Test data: no need to survive power loss, and fsync dominates on slow disks.
            .arg("--unsafe-no-fsync=true")
            .arg("--quota-backend-bytes=2147483648")
            .current_dir(&root);
        let etcd_started = Instant::now();
        processes.spawn("etcd", etcd, &etcd_log_path)?;
        wait_until("etcd to report healthy", ETCD_TIMEOUT, &processes, || etcd_healthy(etcd_client_port)).await?;
        let etcd_ready = etcd_started.elapsed();

        // kube-apiserver
        let apiserver_log_path = root.join("kube-apiserver.log");
        let mut apiserver = Command::new(&apiserver_bin);
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--secure-port={apiserver_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", root.join("apiserver-certs").display()))
            .arg(format!("--tls-cert-file={}", serving_cert.display()))
            .arg(format!("--tls-private-key-file={}", serving_key.display()))
            .arg(format!("--client-ca-file={}", client_ca.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--allow-privileged=true")
            // The controller-manager runs only the garbage collector, so nothing would create the
            // token the ServiceAccount admission plugin waits for.
            .arg("--disable-admission-plugins=ServiceAccount")
            // As on OpenShift and other hardened clusters: setting blockOwnerDeletion on an
            // ownerReference requires permission to update the owner's finalizers, so RBAC tests
            // prove that rule is needed rather than assume it.
            .arg("--enable-admission-plugins=OwnerReferencesPermissionEnforcement")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            // 127.0.0.1 is not a valid Endpoints address, so the default lease reconciler would log
            // an error every 10 s; nothing here consumes the `kubernetes` Endpoints anyway.
            .arg("--endpoint-reconciler-type=none")
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false")
            .current_dir(&root);
        let apiserver_started = Instant::now();
        processes.spawn("kube-apiserver", apiserver, &apiserver_log_path)?;

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
        wait_until("kube-apiserver /readyz", APISERVER_TIMEOUT, &processes, || {
            let probe = probe.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(probe.request_text(req).await.map(|body| body.trim() == "ok")?)
            }
        })
        .await?;
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
            apiserver_log_path,
            etcd_log_path,
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
        let (_, established) = cp
            .install_crds(&read_crds(&crd_dir)?)
            .await
            .with_context(|| format!("installing the CRDs from {}", crd_dir.display()))?;
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
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig_path.display()))
            .arg("--controllers=garbage-collector-controller")
            .arg("--leader-elect=false")
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

    /// One control plane per test binary, started on first use and torn down at process exit.
    ///
    /// Blocks the caller while the plane starts (it runs on a dedicated thread with its own tokio
    /// runtime, so calling this from inside a `#[tokio::test]` is fine). Panics with the full
    /// error if the plane cannot be started; later calls panic with the same error.
    pub fn shared() -> &'static ControlPlane {
        let result = SHARED.get_or_init(|| {
            let started = std::thread::Builder::new()
                .name("scim-envtest-start".into())
                .spawn(|| -> Result<ControlPlane> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building a tokio runtime")?;
                    runtime.block_on(ControlPlane::start())
                })
                .map_err(|e| format!("spawning the start thread: {e}"))
                .and_then(|handle| handle.join().map_err(|panic| format!("ControlPlane::start panicked: {panic:?}")));
            match started {
                Ok(Ok(cp)) => {
                    // SAFETY: registering a plain extern "C" fn; it only touches SHARED.
                    unsafe { libc::atexit(teardown_shared) };
                    eprintln!(
                        "scim-envtest: control plane up at {} (etcd ready in {:.1?}, kube-apiserver ready in {:.1?}, \
                         kube-controller-manager ready in {:.1?}, total {:.1?})",
                        cp.server_url,
                        cp.timings.etcd_ready,
                        cp.timings.apiserver_ready,
                        cp.timings.controller_manager_ready,
                        cp.timings.total
                    );
                    Ok(cp)
                }
                Ok(Err(e)) => Err(format!("{e:?}")),
                Err(e) => Err(e),
            }
        });
        match result {
            Ok(cp) => cp,
            Err(e) => panic!("scim-envtest: could not start the shared control plane: {e}"),
        }
    }

    /// A fresh admin (`system:masters`) client bound to the caller's tokio runtime.
    pub async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config.clone()).expect("building a kube::Client from the envtest kubeconfig")
    }

    /// A client that impersonates `user` with `groups` (for example
    /// `"system:serviceaccount:<ns>:<name>"`, with groups `system:serviceaccounts` and
    /// `system:serviceaccounts:<ns>` to mirror a real service-account token).
    pub async fn impersonating_client(&self, user: &str, groups: &[&str]) -> kube::Client {
        let mut config = self.config.clone();
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups =
            if groups.is_empty() { None } else { Some(groups.iter().map(|g| g.to_string()).collect()) };
        kube::Client::try_from(config).expect("building an impersonating kube::Client")
    }

    /// The admin `kube::Config` (clone it to tweak timeouts or impersonation).
    pub fn config(&self) -> &kube::Config {
        &self.config
    }

    /// A kubeconfig file (admin credentials embedded) usable by kubectl, helm and `kube::Config`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The directory holding kube-apiserver, etcd, kubectl (and usually helm).
    pub fn assets_dir(&self) -> &Path {
        &self.assets_dir
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The temporary directory holding certificates, logs, etcd data and the kubeconfig.
    pub fn tmp_dir(&self) -> &Path {
        &self.root
    }

    /// How long starting took.
    pub fn startup_timings(&self) -> StartupTimings {
        self.timings
    }

    /// The assets' kubectl with `--kubeconfig` (and a private `--cache-dir`) preset.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.assets_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig_path)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig_path)
            .arg("--cache-dir")
            .arg(self.root.join("kubectl-cache"));
        cmd
    }

    /// helm (from the assets directory, else `PATH`, else the one `hack/envtest-assets.sh --helm`
    /// builds into the cache), with `KUBECONFIG` set and helm's cache, config and data directories
    /// inside the temporary directory.
    ///
    /// # Panics
    /// When no helm can be found or built; the message says why.
    pub fn helm(&self) -> Command {
        static HELM: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
        let bundled = self.assets_dir.join("helm");
        let helm = if bundled.is_file() {
            bundled
        } else {
            let located = HELM.get_or_init(|| {
                run_assets_script(&["--helm"]).map(PathBuf::from).map_err(|e| format!("{e:#}")).and_then(|p| {
                    if p.is_file() {
                        Ok(p)
                    } else {
                        Err(format!("hack/envtest-assets.sh --helm printed {p:?}, which does not exist"))
                    }
                })
            });
            located.clone().unwrap_or_else(|e| panic!("no helm: {e}"))
        };
        let mut cmd = Command::new(helm);
        let helm_home = self.root.join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig_path)
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"));
        cmd
    }

    /// Create a namespace with a unique name `<prefix>-<n>` and return the name.
    pub async fn create_namespace(&self, prefix: &str) -> Result<String> {
        let n = self.ns_counter.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{prefix}-{n}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name },
        }))?;
        Api::<Namespace>::all(self.client().await)
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(name)
    }

    /// Server-side apply a CRD and wait until it is Established, listed by discovery, its storage
    /// is initialized and creates are no longer delayed (kube-apiserver stalls every create of a
    /// custom resource by 2 s while its CRD is less than 2 s Established; this waits that out once).
    pub async fn install_crd(&self, crd: &CustomResourceDefinition) -> Result<()> {
        let established = install_crd(&self.client().await, crd, &self.processes).await?;
        wait_for_create_delay(established).await;
        Ok(())
    }

    /// Install every CRD found in the `*.yaml`/`*.yml` files of `dir` (multi-document files are
    /// fine; a missing directory installs nothing). Returns the names of the installed CRDs.
    pub async fn install_crds_from_dir(&self, dir: &Path) -> Result<Vec<String>> {
        let (names, latest) = self.install_crds(&read_crds(dir)?).await?;
        wait_for_create_delay(latest).await;
        Ok(names)
    }

    /// Install `crds` without waiting out the create delay; returns their names and the latest
    /// Established second.
    async fn install_crds(&self, crds: &[CustomResourceDefinition]) -> Result<(Vec<String>, Option<i64>)> {
        let mut names = Vec::new();
        let mut latest = None;
        if crds.is_empty() {
            return Ok((names, latest));
        }
        let client = self.client().await;
        for crd in crds {
            let established = install_crd(&client, crd, &self.processes).await?;
            latest = latest.max(established);
            names.push(crd.metadata.name.clone().unwrap_or_default());
        }
        Ok((names, latest))
    }

    /// kube-apiserver's stdout and stderr.
    pub fn apiserver_log_path(&self) -> &Path {
        &self.apiserver_log_path
    }

    /// etcd's stdout and stderr.
    pub fn etcd_log_path(&self) -> &Path {
        &self.etcd_log_path
    }

    /// Whether the garbage collector (kube-controller-manager) runs: `Err` says why not, e.g. assets
    /// from `KUBEBUILDER_ASSETS` without kube-controller-manager and no Go to build one. Tests that
    /// depend on garbage collection must fail with that reason, never pass without it.
    pub fn garbage_collector(&self) -> std::result::Result<(), &str> {
        match &self.no_garbage_collector {
            None => Ok(()),
            Some(why) => Err(why),
        }
    }

    /// kube-controller-manager's stdout and stderr (the garbage collector's log).
    pub fn controller_manager_log_path(&self) -> &Path {
        &self.controller_manager_log_path
    }

    /// Stop the processes and remove the temporary directory. Idempotent; also done on drop and,
    /// for [`ControlPlane::shared`], at process exit.
    fn shutdown(&self) {
        self.processes.stop_all();
        let tmp = lock(&self.tmp).take();
        if let Some(tmp) = tmp {
            if std::env::var_os("SCIM_ENVTEST_KEEP_TMPDIR").is_some() {
                let kept = tmp.keep();
                eprintln!("scim-envtest: kept {}", kept.display());
            } else {
                let _ = tmp.close();
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Assets

const CONTROLLER_MANAGER: &str = "kube-controller-manager";

fn has_core_assets(dir: &Path) -> bool {
    ["kube-apiserver", "etcd", "kubectl"].iter().all(|b| dir.join(b).is_file())
}

/// Where the binaries are: `dir` holds kube-apiserver, etcd and kubectl (and usually helm and
/// kube-controller-manager); `controller_manager` is the kube-controller-manager to run with them,
/// or why there is none.
struct Assets {
    dir: PathBuf,
    controller_manager: std::result::Result<PathBuf, String>,
}

fn locate_assets() -> Result<Assets> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from)
        && has_core_assets(&dir)
    {
        let controller_manager = dir.join(CONTROLLER_MANAGER);
        if controller_manager.is_file() {
            return Ok(Assets { dir, controller_manager: Ok(controller_manager) });
        }
        // e.g. setup-envtest assets: the script finds or builds a kube-controller-manager of the
        // same version in its cache (it never builds anything into KUBEBUILDER_ASSETS). Without Go
        // that fails: the control plane then runs without a garbage collector, and the tests that
        // need one fail with this reason (see `ControlPlane::garbage_collector`).
        let controller_manager = run_assets_script(&["--controller-manager"])
            .map_err(|e| format!("{e:#}"))
            .map(PathBuf::from)
            .and_then(|p| {
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(format!("hack/envtest-assets.sh --controller-manager printed {p:?}, which does not exist"))
                }
            });
        if let Err(why) = &controller_manager {
            eprintln!("scim-envtest: running without kube-controller-manager (no garbage collection): {why}");
        }
        return Ok(Assets { dir, controller_manager });
    }
    let dir = PathBuf::from(run_assets_script(&[])?);
    let controller_manager = dir.join(CONTROLLER_MANAGER);
    if !has_core_assets(&dir) || !controller_manager.is_file() {
        bail!(
            "hack/envtest-assets.sh printed {dir:?}, which does not hold kube-apiserver, etcd, kubectl and \
             {CONTROLLER_MANAGER}; set KUBEBUILDER_ASSETS to a directory that does"
        );
    }
    Ok(Assets { dir, controller_manager: Ok(controller_manager) })
}

/// Run `<workspace>/hack/envtest-assets.sh args…` and return the last line it printed.
fn run_assets_script(args: &[&str]) -> Result<String> {
    let script = workspace_root().join("hack").join("envtest-assets.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", script.display()))?;
    // Relay the script's progress (a cold build takes minutes) while keeping it for the error.
    let stderr = child.stderr.take().expect("piped stderr");
    let relay = std::thread::spawn(move || {
        let mut captured = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            captured.push_str(&line);
            captured.push('\n');
        }
        captured
    });
    let output = child.wait_with_output()?;
    let stderr = relay.join().unwrap_or_default();
    if !output.status.success() {
        bail!(
            "{} failed ({}):\n{}\nInstall Go >= 1.26 so the script can build the binaries, or set \
             KUBEBUILDER_ASSETS to a directory holding kube-apiserver, etcd, kubectl and {CONTROLLER_MANAGER}.",
            [script.display().to_string()]
                .into_iter()
                .chain(args.iter().map(|a| a.to_string()))
                .collect::<Vec<_>>()
                .join(" "),
            output.status,
            stderr.trim_end()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout.lines().last().unwrap_or("").trim().to_string())
}

/// Remove temporary directories left by test processes that were killed before `atexit` ran.
fn remove_stale_tmpdirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(TMP_PREFIX));
        if !is_ours {
            continue;
        }
        let Some(pid) =
            std::fs::read_to_string(path.join("owner.pid")).ok().and_then(|s| s.trim().parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Distinct free loopback ports (kept bound together so they differ; the race after closing is
/// accepted, as in envtest).
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()
        .context("binding a free loopback port")?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

// ---------------------------------------------------------------------------------------------
// Processes

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

#[derive(Default)]
struct Processes(Mutex<Vec<Proc>>);

type SpawnRequest = (Command, mpsc::SyncSender<io::Result<Child>>);

/// Spawn `cmd` from a thread that lives as long as the process: `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked the child exits, and test or tokio worker threads come and go.
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("scim-envtest-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the scim-envtest spawner thread");
        tx
    });
    let (reply, result) = mpsc::sync_channel(1);
    spawner.send((cmd, reply)).map_err(|_| io::Error::other("the spawner thread is gone"))?;
    result.recv().map_err(|_| io::Error::other("the spawner thread is gone"))?
}

impl Processes {
    fn spawn(&self, name: &'static str, mut cmd: Command, log: &Path) -> Result<()> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Own process group: teardown signals the whole group.
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid) and no allocation in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                ) == -1
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent died between fork and prctl: nobody would ever kill us.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_owned();
        let child = spawn_from_long_lived_thread(cmd)
            .with_context(|| format!("starting {name} ({})", program.to_string_lossy()))?;
        lock(&self.0).push(Proc { name, child, log: log.to_path_buf() });
        Ok(())
    }

    /// Fail (with the tail of its log) if any process has exited.
    fn check_running(&self) -> Result<()> {
        let mut procs = lock(&self.0);
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited early ({status}); last lines of {}:\n{}", p.name, p.log.display(), log_tail(&p.log));
            }
        }
        Ok(())
    }

    /// SIGTERM each process group (newest first), SIGKILL after [`STOP_GRACE`], reap.
    fn stop_all(&self) {
        let mut procs = lock(&self.0);
        while let Some(mut p) = procs.pop() {
            stop(&mut p.child);
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pgid = child.id() as libc::pid_t;
    // SAFETY: plain kill(2) of the child's own process group.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            _ => return,
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
}

fn log_tail(path: &Path) -> String {
    const MAX_BYTES: usize = 8 * 1024;
    const MAX_LINES: usize = 40;
    let Ok(bytes) = std::fs::read(path) else {
        return "(log unreadable)".into();
    };
    let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(MAX_BYTES)..]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(MAX_LINES)..].join("\n")
}

/// Poll `check` every [`POLL`] until it returns `Ok(true)`, failing after `timeout` or as soon as
/// one of `processes` exits.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, processes: &Processes, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        processes.check_running().with_context(|| format!("waiting for {what}"))?;
        let last = match tokio::time::timeout(Duration::from_secs(10), check()).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => "not ready".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "check timed out".to_string(),
        };
        if Instant::now() >= deadline {
            let logs = lock(&processes.0)
                .iter()
                .map(|p| format!("--- last lines of {} ---\n{}", p.log.display(), log_tail(&p.log)))
                .collect::<Vec<_>>()
                .join("\n");
            bail!("timed out after {timeout:?} waiting for {what} (last result: {last})\n{logs}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn etcd_healthy(port: u16) -> Result<bool> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    Ok(response.contains("\"health\":\"true\""))
}

// ---------------------------------------------------------------------------------------------
// CRDs

fn read_crds(dir: &Path) -> Result<Vec<CustomResourceDefinition>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|ext| ext == "yaml" || ext == "yml"))
        .collect();
    files.sort();
    let mut crds = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            use serde::Deserialize as _;
            let value = serde_json::Value::deserialize(doc)
                .with_context(|| format!("parsing document {} of {}", i + 1, file.display()))?;
            if value.is_null() {
                continue;
            }
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if kind != "CustomResourceDefinition" {
                bail!("document {} of {} is a {kind:?}, expected a CustomResourceDefinition", i + 1, file.display());
            }
            let crd: CustomResourceDefinition = serde_json::from_value(value).with_context(|| {
                format!("document {} of {} is not a valid CustomResourceDefinition", i + 1, file.display())
            })?;
            crds.push(crd);
        }
    }
    Ok(crds)
}

/// kube-apiserver delays every `create` (POST) of a custom resource by 2 s while its CRD turned
/// Established less than 2 s ago (`crdHandler.serveResource`, an HA-consistency guard from
/// kubernetes#99199; `lastTransitionTime` has second precision). Sleeping out that window once,
/// right after installing, is cheaper and more predictable than a 2 s stall inside a test.
async fn wait_for_create_delay(established_at: Option<i64>) {
    let Some(established_at) = established_at else {
        return;
    };
    let until = std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(established_at).unwrap_or(0))
        + Duration::from_millis(2_100);
    if let Ok(remaining) = until.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(remaining.min(Duration::from_secs(3))).await;
    }
}

/// Apply `crd` and wait until it is served; returns the Unix second at which it became Established.
async fn install_crd(
    client: &kube::Client,
    crd: &CustomResourceDefinition,
    processes: &Processes,
) -> Result<Option<i64>> {
    let name = crd.metadata.name.clone().ok_or_else(|| anyhow!("CustomResourceDefinition without metadata.name"))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crd = crd.clone();
    crd.metadata.managed_fields = None;
    crd.metadata.resource_version = None;
    crd.status = None;
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
        .await
        .with_context(|| format!("applying CustomResourceDefinition {name}"))?;

    let established = || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let crd = api.get(&name).await?;
            Ok(crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"))
        }
    };
    wait_until(&format!("CRD {name} to be Established"), CRD_TIMEOUT, processes, established).await?;
    let established_at = api
        .get(&name)
        .await?
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Established")
        .and_then(|c| c.last_transition_time)
        .map(|t| t.0.as_second());

    // Established means the handler serves; also wait until discovery lists every served version,
    // so kubectl (which maps resources through discovery) sees it right away.
    let group = crd.spec.group.clone();
    let plural = crd.spec.names.plural.clone();
    for version in crd.spec.versions.iter().filter(|v| v.served) {
        let path = format!("/apis/{group}/{}", version.name);
        let needle = format!("\"name\":\"{plural}\"");
        wait_until(&format!("{path} to list {plural}"), CRD_TIMEOUT, processes, || {
            let client = client.clone();
            let path = path.clone();
            let needle = needle.clone();
            async move {
                let body = client.request_text(http::Request::get(path).body(Vec::new())?).await?;
                Ok(body.contains(&needle))
            }
        })
        .await?;

        // The watch cache of a new resource initializes lazily: until it is ready, lists answer
        // 429 "storage is (re)initializing" and the first write blocks for ~2 s. Wait it out here
        // so callers can list, watch and create right away.
        let list = format!("{path}/{plural}?limit=1");
        wait_until(
            &format!("the storage of {plural}.{group}/{} to initialize", version.name),
            CRD_TIMEOUT,
            processes,
            || {
                let client = client.clone();
                let list = list.clone();
                async move {
                    client.request_text(http::Request::get(list).body(Vec::new())?).await?;
                    Ok(true)
                }
            },
        )
        .await?;
    }
    Ok(established_at)
}

// ---------------------------------------------------------------------------------------------
// PKI

struct Pki {
    ca: String,
    serving_cert: String,
    serving_key: String,
    client_ca: String,
    admin_cert: String,
    admin_key: String,
    sa_public: String,
    sa_private: String,
}

fn new_ca(common_name: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

impl Pki {
    fn generate() -> Result<Pki> {
        let (ca, ca_issuer) = new_ca("scim-envtest-ca")?;
        let (client_ca, client_ca_issuer) = new_ca("scim-envtest-client-ca")?;

        let mut serving = CertificateParams::new(
            [
                "127.0.0.1",
                "localhost",
                "::1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.0.0.1",
            ]
            .map(String::from)
            .to_vec(),
        )?;
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.use_authority_key_identifier_extension = true;
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &ca_issuer)?;

        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
        admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        admin.use_authority_key_identifier_extension = true;
        let admin_key = KeyPair::generate()?;
        let admin_cert = admin.signed_by(&admin_key, &client_ca_issuer)?;

        // ECDSA P-256: the service-account token issuer signs ES256 tokens.
        let sa = KeyPair::generate()?;

        Ok(Pki {
            ca,
            serving_cert: serving_cert.pem(),
            serving_key: serving_key.serialize_pem(),
            client_ca,
            admin_cert: admin_cert.pem(),
            admin_key: admin_key.serialize_pem(),
            sa_public: sa.public_key_pem(),
            sa_private: sa.serialize_pem(),
        })
    }

    fn kubeconfig(&self, server_url: &str) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: {server_url}
    certificate-authority-data: {ca}
users:
- name: envtest-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: envtest
  context:
    cluster: envtest
    user: envtest-admin
    namespace: default
current-context: envtest
preferences: {{}}
",
            ca = base64(self.ca.as_bytes()),
            cert = base64(self.admin_cert.as_bytes()),
            key = base64(self.admin_key.as_bytes()),
        );
        out
    }
}

/// Standard base64 with padding (kubeconfig `*-data` fields).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn kubeconfig_parses() {
        let pki = Pki::generate().unwrap();
        let kc = Kubeconfig::from_yaml(&pki.kubeconfig("https://127.0.0.1:1234")).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("envtest"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:1234"));
    }
}
