//! Restarting etcd and kube-apiserver in place keeps data, address and credentials; the audit log
//! names the user of each write; a user kubeconfig authenticates as that user.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use scim_envtest::{ControlPlane, Options};

const POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create]
  resources:
  - group: \"\"
    resources: [configmaps]
- level: None
";

async fn client_for(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let config =
        kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({ "metadata": { "name": name }, "data": { "k": "v" } })).unwrap()
}

#[tokio::test]
async fn etcd_and_apiserver_restart_in_place() -> Result<()> {
    let cp = ControlPlane::start_with(Options { audit_policy: Some(POLICY.into()), ..Options::default() }).await?;
    let ns = cp.create_namespace("restart").await?;
    let user = client_for(&cp.user_kubeconfig("replica-a", Some("system:masters"))?).await?;
    let maps: Api<ConfigMap> = Api::namespaced(user, &ns);
    maps.create(&PostParams::default(), &config_map("before")).await?;

    let (etcd_pid, apiserver_pid) = (cp.etcd_pid(), cp.apiserver_pid());
    cp.restart_etcd(Duration::from_millis(500)).await?;
    ensure!(cp.etcd_pid() != etcd_pid, "etcd has the same pid after a restart");
    maps.get("before").await.context("data written before the etcd restart")?;
    cp.restart_apiserver(Duration::from_millis(500)).await?;
    ensure!(cp.apiserver_pid() != apiserver_pid, "kube-apiserver has the same pid after a restart");

    // The same client (same address, same CA, same credentials) works on the restarted server.
    maps.get("before").await.context("data written before both restarts")?;
    maps.create(&PostParams::default(), &config_map("after")).await?;

    let audit = std::fs::read_to_string(cp.audit_log_path().context("no audit log")?)?;
    let creates: Vec<(String, String)> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["objectRef"]["namespace"] == ns.as_str())
        .map(|e| {
            (e["user"]["username"].as_str().unwrap_or("").into(), e["objectRef"]["name"].as_str().unwrap_or("").into())
        })
        .collect();
    // One audit file across the restart, naming the certificate's user.
    ensure!(
        creates == [("replica-a".to_string(), "before".to_string()), ("replica-a".into(), "after".into())],
        "audit events: {creates:?}"
    );
    Ok(())
}
