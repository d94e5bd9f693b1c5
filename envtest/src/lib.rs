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
//! For fault injection, [`ControlPlane::start_with`] adds an audit log and kube-apiserver flags,
//! [`ControlPlane::restart_apiserver`] and [`ControlPlane::restart_etcd`] SIGKILL a component and start
//! it again in place (same ports, data directory, certificates and flags), and
//! [`ControlPlane::user_kubeconfig`] gives each client its own certificate, so the audit log names it.
//!
//! Layout: `assets` (where the binaries come from), `certificates` (the PKI), `kubeconfig`,
//! `processes` (children that die with the test process, readiness waits), `crds`, and
//! `control_plane/` (`start`, `components` for etcd's and kube-apiserver's commands, `restart`,
//! `shared`, `tools` for clients, kubectl and helm).
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

mod assets;
mod certificates;
mod control_plane;
mod crds;
mod kubeconfig;
mod processes;

use std::path::{Path, PathBuf};

pub use control_plane::{Cluster, ControlPlane, Options, StartupTimings};

/// Prefix of the temporary directories (also used to clean up after killed test processes).
const TMP_PREFIX: &str = "scim-envtest-";

/// The root of the cargo workspace (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}
