//! The verifier (`scim-token-operator verify`, a real process on a real kube-apiserver) holds up
//! against clients that do not play along: connections that trickle a request head or send nothing
//! are closed after the header read timeout while others are answered, an idle keep-alive
//! connection is not mistaken for one, connections past `--max-connections` are closed at once, an
//! oversized request head is refused, and so is an oversized gRPC message. And a replica whose watch
//! keeps failing stops calling itself ready once `--max-staleness` has passed, and is ready again
//! once the watch recovers.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use scim_token_operator::token::Token;
use serde_json::{Value, json};
use support::{Env, Verifier, http_request, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a test waits for the verifier to close a connection: far past every timeout it is given,
/// so a connection still open then was never going to be closed.
const NEVER: Duration = Duration::from_secs(30);

/// A directory whose status names `token` as its current one (the status written directly: the
/// verifier reads nothing else).
async fn directory_with(env: &Env, name: &str, token: &Token) {
    let dir: scim_token_operator::api::ScimDirectory = serde_json::from_value(json!({
        "apiVersion": "scim.tokenops.dev/v1alpha1", "kind": "ScimDirectory",
        "metadata": { "name": name }, "spec": {},
    }))
    .unwrap();
    env.dirs().create(&PostParams::default(), &dir).await.expect("create the directory");
    let status = json!({ "status": { "tokenHash": token.hash().to_string() } });
    env.dirs().patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("patch its status");
}

fn bearer(token: &Token) -> String {
    format!("Bearer {}", token.expose())
}

/// One HTTP/1.1 keep-alive request on `stream`; the status and whether the server keeps it open.
fn exchange(stream: &mut TcpStream, token: &Token) -> std::io::Result<u16> {
    let request = format!("GET /verify HTTP/1.1\r\nHost: verifier\r\nAuthorization: {}\r\n\r\n", bearer(token));
    stream.write_all(request.as_bytes())?;
    // The answers carry no body (Content-Length: 0): read up to the end of the head.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.to_ascii_lowercase().contains("content-length: 0"), "{head}");
    Ok(head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0))
}

fn metric(v: &Verifier, series: &str) -> Option<f64> {
    v.metrics().lines().find(|l| l.starts_with(series))?.split_whitespace().last()?.parse().ok()
}

#[tokio::test]
async fn slow_clients_are_closed_while_others_are_answered() {
    let env = Env::new("vlimits-slow").await;
    let token = Token::generate();
    directory_with(&env, "acme", &token).await;
    let v = env.verifier_with(&[("VERIFY_HEADER_READ_TIMEOUT", "1s"), ("VERIFY_IDLE_TIMEOUT", "60s")]);
    v.wait_ready().await;
    wait_for("acme's token accepted", Duration::from_secs(30), || async {
        (v.verify("/verify", &[("Authorization", &bearer(&token))]).status == 200).then_some(())
    })
    .await;

    // 20 clients trickling a request head a byte every 200 ms, and 5 that send nothing at all.
    let mut slow = vec![];
    for i in 0..25 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", v.port)).await.unwrap();
        let trickle = i < 20;
        slow.push(tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            let writer = async {
                if !trickle {
                    return std::future::pending::<()>().await;
                }
                let _ = write.write_all(b"GET /verify HTTP/1.1\r\nHost: x\r\n").await;
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if write.write_all(b"X").await.is_err() {
                        return std::future::pending().await;
                    }
                }
            };
            let mut buf = [0u8; 1024];
            let reader = async {
                loop {
                    match tokio::time::timeout(NEVER, read.read(&mut buf)).await {
                        Err(_) => return false,
                        Ok(Ok(0) | Err(_)) => return true,
                        Ok(Ok(_)) => continue,
                    }
                }
            };
            tokio::select! {
                closed = reader => closed,
                () = writer => unreachable!(),
            }
        }));
    }
    // Meanwhile a keep-alive client is answered, also after an idle pause longer than the header
    // timeout (an idle keep-alive connection is not a slow client).
    let mut kept = TcpStream::connect(("127.0.0.1", v.port)).unwrap();
    kept.set_read_timeout(Some(NEVER)).unwrap();
    assert_eq!(exchange(&mut kept, &token).unwrap(), 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(exchange(&mut kept, &token).unwrap(), 200, "the idle keep-alive connection still answers");

    let mut closed = 0;
    for task in slow {
        closed += usize::from(task.await.unwrap());
    }
    assert_eq!(closed, 25, "every slow or silent connection closed by the verifier");
    // And answering still.
    assert_eq!(v.verify("/verify", &[("Authorization", &bearer(&token))]).status, 200);
    assert_eq!(exchange(&mut kept, &token).unwrap(), 200);
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let env = Env::new("vlimits-head").await;
    let v = env.verifier();
    v.wait_ready().await;
    let huge = "a".repeat(64 * 1024);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", v.port)).await.unwrap();
    let request = format!("GET /verify HTTP/1.1\r\nHost: x\r\nX-Padding: {huge}\r\nAuthorization: Bearer x\r\n\r\n");
    // The server may stop reading (and close) before all of it is written.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(NEVER, stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split(' ').nth(1).unwrap_or("");
    assert!(status == "431" || answer.is_empty(), "expected 431 or a closed connection, got {answer:?}");
    // Many headers: the same.
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = http_request(v.port, "GET", "/verify", &[("X-Many", &format!("v\r\n{many}X-Last: v"))]);
    assert!(r.as_ref().is_none_or(|r| r.status == 431), "{r:?}");
    // A normal request is answered.
    assert_eq!(v.verify("/verify", &[]).status, 401);
}

