//! Deleting a ScimDirectory deletes its Secret through the ownerReference, by the garbage collector of
//! the kube-controller-manager that the test control plane runs (the operator has no delete code).

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use serde_json::json;
use support::{Env, wait_for};

const BASIC: &str = include_str!("../examples/basic.yaml");

#[tokio::test]
async fn deleting_the_directory_garbage_collects_its_secret_only() {
    let env = Env::new("gc").await;
    if let Err(why) = env.cp.garbage_collector() {
        panic!(
            "this test needs the garbage collector of kube-controller-manager, which is not running: {why}\n\
             Put a kube-controller-manager of the same version into KUBEBUILDER_ASSETS, or install Go so \
             hack/envtest-assets.sh can build one."
        );
    }
    let _op = env.operator(&[]);

    // A Secret nobody owns, in the same namespace: the garbage collector must leave it alone.
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": { "name": "unrelated", "labels": { "app.kubernetes.io/managed-by": "someone-else" } },
        "stringData": { "token": "not-a-scim-token" }
    }))
    .unwrap();
    let foreign_uid = env.secrets().create(&PostParams::default(), &foreign).await.unwrap().metadata.uid;

    let (ok, _, err) = env.apply(BASIC);
    assert!(ok, "{err}");
    let dir = env.wait_ready_reason("acme", "TokenIssued").await;
    let uid = dir.metadata.uid.clone().unwrap();
    let secret = wait_for("Secret acme-scim-token", Duration::from_secs(30), || async {
        env.secrets().get_opt("acme-scim-token").await.unwrap()
    })
    .await;
    env.token("acme-scim-token").await.expect("the Secret holds a token");
    let owners = secret.metadata.owner_references.clone().unwrap_or_default();
    assert!(
        owners.iter().any(|o| o.kind == "ScimDirectory" && o.name == "acme" && o.uid == uid),
        "the Secret is owned by the directory: {owners:?}"
    );
    let secret_uid = secret.metadata.uid.clone().unwrap();

    let (ok, out, err) = env.kubectl(&["delete", "scimdir", "acme"]);
    assert!(ok, "kubectl delete failed: {out}{err}");
    assert!(env.dirs().get_opt("acme").await.unwrap().is_none(), "the directory is gone");

    wait_for("the garbage collector to delete acme-scim-token", Duration::from_secs(60), || async {
        env.secrets().get_opt("acme-scim-token").await.unwrap().is_none().then_some(())
    })
    .await;

    // It was the garbage collector: the operator has no delete code, and kube-controller-manager
    // logs the dependent it deletes.
    let log_path = env.cp.controller_manager_log_path();
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(
        log.lines().any(|l| l.contains("Deleting") && l.contains(&secret_uid)),
        "{} names the deleted Secret {secret_uid}",
        log_path.display()
    );

    // The unowned Secret survives, untouched.
    let after = env.secrets().get("unrelated").await.expect("the unowned Secret survives");
    assert_eq!(after.metadata.uid, foreign_uid);
    assert!(after.metadata.deletion_timestamp.is_none());
    env.assert_log_clean().await;
}
