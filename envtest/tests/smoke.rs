//! End-to-end smoke test of the harness against the real control plane.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use k8s_openapi::{
    api::core::v1::{Namespace, Secret},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
};
use scim_envtest::ControlPlane;
use serde_json::{Value, json};

fn run_json(mut cmd: Command) -> Result<Value> {
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        output.status.success(),
        "{cmd:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| format!("parsing the output of {cmd:?}"))
}

fn kubectl_get(cp: &ControlPlane, args: &[&str]) -> Result<Value> {
    let mut cmd = cp.kubectl();
    cmd.arg("get").args(args).args(["-o", "json"]);
    run_json(cmd)
}

fn widget_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": "widgets.smoke.envtest.dev" },
        "spec": {
            "group": "smoke.envtest.dev",
            "scope": "Namespaced",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList" },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "properties": { "color": { "type": "string" } },
                        },
                    },
                }},
            }],
        },
    }))
    .expect("valid Widget CRD")
}

#[tokio::test]
async fn namespace_secret_and_custom_resource_round_trip() -> Result<()> {
    let cp = ControlPlane::shared();
    let client = cp.client().await;

    // Namespace
    let ns = cp.create_namespace("smoke").await?;
    assert!(ns.starts_with("smoke-"), "{ns}");
    let read_ns = Api::<Namespace>::all(client.clone()).get(&ns).await?;
    assert_eq!(read_ns.metadata.name.as_deref(), Some(ns.as_str()));
    let json_ns = kubectl_get(cp, &["namespace", &ns])?;
    assert_eq!(json_ns["metadata"]["name"], ns.as_str());
    assert_eq!(json_ns["status"]["phase"], "Active");

    // Secret
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "smoke-secret", "labels": { "app": "smoke" } },
        "stringData": { "token": "s3cr3t" },
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    let read_secret = secrets.get("smoke-secret").await?;
    let data = read_secret.data.expect("secret data");
    assert_eq!(data["token"].0, b"s3cr3t");
    let json_secret = kubectl_get(cp, &["secret", "-n", &ns, "smoke-secret"])?;
    assert_eq!(json_secret["data"]["token"], "czNjcjN0"); // base64("s3cr3t")
    assert_eq!(json_secret["metadata"]["labels"]["app"], "smoke");

    // Custom resource of a CRD installed through the client.
    cp.install_crd(&widget_crd()).await?;
    let gvk = GroupVersionKind::gvk("smoke.envtest.dev", "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let mut widget = DynamicObject::new("w1", &resource);
    widget.data = json!({ "spec": { "color": "teal" } });
    widgets.create(&PostParams::default(), &widget).await?;
    let read_widget = widgets.get("w1").await?;
    assert_eq!(read_widget.data["spec"]["color"], "teal");
    let json_widget = kubectl_get(cp, &["widgets.smoke.envtest.dev", "-n", &ns, "w1"])?;
    assert_eq!(json_widget["kind"], "Widget");
    assert_eq!(json_widget["spec"]["color"], "teal");

    // RBAC is enforced for impersonated identities.
    let user = format!("system:serviceaccount:{ns}:nobody");
    let ns_group = format!("system:serviceaccounts:{ns}");
    let nobody = cp.impersonating_client(&user, &["system:serviceaccounts", &ns_group]).await;
    let err = Api::<Secret>::namespaced(nobody, &ns)
        .get("smoke-secret")
        .await
        .expect_err("an unprivileged service account must not read secrets");
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }

    // The server is the version of the assets' kube-apiserver.
    let version = Command::new(cp.assets_dir().join("kube-apiserver")).arg("--version").output()?;
    let version = String::from_utf8(version.stdout)?;
    let expected = version.split_whitespace().last().context("kube-apiserver --version printed nothing")?.to_string(); // "Kubernetes v1.36.3" -> "v1.36.3"
    let mut cmd = cp.kubectl();
    cmd.args(["version", "-o", "json"]);
    let kubectl_version = run_json(cmd)?;
    assert_eq!(kubectl_version["serverVersion"]["gitVersion"], expected.as_str());
    let info = client.apiserver_version().await?;
    assert_eq!(info.git_version, expected);
    Ok(())
}

#[tokio::test]
async fn helm_talks_to_the_control_plane() -> Result<()> {
    let cp = ControlPlane::shared();
    let output = cp.helm().arg("version").output()?;
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Version:\"v3."), "{stdout}");

    let mut list = cp.helm();
    list.args(["list", "--all-namespaces", "-o", "json"]);
    assert_eq!(run_json(list)?, json!([]));
    Ok(())
}