#[tokio::test]
async fn connections_past_the_bound_are_closed() {
    let env = Env::new("vlimits-conns").await;
    let token = Token::generate();
    directory_with(&env, "acme", &token).await;
    let v = env.verifier_with(&[("VERIFY_MAX_CONNECTIONS", "4")]);
    v.wait_ready().await;
    // Four keep-alive connections, each answered (so each is accepted and held).
    let mut held = vec![];
    for _ in 0..4 {
        let mut stream = TcpStream::connect(("127.0.0.1", v.port)).unwrap();
        stream.set_read_timeout(Some(NEVER)).unwrap();
        wait_for("an answer", Duration::from_secs(30), || {
            let status = exchange(&mut stream, &token).ok();
            async move { status.filter(|s| *s == 200) }
        })
        .await;
        held.push(stream);
    }
    // A fifth is closed without an answer.
    let mut fifth = tokio::net::TcpStream::connect(("127.0.0.1", v.port)).await.unwrap();
    let _ = fifth
        .write_all(format!("GET /verify HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n", bearer(&token)).as_bytes())
        .await;
    let mut answer = Vec::new();
    let closed = matches!(tokio::time::timeout(NEVER, fifth.read_to_end(&mut answer)).await, Ok(Ok(_) | Err(_)));
    assert!(
        closed && answer.is_empty(),
        "the fifth connection is closed unanswered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(metric(&v, "scim_token_verifier_connections_refused_total{listener=\"http\"}").is_some_and(|n| n >= 1.0));
    // The held ones still answer; one closed, a new connection is answered again.
    for stream in &mut held {
        assert_eq!(exchange(stream, &token).unwrap(), 200);
    }
    drop(held.pop());
    wait_for("a slot freed", Duration::from_secs(30), || async {
        http_request(v.port, "GET", "/verify", &[("Authorization", &bearer(&token))]).filter(|r| r.status == 200)
    })
    .await;
}

