//! What a tenant who may patch their token Secret (the usual `edit` role of a namespace) can do to
//! the issue record, on a real kube-apiserver + etcd with the operator and the verifier running: push
//! the expiry out, revive or plant a previous token, slip in a token of their choosing, lock another
//! tenant out, or cut the Secret loose from its directory. None of it may be believed.

mod support;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use scim_token_operator::token::Token;
use serde_json::json;
use support::{Env, sha256, wait_for};

fn directory(name: &str, spec: &str) -> String {
    format!("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

async fn annotate(env: &Env, secret: &str, annotations: serde_json::Value) {
    let patch = json!({ "metadata": { "annotations": annotations } });
    env.secrets().patch(secret, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
}

/// The token that replaces `old` in `secret`, once the status names it too.
async fn replaced(env: &Env, name: &str, old: &str) -> String {
    wait_for("the tampered record replaced by a new token", Duration::from_secs(30), || async {
        let token = env.token(&format!("{name}-scim-token")).await.filter(|t| t != old)?;
        let status = env.dirs().get(name).await.ok()?.status?;
        (status.token_hash.as_deref()? == sha256(&token)).then_some(token)
    })
    .await
}

fn warnings(events: &[k8s_openapi::api::events::v1::Event], reason: &str) -> usize {
    events.iter().filter(|e| e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(reason)).count()
}

#[tokio::test]
async fn an_issue_record_the_operator_did_not_write_is_never_believed() {
    let env = Env::new("record").await;
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let v = env.verifier();
    for (name, spec) in [
        ("acme", "  tokenExpiresIn: 2h\n"),
        ("globex", "  rotationGeneration: 0\n"),
        ("initech", "  rotationGeneration: 0\n"),
    ] {
        let (ok, _, err) = env.apply(&directory(name, spec));
        assert!(ok, "{err}");
        env.wait_ready_reason(name, "TokenIssued").await;
    }
    v.wait_ready().await;
    let acme = env.token("acme-scim-token").await.unwrap();
    let globex = env.token("globex-scim-token").await.unwrap();
    let initech = env.token("initech-scim-token").await.unwrap();
    for token in [&acme, &globex, &initech] {
        v.wait_status(token, 200, "every first token accepted").await;
    }

    // (a) The issue time moved 50 s ahead (within the clock-skew allowance) with the expiry consistent
    // with it: repeated, the token would never expire. Replaced, and the pushed expiry never shown.
    let issued = env.dirs().get("acme").await.unwrap().status.unwrap().token_issued_at.unwrap().0;
    let ahead = Timestamp::from_second(Timestamp::now().as_second() + 50).unwrap();
    let pushed = Timestamp::from_second(ahead.as_second() + 7200).unwrap();
    annotate(
        &env,
        "acme-scim-token",
        json!({ "scim.tokenops.dev/issued-at": ahead.to_string(), "scim.tokenops.dev/expires-at": pushed.to_string() }),
    )
    .await;
    let acme2 = replaced(&env, "acme", &acme).await;
    let status = env.dirs().get("acme").await.unwrap().status.unwrap();
    assert!(status.token_issued_at.unwrap().0 >= issued && status.token_expires_at.unwrap().0 < pushed);
    v.wait_status(&acme, 401, "the token whose record was pushed out refused").await;
    v.wait_status(&acme2, 200, "its replacement accepted").await;

    // (b) A previous token added to a directory without rotationOverlap: never revived.
    let old = Token::generate();
    let until = Timestamp::from_second(Timestamp::now().as_second() + 3600).unwrap();
    annotate(
        &env,
        "globex-scim-token",
        json!({
            "scim.tokenops.dev/previous-token-hash": old.hash().to_string(),
            "scim.tokenops.dev/previous-valid-until": until.to_string(),
        }),
    )
    .await;
    let globex2 = replaced(&env, "globex", &globex).await;
    assert_eq!(env.dirs().get("globex").await.unwrap().status.unwrap().previous_token_hash, None);
    assert_eq!(v.check(old.expose()).status, 401, "the planted previous token is refused");

    // (c) A token of the tenant's choosing with a matching token-hash: not adopted as if the operator
    // had crashed after writing it.
    let chosen = Token::generate();
    let secret = json!({
        "metadata": { "annotations": { "scim.tokenops.dev/token-hash": chosen.hash().to_string() } },
        "stringData": { "token": chosen.expose() },
    });
    env.secrets().patch("globex-scim-token", &PatchParams::default(), &Patch::Merge(secret)).await.unwrap();
    let globex3 = replaced(&env, "globex", &globex2).await;
    assert_ne!(globex3, chosen.expose());
    assert_eq!(v.check(chosen.expose()).status, 401, "the chosen token is refused");
    v.wait_status(&globex3, 200, "the operator's replacement accepted").await;

    // (d) acme's current hash planted as initech's previous one: acme is never locked out, and
    // initech's record is replaced.
    let acme_hash = sha256(&acme2);
    annotate(
        &env,
        "initech-scim-token",
        json!({ "scim.tokenops.dev/previous-token-hash": acme_hash, "scim.tokenops.dev/previous-valid-until": until.to_string() }),
    )
    .await;
    let _ = replaced(&env, "initech", &initech).await;
    for _ in 0..10 {
        let answer = v.check(&acme2);
        assert_eq!(answer.status, 200, "acme's token keeps working");
        assert_eq!(answer.header("x-scim-directory-name"), Some("acme"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let initech_status = env.dirs().get("initech").await.unwrap().status.unwrap();
    assert_eq!(initech_status.previous_token_hash, None, "the planted hash never reaches the status");

    let events = wait_for("one RecordTampered Warning per tampered directory", Duration::from_secs(30), || async {
        let events = env.events_for("globex").await;
        (warnings(&events, "RecordTampered") >= 1).then_some(())
    });
    events.await;
    for name in ["acme", "initech"] {
        assert!(warnings(&env.events_for(name).await, "RecordTampered") >= 1, "{name}: a Warning says why");
    }
    env.assert_log_clean().await;
}

#[tokio::test]
async fn a_secret_cut_loose_from_its_directory_fails_closed() {
    let env = Env::new("cutloose").await;
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let v = env.verifier();
    let (ok, _, err) = env.apply(&directory("acme", "  rotationGeneration: 0\n"));
    assert!(ok, "{err}");
    env.wait_ready_reason("acme", "TokenIssued").await;
    v.wait_ready().await;
    let token = env.token("acme-scim-token").await.unwrap();
    v.wait_status(&token, 200, "the token accepted").await;

    // The ownerReference stripped: the operator no longer owns the Secret, so it can neither rotate
    // nor revoke that token. The status drops it and the verifier refuses it.
    let strip = json!({ "metadata": { "ownerReferences": null } });
    env.secrets().patch("acme-scim-token", &PatchParams::default(), &Patch::Merge(strip)).await.unwrap();
    let d = env.wait_ready_reason("acme", "SecretConflict").await;
    let status = d.status.unwrap();
    assert_eq!((status.token_hash, status.token_issued_at, status.observed_rotation_generation), (None, None, None));
    v.wait_status(&token, 401, "the token of a Secret the directory no longer owns refused").await;
    assert_eq!(env.token("acme-scim-token").await.as_deref(), Some(token.as_str()), "the foreign Secret untouched");

    // Deleting the orphan lets the directory issue again.
    env.secrets().delete("acme-scim-token", &DeleteParams::default()).await.unwrap();
    let fresh = wait_for("a new token once the orphan is gone", Duration::from_secs(30), || async {
        let d = env.dirs().get("acme").await.ok()?;
        let token = env.token("acme-scim-token").await?;
        (d.ready_condition()?.status == "True" && d.status.as_ref()?.token_hash.as_deref()? == sha256(&token))
            .then_some(token)
    })
    .await;
    assert_ne!(fresh, token);
    v.wait_status(&fresh, 200, "the new token accepted").await;
    assert_eq!(v.check(&token).status, 401);
    env.assert_log_clean().await;
}

#[tokio::test]
async fn unsealed_records_the_status_vouches_for_are_resealed_without_a_new_token() {
    let env = Env::new("reseal").await;
    let mut op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let (ok, _, err) = env.apply(&directory("acme", "  tokenExpiresIn: 90d\n"));
    assert!(ok, "{err}");
    env.wait_ready_reason("acme", "TokenIssued").await;
    let token = env.token("acme-scim-token").await.unwrap();
    let seal_of = || async {
        let secret = env.secrets().get("acme-scim-token").await.unwrap();
        secret.metadata.annotations.unwrap_or_default().get("scim.tokenops.dev/record-seal").cloned()
    };
    let first_seal = seal_of().await.expect("the operator seals what it writes");

    // A record as an operator before seals wrote it (the upgrade path): re-sealed, same token.
    annotate(&env, "acme-scim-token", json!({ "scim.tokenops.dev/record-seal": null })).await;
    let resealed = wait_for("the record re-sealed", Duration::from_secs(30), || async { seal_of().await }).await;
    assert_eq!(resealed, first_seal, "the same key seals the same record the same way");
    assert_eq!(env.token("acme-scim-token").await.unwrap(), token, "no new token");

    // The key lost (or rotated on purpose): delete it and restart. A new key is made and the record
    // re-sealed under it; the token stays.
    op.terminate().await;
    env.secrets().delete(support::RECORD_KEY_SECRET, &DeleteParams::default()).await.unwrap();
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let under_new_key = wait_for("the record re-sealed under the new key", Duration::from_secs(30), || async {
        seal_of().await.filter(|s| *s != first_seal)
    })
    .await;
    assert!(under_new_key.starts_with("v1."), "{under_new_key}");
    assert_eq!(env.token("acme-scim-token").await.unwrap(), token, "a new key costs no token");
    let status = env.dirs().get("acme").await.unwrap().status.unwrap();
    assert_eq!(status.token_hash.as_deref(), Some(sha256(&token).as_str()));
    assert_eq!(warnings(&env.events_for("acme").await, "RecordTampered"), 0);
    env.assert_log_clean().await;
}
