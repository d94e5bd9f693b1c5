//! The verifier (`scim-token-operator verify`) on a real kube-apiserver + etcd, next to the operator:
//! it authenticates by token hash, follows rotations within a second, honours overlap windows and
//! their early end, binds tokens to their directory, and refuses expired tokens at the instant.

mod support;

use std::time::Duration;

use kube::api::DeleteParams;
use scim_token_operator::token::Token;
use support::{Env, sha256, wait_for};

fn directory(name: &str, spec: &str) -> String {
    format!("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The token that replaces `old` in `secret`.
async fn next_token(env: &Env, secret: &str, old: &str) -> String {
    wait_for("a new token", Duration::from_secs(30), || async { env.token(secret).await.filter(|t| t != old) }).await
}

#[tokio::test]
async fn the_verifier_authenticates_by_hash_and_follows_rotations() {
    let env = Env::new("verify").await;
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let v = env.verifier();
    for (name, spec) in [("acme", "  tokenExpiresIn: 90d\n"), ("globex", "  rotationOverlap: 8s\n")] {
        let (ok, _, err) = env.apply(&directory(name, spec));
        assert!(ok, "{err}");
        env.wait_ready_reason(name, "TokenIssued").await;
    }
    v.wait_ready().await;
    let acme = env.token("acme-scim-token").await.unwrap();
    let globex = env.token("globex-scim-token").await.unwrap();
    v.wait_status(&acme, 200, "acme's token accepted").await;
    v.wait_status(&globex, 200, "globex's token accepted").await;

    // Allowed: the directory is named for the proxy to pass upstream; never cached.
    let ok = v.check(&acme);
    assert_eq!(ok.header("x-scim-directory-namespace"), Some(env.ns.as_str()));
    assert_eq!(ok.header("x-scim-directory-name"), Some("acme"));
    assert_eq!(ok.header("cache-control"), Some("no-store"));
    // Any path below /verify and any method (Envoy's HTTP mode appends the original request's).
    let below = v.verify("/verify/scim/v2/Users?filter=x", &[("Authorization", &bearer(&acme))]);
    assert_eq!(below.status, 200);
    let post = support::http_request(v.port, "POST", "/verify/scim/v2/Users", &[("Authorization", &bearer(&acme))]);
    assert_eq!(post.unwrap().status, 200);

    // Refused: 401 with an RFC 6750 challenge, whatever is wrong; never 5xx.
    let stranger = Token::generate();
    // acme's token with its last character changed (to 'x', or 'y' where it already was 'x').
    let last = if acme.ends_with('x') { 'y' } else { 'x' };
    let altered = format!("Bearer {}{last}", &acme[..acme.len() - 1]);
    for (headers, fragment) in [
        (vec![("Authorization", bearer(stranger.expose()))], r#"error="invalid_token""#),
        (vec![("Authorization", format!("Basic {}", "dXNlcjpwYXNz"))], r#"error="invalid_token""#),
        (vec![("Authorization", altered)], r#"error="invalid_token""#),
        (vec![("Authorization", "Bearer ".to_owned() + &"a".repeat(5000))], r#"error="invalid_token""#),
        (vec![], r#"Bearer realm="scim""#),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = v.verify("/verify", &headers);
        assert_eq!(r.status, 401, "{headers:?}");
        assert!(r.header("www-authenticate").is_some_and(|c| c.contains(fragment)), "{headers:?}: {r:?}");
        assert_eq!(r.header("x-scim-directory-name"), None);
    }

    // Tenant binding: a valid token on another directory's route is 403, by query or by header.
    let other = format!("/verify?directory={}/globex", env.ns);
    assert_eq!(v.verify(&other, &[("Authorization", &bearer(&acme))]).status, 403);
    let own = format!("{}/acme", env.ns);
    assert_eq!(
        v.verify("/verify", &[("Authorization", &bearer(&acme)), ("X-Scim-Expected-Directory", &own)]).status,
        200
    );
    let theirs = format!("{}/globex", env.ns);
    let r = v.verify("/verify", &[("Authorization", &bearer(&acme)), ("X-Scim-Expected-Directory", &theirs)]);
    assert_eq!(r.status, 403);
    assert!(r.header("www-authenticate").unwrap().contains("insufficient_scope"));
    assert_eq!(v.verify("/verify?directory=garbage", &[("Authorization", &bearer(&acme))]).status, 401);

    // Rotation without an overlap: the old token is refused within a second of the new one's issue.
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "acme", "scim.tokenops.dev/rotate=r1"]);
    assert!(ok, "{err}");
    let acme2 = next_token(&env, "acme-scim-token", &acme).await;
    let took = v.wait_status(&acme, 401, "the rotated-out token refused").await;
    assert!(took < Duration::from_secs(1), "old token refused {took:?} after the new one was written");
    assert_eq!(v.check(&acme2).status, 200);

    // Rotation with an overlap: both work until its end, then only the new one.
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "globex", "scim.tokenops.dev/rotate=r1"]);
    assert!(ok, "{err}");
    let globex2 = next_token(&env, "globex-scim-token", &globex).await;
    let d = wait_for("the overlap in status", Duration::from_secs(30), || async {
        let d = env.dirs().get("globex").await.ok()?;
        (d.status.as_ref()?.token_hash.as_deref()? == sha256(&globex2)).then_some(d)
    })
    .await;
    let status = d.status.unwrap();
    assert_eq!(status.previous_token_hash.as_deref(), Some(sha256(&globex).as_str()));
    let until = status.previous_token_valid_until.unwrap().0;
    v.wait_status(&globex2, 200, "the new token accepted").await;
    assert_eq!(v.check(&globex).status, 200, "the previous token works during the overlap");
    let series = format!(
        "scim_token_verifier_token_last_used_timestamp_seconds{{namespace=\"{}\",name=\"globex\",token=\"previous\"}}",
        env.ns
    );
    assert!(v.metrics().contains(&series), "the previous token's use is visible");
    v.wait_status(&globex, 401, "the previous token refused at the end of the overlap").await;
    let now = k8s_openapi::jiff::Timestamp::now();
    assert!(now >= until, "refused only once the window is over ({now} < {until})");
    assert_eq!(v.check(&globex2).status, 200);
    // Then the status forgets the previous token (the operator wakes at the end of the window).
    wait_for("the ended overlap gone from the status", Duration::from_secs(30), || async {
        let status = env.dirs().get("globex").await.ok()?.status?;
        (status.previous_token_hash.is_none() && status.previous_token_valid_until.is_none()).then_some(())
    })
    .await;
    assert_eq!(v.check(&globex).status, 401, "still refused once unknown");

    // Ending an overlap early: the previous token is refused at once, and the status says so.
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "globex", "scim.tokenops.dev/rotate=r2", "--overwrite"]);
    assert!(ok, "{err}");
    let globex3 = next_token(&env, "globex-scim-token", &globex2).await;
    v.wait_status(&globex3, 200, "the third token accepted").await;
    assert_eq!(v.check(&globex2).status, 200, "an overlap is open");
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "globex", "scim.tokenops.dev/end-overlap=now"]);
    assert!(ok, "{err}");
    v.wait_status(&globex2, 401, "the previous token refused after the early end").await;
    let d = env.dirs().get("globex").await.unwrap();
    assert_eq!(d.status.as_ref().unwrap().previous_token_hash, None);
    assert_eq!(env.token("globex-scim-token").await.unwrap(), globex3, "ending an overlap never rotates");
    wait_for("OverlapEnded event", Duration::from_secs(30), || async {
        env.events_for("globex").await.into_iter().find(|e| e.reason.as_deref() == Some("OverlapEnded"))
    })
    .await;

    // A repair never opens an overlap, even with rotationOverlap set: a possibly leaked token dies at once.
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "globex", "scim.tokenops.dev/rotate=r3", "--overwrite"]);
    assert!(ok, "{err}");
    let globex4 = next_token(&env, "globex-scim-token", &globex3).await;
    v.wait_status(&globex4, 200, "the fourth token accepted").await;
    env.secrets().delete("globex-scim-token", &DeleteParams::default()).await.unwrap();
    let globex5 = next_token(&env, "globex-scim-token", &globex4).await;
    v.wait_status(&globex5, 200, "the repaired token accepted").await;
    assert_eq!(v.check(&globex4).status, 401, "the token before the repair is refused");
    assert_eq!(v.check(&globex3).status, 401, "and so is the one before it");

    // Expiry at the instant: the record is back-dated so that acme's token expires in 3 s.
    use k8s_openapi::jiff::Timestamp;
    let soon = env.backdate("acme", 90 * 86_400, 3).await;
    v.wait_status(&acme2, 401, "the expired token refused").await;
    assert!(Timestamp::now() >= soon, "not refused before its expiry");
    assert!(v.check(&acme2).header("www-authenticate").unwrap().contains("expired"));

    let metrics = v.metrics();
    for result in ["allowed", "unknown", "malformed", "missing", "expired", "wrong_directory"] {
        assert!(metrics.contains(&format!("scim_token_verifier_requests_total{{result=\"{result}\"}}")), "{result}");
    }
    env.assert_log_clean().await;
}

/// A listen address that cannot be had stops the verifier with a message naming it: a verifier
/// serving HTTP but not gRPC (or the reverse) would look alive to half of its proxies.
#[tokio::test]
async fn a_port_that_cannot_be_had_stops_the_verifier() {
    let env = Env::new("verify-port").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for (flag, other) in [("--grpc-listen", "--listen"), ("--listen", "--grpc-listen")] {
        let out = std::process::Command::new(support::BIN)
            .args(["verify", "--namespace", &env.ns, "--metrics-addr", "127.0.0.1:0"])
            .args([flag, &format!("127.0.0.1:{port}"), other, "127.0.0.1:0"])
            .env("KUBECONFIG", env.cp.kubeconfig_path())
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run the verifier");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} on a taken port: the verifier must exit; {stderr}");
        assert!(stderr.contains(&format!("cannot listen on {flag} 127.0.0.1:{port}")), "{stderr}");
    }
}
