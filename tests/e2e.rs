//! End-to-end behaviour of the operator binary on a real kube-apiserver + etcd.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::{Env, sha256, wait_for};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{EXAMPLES}/{name}")).unwrap()
}

async fn resource_versions(env: &Env, dir: &str, secret: &str) -> (String, String) {
    let d = env.dirs().get(dir).await.unwrap();
    let s = env.secrets().get(secret).await.unwrap();
    (d.metadata.resource_version.unwrap(), s.metadata.resource_version.unwrap())
}

/// Asserts the invariant the whole design rests on: status.tokenHash is the hash of the Secret's token.
async fn assert_status_matches_secret(env: &Env, dir: &str, secret: &str) -> String {
    let token = env.token(secret).await.expect("the Secret holds a token");
    let d = env.dirs().get(dir).await.unwrap();
    let status = d.status.unwrap();
    assert_eq!(
        status.token_hash.as_deref(),
        Some(sha256(&token).as_str()),
        "status hash == hash of the Secret's token"
    );
    assert!(scim_token_operator::token::has_valid_checksum(&token));
    token
}

async fn patch_spec(env: &Env, name: &str, spec: serde_json::Value) {
    env.dirs().patch(name, &PatchParams::default(), &Patch::Merge(json!({ "spec": spec }))).await.unwrap();
}