fn check_request(authorization: &str, padding: usize) -> CheckRequest {
    let mut headers = std::collections::HashMap::from([("authorization".to_owned(), authorization.to_owned())]);
    if padding > 0 {
        headers.insert("x-padding".into(), "a".repeat(padding));
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest { headers, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn an_oversized_grpc_message_is_refused() {
    let env = Env::new("vlimits-grpc").await;
    let token = Token::generate();
    directory_with(&env, "acme", &token).await;
    let v = env.verifier();
    v.wait_ready().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", v.grpc_port))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC listener");
    let mut client = AuthorizationClient::new(channel);
    let ok =
        wait_for("acme's token accepted over gRPC", Duration::from_secs(30), || {
            let mut client = client.clone();
            let request = check_request(&bearer(&token), 0);
            async move {
                client.check(request).await.ok().filter(|r| r.get_ref().status.as_ref().is_some_and(|s| s.code == 0))
            }
        })
        .await;
    assert_eq!(ok.into_inner().status.unwrap().code, 0);
    // 1 MiB of headers: far past any real request, far below tonic's default limit (4 MiB).
    let err = client.check(check_request(&bearer(&token), 1024 * 1024)).await.expect_err("an oversized Check refused");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
    // The connection and the service carry on.
    let again = client.check(check_request(&bearer(&token), 1024)).await.expect("a normal Check");
    assert_eq!(again.into_inner().status.unwrap().code, 0);
}

#[tokio::test]
async fn grpc_connections_are_bounded_and_a_silent_one_is_closed() {
    let env = Env::new("vlimits-grpcconn").await;
    let token = Token::generate();
    directory_with(&env, "acme", &token).await;
    let v = env.verifier_with(&[("VERIFY_MAX_CONNECTIONS", "2"), ("VERIFY_HEADER_READ_TIMEOUT", "1s")]);
    v.wait_ready().await;
    let url = format!("http://127.0.0.1:{}", v.grpc_port);
    let channel = || async { tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await };
    // A connection that never sends the HTTP/2 preface is closed.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", v.grpc_port)).await.unwrap();
    let mut buf = Vec::new();
    let closed = matches!(tokio::time::timeout(NEVER, silent.read_to_end(&mut buf)).await, Ok(Ok(_) | Err(_)));
    assert!(closed, "a connection without a preface is closed by the verifier");
    // Two connections, each answering a Check.
    let mut held = vec![];
    for _ in 0..2 {
        let mut client = AuthorizationClient::new(channel().await.expect("connect"));
        let r = client.check(check_request(&bearer(&token), 0)).await.expect("a Check");
        assert_eq!(r.into_inner().status.unwrap().code, 0);
        held.push(client);
    }
    // A third is refused: its Check fails, however the client reports the closed connection.
    let third = match channel().await {
        Ok(c) => AuthorizationClient::new(c).check(check_request(&bearer(&token), 0)).await.err(),
        Err(e) => Some(tonic::Status::unavailable(e.to_string())),
    };
    assert!(third.is_some(), "a third connection over --max-connections 2 is refused");
    assert!(metric(&v, "scim_token_verifier_connections_refused_total{listener=\"grpc\"}").is_some_and(|n| n >= 1.0));
    // The two held ones still answer.
    for client in &mut held {
        let r = client.check(check_request(&bearer(&token), 0)).await.expect("a Check on a held connection");
        assert_eq!(r.into_inner().status.unwrap().code, 0);
    }
}

/// A kubeconfig whose user is the admin impersonating `user`.
fn impersonating_kubeconfig(env: &Env, user: &str, path: &Path) {
    let mut config: Value = serde_yaml::from_str(&std::fs::read_to_string(env.cp.kubeconfig_path()).unwrap()).unwrap();
    for entry in config["users"].as_array_mut().unwrap() {
        entry["user"]["as"] = json!(user);
        entry["user"]["as-groups"] = json!(["system:authenticated"]);
    }
    std::fs::write(path, serde_yaml::to_string(&config).unwrap()).unwrap();
}

fn ready_status(v: &Verifier) -> Option<u16> {
    http_request(v.metrics_port, "GET", "/readyz", &[]).map(|r| r.status)
}

/// The gRPC health service's overall status (what the chart's readiness probe asks).
async fn grpc_health(v: &Verifier) -> Option<i32> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", v.grpc_port)).ok()?;
    let mut client = HealthClient::new(endpoint.connect().await.ok()?);
    let response = client.check(HealthCheckRequest { service: String::new() }).await.ok()?;
    Some(response.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

#[tokio::test]
async fn a_replica_whose_watch_keeps_failing_turns_not_ready_and_recovers() {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let env = Env::new("vlimits-stale").await;
    let token = Token::generate();
    directory_with(&env, "acme", &token).await;
    let user = format!("verifier-{}", env.ns);
    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "verifier" },
        "rules": [{ "apiGroups": ["scim.tokenops.dev"], "resources": ["scimdirectories"], "verbs": ["list", "watch"] }],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "verifier" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "verifier" },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    }))
    .unwrap();
    let roles: Api<Role> = Api::namespaced(env.client.clone(), &env.ns);
    let bindings: Api<RoleBinding> = Api::namespaced(env.client.clone(), &env.ns);
    roles.create(&PostParams::default(), &role).await.unwrap();
    bindings.create(&PostParams::default(), &binding).await.unwrap();
    let kubeconfig = support::logs_dir().join(format!("{}-verifier.kubeconfig", env.ns));
    impersonating_kubeconfig(&env, &user, &kubeconfig);
    let v = env.verifier_with(&[
        ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("VERIFY_MAX_STALENESS", "2s"),
        // Each watch request lasts 2 s: a withdrawn permission is met at the next one.
        ("VERIFY_WATCH_TIMEOUT", "2s"),
    ]);
    v.wait_ready().await;
    let stale = "scim_token_verifier_index_stale ";
    // A quiet watch that works is not stale, however long nothing changes (here: past the limit,
    // across several renewals of the watch).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(ready_status(&v), Some(200));
    assert_eq!(grpc_health(&v).await, Some(SERVING));
    assert_eq!(metric(&v, stale), Some(0.0));
    // (Not "no watch error": a shared API server may fail one request; stale needs 2 s of failing.)

    // Its permission withdrawn: every watch and list now fails with 403.
    bindings.delete("verifier", &DeleteParams::default()).await.unwrap();
    wait_for("/readyz 503", Duration::from_secs(60), || async { (ready_status(&v) == Some(503)).then_some(()) }).await;
    assert_eq!(metric(&v, stale), Some(1.0));
    assert_eq!(grpc_health(&v).await, Some(NOT_SERVING));
    assert!(metric(&v, "scim_token_verifier_watch_errors_total").is_some_and(|n| n >= 1.0));
    assert!(metric(&v, "scim_token_verifier_index_staleness_seconds ").is_some_and(|s| s >= 2.0));
    // Not ready, but still answering from its index (the proxies' Service routes elsewhere meanwhile).
    assert_eq!(v.verify("/verify", &[("Authorization", &bearer(&token))]).status, 200);

    // Restored: ready again.
    bindings.create(&PostParams::default(), &binding).await.unwrap();
    wait_for("/readyz 200 again", Duration::from_secs(60), || async { (ready_status(&v) == Some(200)).then_some(()) })
        .await;
    assert_eq!(metric(&v, stale), Some(0.0));
    assert_eq!(metric(&v, "scim_token_verifier_index_staleness_seconds "), Some(0.0));
    wait_for("gRPC health SERVING again", Duration::from_secs(10), || async {
        (grpc_health(&v).await == Some(SERVING)).then_some(())
    })
    .await;
}
