//! Where the control-plane binaries come from: `KUBEBUILDER_ASSETS`, or what
//! `hack/envtest-assets.sh` finds or builds into its cache.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::workspace_root;

const CONTROLLER_MANAGER: &str = "kube-controller-manager";

fn has_core_assets(dir: &Path) -> bool {
    ["kube-apiserver", "etcd", "kubectl"].iter().all(|b| dir.join(b).is_file())
}

/// Where the binaries are: `dir` holds kube-apiserver, etcd and kubectl (and usually helm and
/// kube-controller-manager); `controller_manager` is the kube-controller-manager to run with them,
/// or why there is none.
pub(crate) struct Assets {
    pub(crate) dir: PathBuf,
    pub(crate) controller_manager: std::result::Result<PathBuf, String>,
}

pub(crate) fn locate_assets() -> Result<Assets> {
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
pub(crate) fn run_assets_script(args: &[&str]) -> Result<String> {
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