#[tokio::test]
async fn issue_rotate_and_stay_silent() {
    let env = Env::new("lifecycle").await;
    let _op = env.operator(&[]);

    // 1. kubectl apply of the example as it is -> token issued.
    let (ok, _, err) = env.apply(&example("basic.yaml"));
    assert!(ok, "{err}");
    let d = env.wait_ready_reason("acme", "TokenIssued").await;
    let status = d.status.clone().unwrap();
    assert_eq!(status.secret_name.as_deref(), Some("acme-scim-token"));
    assert_eq!(status.observed_rotation_generation, Some(0));
    assert!(status.token_issued_at.is_some());
    assert!(status.token_expires_at.is_none(), "no tokenExpiresIn: perpetual");
    let first = assert_status_matches_secret(&env, "acme", "acme-scim-token").await;
    assert!(first.starts_with("scim_"));

    let secret = env.secrets().get("acme-scim-token").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("ScimDirectory", "acme", Some(true)));
    assert_eq!(owner.uid, d.metadata.uid.clone().unwrap());
    assert_eq!(secret.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"], "scim-token-operator");
    let annotations = secret.metadata.annotations.clone().unwrap();
    assert_eq!(annotations["scim.tokenops.dev/token-hash"], sha256(&first));
    assert_eq!(annotations["scim.tokenops.dev/rotation-generation"], "0");
    assert_eq!(annotations["scim.tokenops.dev/token-expires-in"], "never");
    // kubectl sees the same through the printer columns.
    let (ok, out, _) = env.kubectl(&["get", "scimdir", "acme"]);
    assert!(ok && out.contains("True") && out.contains("acme-scim-token"), "{out}");

    // 2. Re-applying the same manifest and editing unrelated metadata writes nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = resource_versions(&env, "acme", "acme-scim-token").await;
    let (ok, _, err) = env.apply(&example("basic.yaml"));
    assert!(ok, "{err}");
    let (ok, _, err) = env.kubectl(&["label", "scimdir", "acme", "team=identity"]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = resource_versions(&env, "acme", "acme-scim-token").await;
    assert_eq!(before.1, after.1, "the Secret was not written");
    // A first token is recorded by the status alone: no Event (a fourth write per new directory).
    assert_eq!(env.events_for("acme").await.len(), 0, "no Event about a first token");
    let d = env.dirs().get("acme").await.unwrap();
    assert_eq!(d.status.unwrap().token_hash.as_deref(), Some(sha256(&first).as_str()));

    // 3. rotationGeneration increase -> new token, old one gone from Secret and status at once.
    patch_spec(&env, "acme", json!({ "rotationGeneration": 1 })).await;
    let d = env.wait_ready_reason("acme", "TokenRotated").await;
    assert_eq!(d.status.as_ref().unwrap().observed_rotation_generation, Some(1));
    let second = assert_status_matches_secret(&env, "acme", "acme-scim-token").await;
    assert_ne!(first, second);
    let events = env.events_for("acme").await;
    assert!(events.iter().any(|e| e.note.as_deref().unwrap_or("").contains("RotationGenerationChanged")));

    // 4. Imperative, GitOps-safe rotation request: rotates once; re-applying the manifest from "Git"
    // (without the annotation) neither undoes nor repeats it; the same value again does nothing.
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "acme", "scim.tokenops.dev/rotate=2026-11-22T10:00:00Z"]);
    assert!(ok, "{err}");
    let third = wait_for("rotation by annotation", Duration::from_secs(30), || async {
        let t = env.token("acme-scim-token").await?;
        (t != second).then_some(t)
    })
    .await;
    let d = wait_for("status records the request", Duration::from_secs(30), || async {
        let d = env.dirs().get("acme").await.ok()?;
        (d.status.as_ref()?.last_rotation_request.as_deref() == Some("2026-11-22T10:00:00Z")).then_some(d)
    })
    .await;
    assert_eq!(d.status.unwrap().token_hash.as_deref(), Some(sha256(&third).as_str()));
    let (ok, _, err) = env.apply(&example("basic.yaml").replace("rotationGeneration: 0", "rotationGeneration: 1"));
    assert!(ok, "{err}");
    let (ok, _, err) =
        env.kubectl(&["annotate", "--overwrite", "scimdir", "acme", "scim.tokenops.dev/rotate=2026-11-22T10:00:00Z"]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.token("acme-scim-token").await.unwrap(), third, "no second rotation for one request");

    // 5. Adding tokenExpiresIn rotates and sets the expiry; rewriting it in other units does not.
    patch_spec(&env, "acme", json!({ "tokenExpiresIn": "4320h" })).await;
    let fourth = wait_for("rotation on expiry change", Duration::from_secs(30), || async {
        let t = env.token("acme-scim-token").await?;
        (t != third).then_some(t)
    })
    .await;
    let d = wait_for("expiry in status", Duration::from_secs(30), || async {
        let d = env.dirs().get("acme").await.ok()?;
        d.status.as_ref()?.token_expires_at.is_some().then_some(d)
    })
    .await;
    let s = d.status.unwrap();
    let lifetime = s.token_expires_at.unwrap().0.as_second() - s.token_issued_at.unwrap().0.as_second();
    assert_eq!(lifetime, 180 * 24 * 3600);
    patch_spec(&env, "acme", json!({ "tokenExpiresIn": "180d" })).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.token("acme-scim-token").await.unwrap(), fourth, "same duration, other units: no rotation");
    env.assert_log_clean().await;
}

