//! What a hostile tenant (or a misbehaving tool) can do to the operator, on a real kube-apiserver +
//! etcd: fight it over the Secret, forge the issue record, feed its cache large Secrets, or make its
//! writes fail. Each must be bounded, caught, or reported where the user looks.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use scim_token_operator::api::ScimDirectory;
use serde_json::json;
use support::{Env, Operator, sha256, wait_for};

fn directory(name: &str, spec: &str) -> String {
    format!("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

/// The value of a metric series (`name{labels}`) on the operator's /metrics, 0 when absent.
fn metric(op: &Operator, series: &str) -> f64 {
    op.metrics().lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// Successful server-side applies of Secrets, from the API server's own request counters (cluster-wide:
/// the other tests of this binary add a few of their own).
fn secret_applies(env: &Env) -> f64 {
    let (ok, metrics, err) = env.kubectl(&["get", "--raw", "/metrics"]);
    assert!(ok, "{err}");
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| ["resource=\"secrets\"", "verb=\"APPLY\"", "code=\"200\""].iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn issued(op: &Operator, reason: &str) -> f64 {
    metric(op, &format!("scim_token_operator_tokens_issued_total{{reason=\"{reason}\"}}"))
}

#[tokio::test]
async fn a_writer_fighting_over_the_token_cannot_make_the_operator_loop() {
    let env = Env::new("fight").await;
    let op = env.operator(&[("MIN_ISSUE_INTERVAL", "4s")]);
    let (ok, _, err) = env.apply(&directory("acme", "  tokenExpiresIn: 90d\n"));
    assert!(ok, "{err}");
    env.wait_ready_reason("acme", "TokenIssued").await;

    // A tool rewrites data.token every 100 ms for 10 s: every write of the operator is undone at once.
    let applies_before = secret_applies(&env);
    let started = Instant::now();
    let mut writes = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let forged = json!({ "data": { "token": "Zm9yZ2Vk" } }); // "forged"
        env.secrets().patch("acme-scim-token", &PatchParams::default(), &Patch::Merge(forged)).await.unwrap();
        writes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let repairs = issued(&op, "TokenChanged");
    // One repair per interval at most: 10 s / 4 s, plus one at each end.
    assert!(repairs <= 4.0, "{repairs} repairs during {writes} hostile writes");
    // The API server saw as much: a handful of Secret writes (some from other tests), not one per fight round.
    let applies = secret_applies(&env) - applies_before;
    assert!(applies <= 12.0, "{applies} Secret applies during {writes} hostile writes");
    let deferred = metric(&op, "scim_token_operator_issues_deferred_total{reason=\"TokenChanged\"}");
    assert!(deferred >= 1.0, "deferrals are counted: {deferred}");
    wait_for("IssueDeferred warning", Duration::from_secs(30), || async {
        env.events_for("acme").await.into_iter().find(|e| e.reason.as_deref() == Some("IssueDeferred"))
    })
    .await;

    // Once the fight stops, the deferred repair lands and the status matches the Secret again.
    let d = wait_for("the deferred repair", Duration::from_secs(30), || async {
        let d = env.dirs().get("acme").await.ok()?;
        let token = env.token("acme-scim-token").await?;
        (d.ready_condition()?.reason == "TokenRotated" && d.status.as_ref()?.token_hash.as_deref()? == sha256(&token))
            .then_some(d)
    })
    .await;
    assert!(d.ready_condition().unwrap().message.contains("TokenChanged"));

    // The repairs' Warnings are one Event, a series counting them, not one object per repair.
    let repairs = issued(&op, "TokenChanged");
    let warnings: Vec<_> = env
        .events_for("acme")
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("TokenChanged"))
        .map(|e| e.series.map(|s| s.count).unwrap_or(1))
        .collect();
    assert_eq!(warnings.len(), 1, "one Event for {repairs} repairs: {warnings:?}");
    assert_eq!(f64::from(warnings[0]), repairs, "the series counts every repair");

    // A requested rotation is never held back, even right after a repair.
    let before = env.token("acme-scim-token").await.unwrap();
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "acme", "scim.tokenops.dev/rotate=now"]);
    assert!(ok, "{err}");
    let took = Instant::now();
    wait_for("the requested rotation", Duration::from_secs(3), || async {
        env.token("acme-scim-token").await.filter(|t| *t != before)
    })
    .await;
    assert!(took.elapsed() < Duration::from_secs(3));
    env.assert_log_clean().await;
}

#[tokio::test]
async fn a_forged_issue_record_is_caught_and_never_reported() {
    let env = Env::new("forged").await;
    let op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let (ok, _, err) = env.apply(&directory("globex", "  tokenExpiresIn: 90d\n"));
    assert!(ok, "{err}");
    env.wait_ready_reason("globex", "TokenIssued").await;
    let first = env.token("globex-scim-token").await.unwrap();

    // An expiry pushed into the far future: re-issued with a Warning, the forged date never in status.
    let forged = json!({ "metadata": { "annotations": { "scim.tokenops.dev/expires-at": "2099-01-01T00:00:00Z" } } });
    env.secrets().patch("globex-scim-token", &PatchParams::default(), &Patch::Merge(forged)).await.unwrap();
    let second = wait_for("re-issue after a forged expiry", Duration::from_secs(30), || async {
        env.token("globex-scim-token").await.filter(|t| *t != first)
    })
    .await;
    wait_for("RecordTampered warning", Duration::from_secs(30), || async {
        env.events_for("globex")
            .await
            .into_iter()
            .find(|e| e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("RecordTampered"))
    })
    .await;

    // An issue time in the future (expiry consistent with it): caught too.
    let future = json!({ "metadata": { "annotations": {
        "scim.tokenops.dev/issued-at": "2098-10-04T00:00:00Z",
        "scim.tokenops.dev/expires-at": "2099-01-02T00:00:00Z",
    } } });
    env.secrets().patch("globex-scim-token", &PatchParams::default(), &Patch::Merge(future)).await.unwrap();
    let third = wait_for("re-issue after a future issue time", Duration::from_secs(30), || async {
        env.token("globex-scim-token").await.filter(|t| *t != second)
    })
    .await;
    let d = wait_for("status of the third token", Duration::from_secs(30), || async {
        let d = env.dirs().get("globex").await.ok()?;
        (d.status.as_ref()?.token_hash.as_deref()? == sha256(&third)).then_some(d)
    })
    .await;
    let status = d.status.unwrap();
    let (issued_at, expires_at) = (status.token_issued_at.unwrap().0, status.token_expires_at.unwrap().0);
    assert_eq!(expires_at.as_second() - issued_at.as_second(), 90 * 86_400, "expiry = issue + lifetime");
    assert!(issued_at.as_second() <= k8s_openapi::jiff::Timestamp::now().as_second());
    assert_eq!(issued(&op, "RecordTampered"), 2.0);
    env.assert_log_clean().await;
}

#[tokio::test]
async fn labelled_secrets_of_others_never_enter_the_cache() {
    let env = Env::new("cache").await;
    let op = env.operator(&[]);
    let (ok, _, err) = env.apply(&directory("acme", "  {}\n"));
    assert!(ok, "{err}");
    env.wait_ready_reason("acme", "TokenIssued").await;
    let series = format!("scim_token_operator_cached_secrets{{scope=\"{}\"}}", env.ns);
    wait_for("the directory's Secret in the cache", Duration::from_secs(10), || async {
        (metric(&op, &series) == 1.0).then_some(())
    })
    .await;

    // Four ~1 MiB Secrets carrying the operator's label, without a directory's controller reference.
    let payload = "x".repeat(1000 * 1000);
    for i in 0..4 {
        let big: Secret = serde_json::from_value(json!({
            "metadata": { "name": format!("big-{i}"), "labels": { "app.kubernetes.io/managed-by": "scim-token-operator" } },
            "stringData": { "token": payload, "other": "x" },
        }))
        .unwrap();
        env.secrets().create(&PostParams::default(), &big).await.unwrap();
    }
    // And our own Secret stripped of its controller reference: evicted, it is no longer ours.
    let (ok, _, err) = env.apply(&directory("initech", "  {}\n"));
    assert!(ok, "{err}");
    env.wait_ready_reason("initech", "TokenIssued").await;
    wait_for("two directory Secrets cached", Duration::from_secs(10), || async {
        (metric(&op, &series) == 2.0).then_some(())
    })
    .await;
    let orphan = json!({ "metadata": { "ownerReferences": null } });
    env.secrets().patch("initech-scim-token", &PatchParams::default(), &Patch::Merge(orphan)).await.unwrap();
    wait_for("the orphaned Secret evicted", Duration::from_secs(10), || async {
        (metric(&op, &series) == 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(metric(&op, &series), 1.0, "only the directory-controlled Secret is cached");
    env.assert_log_clean().await;
}

#[tokio::test]
async fn a_refused_secret_write_reaches_the_status() {
    let env = Env::new("refused").await;
    let _op = env.operator(&[]);

    // Annotations the API server refuses (over 256 KiB in all): the Secret is created without the
    // template, then applying the template fails with 422. (Created through the API: `kubectl apply`
    // would copy the spec into an annotation of the directory, which is refused for the same reason.)
    let oversized: ScimDirectory = serde_json::from_value(json!({
        "apiVersion": "scim.tokenops.dev/v1alpha1", "kind": "ScimDirectory",
        "metadata": { "name": "oversized" },
        "spec": { "secretTemplate": { "annotations": { "note": "y".repeat(300 * 1024) } } },
    }))
    .unwrap();
    env.dirs().create(&PostParams::default(), &oversized).await.unwrap();
    let d = env.wait_ready_reason("oversized", "SecretWriteFailed").await;
    let message = &d.ready_condition().unwrap().message;
    assert_eq!(d.ready_condition().unwrap().status, "False");
    assert!(message.contains("the API server refused to write Secret oversized-scim-token"), "{message}");
    assert!(message.contains("Too long"), "{message}");
    wait_for("SecretWriteFailed warning", Duration::from_secs(30), || async {
        env.events_for("oversized").await.into_iter().find(|e| e.reason.as_deref() == Some("SecretWriteFailed"))
    })
    .await;
    // Fixing the spec repairs it.
    let fix = json!({ "spec": { "secretTemplate": { "annotations": { "note": "short" } } } });
    env.dirs().patch("oversized", &PatchParams::default(), &Patch::Merge(fix)).await.unwrap();
    wait_for("Ready after the fix", Duration::from_secs(60), || async {
        let d = env.dirs().get("oversized").await.ok()?;
        (d.ready_condition()?.status == "True").then_some(())
    })
    .await;

    // A rotation of a Secret someone made immutable.
    let (ok, _, err) = env.apply(&directory("frozen", "  {}\n"));
    assert!(ok, "{err}");
    env.wait_ready_reason("frozen", "TokenIssued").await;
    let token = env.token("frozen-scim-token").await.unwrap();
    let freeze = json!({ "immutable": true });
    env.secrets().patch("frozen-scim-token", &PatchParams::default(), &Patch::Merge(freeze)).await.unwrap();
    let (ok, _, err) = env.apply(&directory("frozen", "  rotationGeneration: 1\n"));
    assert!(ok, "{err}");
    let d = env.wait_ready_reason("frozen", "SecretWriteFailed").await;
    let message = &d.ready_condition().unwrap().message;
    assert!(message.contains("immutable"), "{message}");
    assert!(!message.contains(&token[5..]));
    assert_eq!(
        d.status.unwrap().token_hash.as_deref(),
        Some(sha256(&token).as_str()),
        "status still names the token in the Secret"
    );
    assert_eq!(env.token("frozen-scim-token").await.unwrap(), token);
    env.assert_log_clean().await;
}
