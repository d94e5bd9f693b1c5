//! The control plane: its state, its accessors and its teardown. Starting it is in `start.rs`, the
//! commands of etcd and kube-apiserver in `components.rs`, restarting them in place in
//! `restart.rs`, the shared instance in `shared.rs`, clients and command-line tools in `tools.rs`.

mod components;
mod restart;
mod shared;
mod start;
mod tools;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use self::components::Components;
use crate::certificates::Pki;
use crate::processes::{Processes, lock};

/// What [`ControlPlane::start_with`] sets up beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// An audit policy (YAML, `audit.k8s.io/v1` `Policy`): kube-apiserver then writes one JSON
    /// event per line to [`ControlPlane::audit_log_path`], across restarts.
    pub audit_policy: Option<String>,
    /// Extra kube-apiserver flags, after the harness's own (for a repeated flag the last one wins);
    /// they are kept across restarts.
    pub apiserver_args: Vec<String>,
    /// The control plane of a real cluster with a node (`cargo xtask cluster`) instead of the test
    /// harness's: see [`Cluster`].
    pub cluster: Option<Cluster>,
}

/// What changes when the control plane serves a real node rather than tests alone: kube-apiserver
/// binds and advertises `address` (pods reach it there through the `kubernetes` Service, whose
/// `ClusterIP` is the first address of `service_cidr`; its serving certificate covers both), and the
/// `kubernetes` Endpoints point at it; authorization is `Node,RBAC` with the `NodeRestriction` and
/// `ServiceAccount` admission plugins (pods get service-account tokens); kube-controller-manager runs
/// every default controller (deployments, endpoint slices, service accounts, `kube-root-ca.crt`, …)
/// with the service-account signing key and the serving CA; and no CRD is installed (a cluster starts
/// empty, a chart brings its own).
#[derive(Clone, Debug)]
pub struct Cluster {
    /// An address on an interface of this machine that pods can reach (e.g. a bridge's).
    pub address: std::net::Ipv4Addr,
    /// `--service-cluster-ip-range`, e.g. `198.19.0.0/24`.
    pub service_cidr: String,
    /// The first address of `service_cidr` (the `kubernetes` Service's ClusterIP).
    pub kubernetes_service_ip: std::net::Ipv4Addr,
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
    audit_log_path: Option<PathBuf>,
    /// How to start etcd and kube-apiserver again in place.
    components: Components,
    /// Signs client certificates for more users ([`ControlPlane::user_kubeconfig`]).
    pki: Pki,
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

impl ControlPlane {
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

    /// kube-apiserver's stdout and stderr.
    pub fn apiserver_log_path(&self) -> &Path {
        &self.apiserver_log_path
    }

    /// The audit log (JSON lines), when [`Options::audit_policy`] was given.
    pub fn audit_log_path(&self) -> Option<&Path> {
        self.audit_log_path.as_deref()
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

    /// Start `cmd` as one more supervised process named `name` (stdout and stderr appended to `log`):
    /// it gets its own process group, dies with this process (`PR_SET_PDEATHSIG`) and is stopped,
    /// newest first, with the control plane. For the components of a node (`cargo xtask cluster`).
    pub fn spawn(&self, name: &'static str, cmd: std::process::Command, log: &Path) -> anyhow::Result<()> {
        self.processes.spawn(name, cmd, log)
    }

    /// SIGTERM the process group of the supervised process `name`, SIGKILL after a grace period,
    /// and reap it. Returns whether one was running.
    pub fn stop(&self, name: &str) -> bool {
        self.processes.stop(name)
    }

    /// Poll `check` until it returns `Ok(true)`, failing after `timeout` (with the tail of every
    /// supervised process's log) or as soon as a supervised process exits.
    pub async fn wait_until<F, Fut>(&self, what: &str, timeout: Duration, check: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        crate::processes::wait_until(what, timeout, &self.processes, check).await
    }

    /// A file of the generated PKI (PEM): `ca.crt` (the serving CA clients trust), `client-ca.crt`,
    /// `admin.crt`, `admin.key`, `apiserver.crt`, `apiserver.key`, `sa.pub`, `sa.key`.
    pub fn pki_file(&self, name: &str) -> PathBuf {
        self.root.join("pki").join(name)
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