#[tokio::test]
async fn repairs_and_conflicts() {
    let env = Env::new("repair").await;
    // Repairs follow each other within seconds here; the interval between automatic issues is tested
    // on its own.
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let (ok, _, err) = env.apply(&example("with-secret-template.yaml"));
    assert!(ok, "{err}");
    env.wait_ready_reason("initech", "TokenIssued").await;
    let first = assert_status_matches_secret(&env, "initech", "initech-okta-scim").await;
    let secret = env.secrets().get("initech-okta-scim").await.unwrap();
    assert_eq!(secret.metadata.labels.as_ref().unwrap()["tenant"], "initech");
    assert_eq!(secret.metadata.annotations.as_ref().unwrap()["reloader.stakater.com/match"], "true");

    // Labels and annotations stripped -> restored, same token.
    let (ok, _, err) = env.kubectl(&[
        "annotate",
        "secret",
        "initech-okta-scim",
        "scim.tokenops.dev/token-hash-",
        "scim.tokenops.dev/rotation-generation-",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) =
        env.kubectl(&["label", "secret", "initech-okta-scim", "app.kubernetes.io/managed-by-", "tenant-"]);
    assert!(ok, "{err}");
    wait_for("labels restored", Duration::from_secs(30), || async {
        let s = env.secrets().get("initech-okta-scim").await.ok()?;
        let labels = s.metadata.labels?;
        let annotations = s.metadata.annotations?;
        (labels.contains_key("tenant")
            && labels.contains_key("app.kubernetes.io/managed-by")
            && annotations.contains_key("scim.tokenops.dev/token-hash"))
        .then_some(())
    })
    .await;
    assert_eq!(env.token("initech-okta-scim").await.unwrap(), first, "restoring metadata never re-issues");

    // Token key removed -> re-issued with a Warning.
    env.secrets()
        .patch("initech-okta-scim", &PatchParams::default(), &Patch::Merge(json!({ "data": { "token": null } })))
        .await
        .unwrap();
    let second = wait_for("re-issue after token removal", Duration::from_secs(30), || async {
        env.token("initech-okta-scim").await.filter(|t| *t != first)
    })
    .await;
    wait_for("TokenMissing warning", Duration::from_secs(30), || async {
        env.events_for("initech")
            .await
            .into_iter()
            .find(|e| e.type_.as_deref() == Some("Warning") && e.note.as_deref().unwrap_or("").contains("TokenMissing"))
    })
    .await;

    // Secret deleted -> re-issued with a Warning.
    env.secrets().delete("initech-okta-scim", &DeleteParams::default()).await.unwrap();
    let third = wait_for("re-issue after delete", Duration::from_secs(30), || async {
        env.token("initech-okta-scim").await.filter(|t| *t != second)
    })
    .await;
    wait_for("SecretDeleted warning", Duration::from_secs(30), || async {
        env.events_for("initech").await.into_iter().find(|e| e.note.as_deref().unwrap_or("").contains("SecretDeleted"))
    })
    .await;
    wait_for("status follows", Duration::from_secs(30), || async {
        let d = env.dirs().get("initech").await.ok()?;
        (d.status?.token_hash? == sha256(&third)).then_some(())
    })
    .await;

    // A foreign Secret under the target name is never touched: SecretConflict, Warning, backoff.
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": { "name": "foreign-scim-token" },
        "stringData": { "token": "not-ours" }
    }))
    .unwrap();
    env.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    let before = env.secrets().get("foreign-scim-token").await.unwrap();
    let (ok, _, err) = env
        .apply("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: foreign\nspec: {}\n");
    assert!(ok, "{err}");
    let d = env.wait_ready_reason("foreign", "SecretConflict").await;
    assert_eq!(d.ready_condition().unwrap().status, "False");
    assert!(d.status.unwrap().token_hash.is_none());
    wait_for("SecretConflict warning", Duration::from_secs(30), || async {
        env.events_for("foreign").await.into_iter().find(|e| e.reason.as_deref() == Some("SecretConflict"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = env.secrets().get("foreign-scim-token").await.unwrap();
    assert_eq!(before.metadata.resource_version, after.metadata.resource_version, "foreign Secret untouched");
    // Once the foreign Secret is gone, the backoff retry issues the token.
    env.secrets().delete("foreign-scim-token", &DeleteParams::default()).await.unwrap();
    env.wait_ready_reason("foreign", "TokenIssued").await;
    assert_status_matches_secret(&env, "foreign", "foreign-scim-token").await;

    // Another directory's Secret is a conflict too.
    let (ok, _, err) = env.apply(
        "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: thief\nspec:\n  secretName: initech-okta-scim\n",
    );
    assert!(ok, "{err}");
    let d = env.wait_ready_reason("thief", "SecretConflict").await;
    let message = &d.ready_condition().unwrap().message;
    assert!(message.contains("not managed by this ScimDirectory"), "{message}");
    assert!(
        !message.contains("initech\"") && !message.contains("ScimDirectory/initech"),
        "the owner is not revealed: {message}"
    );
    assert_eq!(env.token("initech-okta-scim").await.unwrap(), third);
    env.assert_log_clean().await;
}

#[tokio::test]
async fn secret_template_edits_follow_without_reissue() {
    let env = Env::new("template").await;
    let _op = env.operator(&[]);
    let original = example("with-secret-template.yaml");
    let (ok, _, err) = env.apply(&original);
    assert!(ok, "{err}");
    env.wait_ready_reason("initech", "TokenIssued").await;
    let token = assert_status_matches_secret(&env, "initech", "initech-okta-scim").await;
    // Someone else's label on the Secret: never the operator's to remove.
    let (ok, _, err) = env.kubectl(&["label", "secret", "initech-okta-scim", "team=payments"]);
    assert!(ok, "{err}");

    // Drop a label and the annotation, add a label: the Secret follows, the token stays.
    let edited = original
        .replace("      tenant: initech\n", "      tier: gold\n")
        .replace("    annotations:\n      reloader.stakater.com/match: \"true\"\n", "");
    assert_ne!(edited, original);
    let (ok, _, err) = env.apply(&edited);
    assert!(ok, "{err}");
    let metadata = |s: &Secret| {
        (s.metadata.labels.clone().unwrap_or_default(), s.metadata.annotations.clone().unwrap_or_default())
    };
    wait_for("the Secret to follow the template", Duration::from_secs(30), || async {
        let (labels, annotations) = metadata(&env.secrets().get("initech-okta-scim").await.ok()?);
        (!labels.contains_key("tenant")
            && labels.get("tier").map(String::as_str) == Some("gold")
            && !annotations.contains_key("reloader.stakater.com/match"))
        .then_some(())
    })
    .await;
    let (labels, annotations) = metadata(&env.secrets().get("initech-okta-scim").await.unwrap());
    assert_eq!(labels.get("team").map(String::as_str), Some("payments"), "a label the operator did not set survives");
    assert_eq!(labels.get("app.kubernetes.io/part-of").map(String::as_str), Some("scim-gateway"));
    assert!(annotations.contains_key("scim.tokenops.dev/token-hash"));
    assert_eq!(assert_status_matches_secret(&env, "initech", "initech-okta-scim").await, token, "no re-issue");

    // Re-applying the same manifest writes nothing.
    let before = resource_versions(&env, "initech", "initech-okta-scim").await;
    let (ok, _, err) = env.apply(&edited);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(resource_versions(&env, "initech", "initech-okta-scim").await, before);

    // No template at all: every key it put there goes, the operator's own and others' stay.
    patch_spec(&env, "initech", json!({ "secretTemplate": null })).await;
    wait_for("the template's keys to go", Duration::from_secs(30), || async {
        let (labels, annotations) = metadata(&env.secrets().get("initech-okta-scim").await.ok()?);
        (!labels.contains_key("tier")
            && !labels.contains_key("app.kubernetes.io/part-of")
            && !annotations.contains_key("scim.tokenops.dev/template-hash"))
        .then_some(())
    })
    .await;
    let (labels, _) = metadata(&env.secrets().get("initech-okta-scim").await.unwrap());
    assert_eq!(labels.get("team").map(String::as_str), Some("payments"));
    assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("scim-token-operator"));
    assert_eq!(assert_status_matches_secret(&env, "initech", "initech-okta-scim").await, token, "no re-issue");
    env.assert_log_clean().await;
}

#[tokio::test]
async fn expiry_is_reported_at_the_instant_it_happens() {
    let env = Env::new("expiry").await;
    let op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let (ok, _, err) = env.apply(&example("with-expiry.yaml"));
    assert!(ok, "{err}");
    let d = env.wait_ready_reason("globex", "TokenIssued").await;
    let s = d.status.unwrap();
    assert_eq!(s.token_expires_at.unwrap().0.as_second() - s.token_issued_at.unwrap().0.as_second(), 15552000);
    let token = env.token("globex-scim-token").await.unwrap();

    // Token lifetimes are at least an hour, so the test back-dates the record on the Secret (where the
    // operator reads it) so that the token expires a few seconds from now; the operator must wake up
    // then by itself. Issue time and expiry stay consistent: an expiry alone is caught as forged.
    env.backdate("globex", 15552000, 4).await;
    // Renewal (14d before) is due at once for such a token: the operator renews instead of expiring.
    let renewed = wait_for("renewal", Duration::from_secs(30), || async {
        env.token("globex-scim-token").await.filter(|t| *t != token)
    })
    .await;
    wait_for("RenewalDue event", Duration::from_secs(30), || async {
        env.events_for("globex").await.into_iter().find(|e| e.note.as_deref().unwrap_or("").contains("RenewalDue"))
    })
    .await;

    // Without renewBefore the token expires: Ready=False, TokenExpired, at the recorded instant.
    patch_spec(&env, "globex", json!({ "renewBefore": null, "tokenExpiresIn": "2h" })).await;
    let rotated = wait_for("rotation for the new expiry", Duration::from_secs(30), || async {
        env.token("globex-scim-token").await.filter(|t| *t != renewed)
    })
    .await;
    env.wait_ready_reason("globex", "TokenRotated").await;
    let soon = env.backdate("globex", 7200, 4).await;
    let d = env.wait_ready_reason("globex", "TokenExpired").await;
    assert_eq!(d.ready_condition().unwrap().status, "False");
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    assert!(now >= soon.as_second(), "not reported before the expiry");
    assert_eq!(env.token("globex-scim-token").await.unwrap(), rotated, "an expired token is not replaced silently");

    // The expiry gauge follows the directory: exported while it exists, gone once it is deleted (an
    // alert on a deleted directory's expired token would never resolve).
    let series =
        format!("scim_token_operator_token_expiry_timestamp_seconds{{namespace=\"{}\",name=\"globex\"}}", env.ns);
    assert!(op.metrics().contains(&series), "{series} is exported");
    env.dirs().delete("globex", &Default::default()).await.unwrap();
    wait_for("the expiry series of the deleted directory to go", Duration::from_secs(30), || async {
        (!op.metrics().contains(&series)).then_some(())
    })
    .await;
    env.assert_log_clean().await;
}

#[tokio::test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs `--features failpoints` (hack/test.sh sets it)")]
async fn crash_between_writes_never_rotates_twice() {
    let env = Env::new("crash").await;
    // The failpoint makes the operator exit right after the Secret write, before the status write.
    let mut crashing = env.operator(&[("SCIM_TOKEN_OPERATOR_FAILPOINT", "after-secret-write")]);
    let (ok, _, err) = env.apply(&example("basic.yaml"));
    assert!(ok, "{err}");
    let status = crashing.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(scim_token_operator::controller::FAILPOINT_EXIT_CODE));
    let token = env.token("acme-scim-token").await.expect("Secret written before the crash");
    let d = env.dirs().get("acme").await.unwrap();
    assert!(d.status.and_then(|s| s.token_hash).is_none(), "crashed before the status write");

    let mut op = env.operator(&[]);
    env.wait_ready_reason("acme", "TokenIssued").await;
    assert_eq!(assert_status_matches_secret(&env, "acme", "acme-scim-token").await, token, "adopted, not re-issued");
    op.terminate().await;

    // The same for a rotation.
    let mut crashing = env.operator(&[("SCIM_TOKEN_OPERATOR_FAILPOINT", "after-secret-write")]);
    patch_spec(&env, "acme", json!({ "rotationGeneration": 1 })).await;
    crashing.wait_exit(Duration::from_secs(60)).await;
    let rotated = env.token("acme-scim-token").await.unwrap();
    assert_ne!(rotated, token);
    let _op = env.operator(&[]);
    env.wait_ready_reason("acme", "TokenRotated").await;
    assert_eq!(
        assert_status_matches_secret(&env, "acme", "acme-scim-token").await,
        rotated,
        "one rotation per request"
    );
    env.assert_log_clean().await;
}

#[tokio::test]
async fn restart_writes_nothing_and_two_replicas_elect_one_leader() {
    let env = Env::new("leader").await;
    let mut a = env.operator(&[]);
    for name in ["one", "two", "three"] {
        let (ok, _, err) = env.apply(&format!(
            "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {name}\nspec:\n  tokenExpiresIn: 90d\n"
        ));
        assert!(ok, "{err}");
    }
    for name in ["one", "two", "three"] {
        env.wait_ready_reason(name, "TokenIssued").await;
    }
    let versions = |env: &Env| {
        let dirs = env.dirs();
        let secrets = env.secrets();
        async move {
            let mut v = vec![];
            for name in ["one", "two", "three"] {
                v.push(dirs.get(name).await.unwrap().metadata.resource_version.unwrap());
                v.push(secrets.get(&format!("{name}-scim-token")).await.unwrap().metadata.resource_version.unwrap());
            }
            v
        }
    };
    let before = versions(&env).await;

    // A second replica stands by while the first leads.
    let b = env.operator(&[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(b.metrics().contains("scim_token_operator_leader 0"), "b stands by while a leads");
    // Both are alive and ready: a standby must not be restarted by its probes.
    for op in [&a, &b] {
        for path in ["/healthz", "/readyz"] {
            let response = op.get(path);
            assert_eq!(response.split_whitespace().nth(1), Some("200"), "{path}: {response}");
        }
    }
    assert!(
        a.metrics().contains("scim_token_operator_tokens_issued_total{reason=\"Initial\"} 3"),
        "a issued one token per directory: {}",
        a.metrics()
    );
    let exit = a.terminate().await;
    assert!(exit.success(), "graceful shutdown on SIGTERM: {exit:?}");
    // b takes over (the lease is released on shutdown) and reconciles everything: no writes.
    wait_for("b leads", Duration::from_secs(60), || async {
        b.metrics().contains("scim_token_operator_leader 1").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(before, versions(&env).await, "a restart/failover writes nothing");
    assert!(
        !b.metrics().contains("scim_token_operator_tokens_issued_total{"),
        "b issued nothing: the three tokens are the ones a issued"
    );
    // The new leader acts.
    patch_spec(&env, "two", json!({ "rotationGeneration": 1 })).await;
    env.wait_ready_reason("two", "TokenRotated").await;
    assert_status_matches_secret(&env, "two", "two-scim-token").await;
    let metrics = b.metrics();
    assert!(
        metrics.contains("scim_token_operator_tokens_issued_total{reason=\"RotationGenerationChanged\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("scim_token_operator_token_expiry_timestamp_seconds{"), "{metrics}");
    env.assert_log_clean().await;
}

#[tokio::test]
async fn malformed_manifests_are_rejected_naming_the_field() {
    let env = Env::new("invalid").await;
    let dir = |spec: &str| {
        format!("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: bad\nspec:\n{spec}")
    };
    for (spec, field) in [
        ("  rotationGeneration: -1\n", "spec.rotationGeneration"),
        ("  rotationGeneration: \"one\"\n", "spec.rotationGeneration"),
        ("  tokenExpiresIn: 10x\n", "spec.tokenExpiresIn"),
        ("  tokenExpiresIn: 1h1h\n", "spec.tokenExpiresIn"),
        ("  renewBefore: 7d\n", "renewBefore requires tokenExpiresIn"),
        ("  secretName: Bad_Name\n", "spec.secretName"),
        ("  secretTemplate:\n    labels:\n      app.kubernetes.io/managed-by: me\n", "spec.secretTemplate.labels"),
        (
            "  secretTemplate:\n    annotations:\n      scim.tokenops.dev/token-hash: x\n",
            "spec.secretTemplate.annotations",
        ),
        // Rotation storms: a renewal one second after each issue, or right at it.
        ("  tokenExpiresIn: 3601s\n  renewBefore: 1h\n", "tokenExpiresIn minus renewBefore must be at least 1h"),
        ("  tokenExpiresIn: 3600.000000001s\n  renewBefore: 1h\n", "spec.tokenExpiresIn"),
        ("  tokenExpiresIn: 1.5s\n", "spec.tokenExpiresIn"),
        ("  tokenExpiresIn: 100h\n  renewBefore: 91h\n", "at least 10% of tokenExpiresIn"),
        // What the API server would refuse on the Secret is refused on the directory.
        ("  secretTemplate:\n    labels:\n      tier: \"not a valid value!\"\n", "spec.secretTemplate.labels"),
        ("  secretTemplate:\n    labels:\n      \"bad key!\": x\n", "keys must be qualified names"),
        ("  secretTemplate:\n    annotations:\n      \"/nope\": x\n", "keys must be qualified names"),
    ] {
        let (ok, _, err) = env.apply(&dir(spec));
        assert!(!ok, "{spec} must be rejected");
        assert!(err.contains(field), "rejection of {spec:?} names {field}: {err}");
    }
    // A default Secret name over 253 characters.
    let long = "a".repeat(245);
    let (ok, _, err) = env.apply(&format!(
        "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {long}\nspec: {{}}\n"
    ));
    assert!(!ok && err.contains("at most 242 characters"), "{err}");
    let (ok, _, err) = env.apply(&format!(
        "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {long}\nspec:\n  secretName: short\n"
    ));
    assert!(ok, "with spec.secretName the name may be long: {err}");

    // Transition rules: no decrease, no secretName change.
    let (ok, _, err) = env.apply(&dir("  rotationGeneration: 3\n  secretName: kept\n"));
    assert!(ok, "{err}");
    let (ok, _, err) = env.apply(&dir("  rotationGeneration: 2\n  secretName: kept\n"));
    assert!(!ok && err.contains("rotationGeneration may only increase"), "{err}");
    let (ok, _, err) = env.apply(&dir("  rotationGeneration: 3\n  secretName: moved\n"));
    assert!(!ok && err.contains("secretName is immutable"), "{err}");

    // What the schema cannot check is reported in status, and nothing is written: a lifetime below the
    // minimum, and a renewal storm spelled with days (CEL's durations have no day unit).
    let (ok, _, err) = env.apply(&dir("  rotationGeneration: 3\n  secretName: kept\n  tokenExpiresIn: 30m\n"));
    assert!(ok, "{err}");
    let _op = env.operator(&[]);
    let d = env.wait_ready_reason("bad", "InvalidSpec").await;
    assert!(d.ready_condition().unwrap().message.contains("spec.tokenExpiresIn"));
    let (ok, _, err) = env.apply(
        "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: storm\nspec:\n  tokenExpiresIn: 1d\n  renewBefore: 23h59m59s\n",
    );
    assert!(ok, "{err}");
    let d = env.wait_ready_reason("storm", "InvalidSpec").await;
    let message = &d.ready_condition().unwrap().message;
    assert!(message.contains("leaves 1s between a token's issue and its renewal"), "{message}");
    assert!(env.secrets().get_opt("storm-scim-token").await.unwrap().is_none(), "no token for a storm spec");
    assert!(env.secrets().get_opt("kept").await.unwrap().is_none());
    wait_for("InvalidSpec warning", Duration::from_secs(30), || async {
        env.events_for("bad").await.into_iter().find(|e| e.reason.as_deref() == Some("InvalidSpec"))
    })
    .await;
    // Fixing it issues the token.
    patch_spec(&env, "bad", json!({ "tokenExpiresIn": "1h" })).await;
    env.wait_ready_reason("bad", "TokenIssued").await;
    assert_status_matches_secret(&env, "bad", "kept").await;
    env.assert_log_clean().await;
}
