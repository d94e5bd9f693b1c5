//! Clients, kubectl, helm, namespaces and CRDs for the code under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, api::PostParams};

use super::ControlPlane;
use crate::assets::run_assets_script;
use crate::crds::{install_crd, read_crds, wait_for_create_delay};

impl ControlPlane {
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

    /// A kubeconfig file for `user` (in `group`, e.g. `system:masters`) authenticating with its own
    /// client certificate, so the audit log and RBAC tell its requests apart from the admin's. Written
    /// to `<tmp>/users/<user>.kubeconfig`; `user` must be usable as a file name.
    pub fn user_kubeconfig(&self, user: &str, group: Option<&str>) -> Result<PathBuf> {
        anyhow::ensure!(
            !user.is_empty() && user.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b)),
            "user name {user:?} is not usable as a file name"
        );
        let (cert, key) = self.pki.client_certificate(user, group).context("signing a client certificate")?;
        let dir = self.root.join("users");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{user}.kubeconfig"));
        std::fs::write(&path, crate::kubeconfig::render(&self.server_url, &self.pki.ca, &cert, &key))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
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
    pub(super) async fn install_crds(&self, crds: &[CustomResourceDefinition]) -> Result<(Vec<String>, Option<i64>)> {
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
}
