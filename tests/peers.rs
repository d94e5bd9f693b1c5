//! The whole loop with real parts: the operator issues and rotates tokens on a real control plane, the
//! verifier authenticates by hash, **Debian's nginx** gates **PyPI's scim2-server** with
//! `auth_request`, and **PyPI's scim2-cli / scim2-tester** plays the identity provider.
//!
//! `hack/test-peers.sh` installs nginx and the Python tools into the cache (or fails saying what is
//! missing); tests/peers/ holds the nginx configuration, docs/test-peers.md what was found about them.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scim_token_operator::token::Token;
use support::scim_stack::{self, PEERS, Process, peers, start, wait_port};
use support::{Env, HttpResponse, free_port, http_request, wait_for};

/// scim2-server with tenants tenant-a and tenant-b.
async fn scim2_server(peers: &BTreeMap<String, String>, dir: &Path) -> (Process, u16) {
    scim_stack::scim2_server(peers, dir, &["tenant-a", "tenant-b"]).await
}

/// A fresh scratch directory for this test's peers.
fn scratch(env: &Env) -> PathBuf {
    scim_stack::scratch(env, "peers")
}

/// The directories both proxies route to: acme (tenant-a) with an overlap, globex (tenant-b) expiring.
async fn directories(env: &Env) {
    for (name, spec) in [("acme", "  rotationOverlap: 8s\n"), ("globex", "  tokenExpiresIn: 90d\n")] {
        let (ok, _, err) = env.apply(&format!(
            "apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: {name}\nspec:\n{spec}"
        ));
        assert!(ok, "{err}");
        env.wait_ready_reason(name, "TokenIssued").await;
    }
}

/// Back-dates globex's issue record so that its token expires two seconds from now.
async fn expire_soon(env: &Env) -> k8s_openapi::jiff::Timestamp {
    env.backdate("globex", 90 * 86_400, 2).await
}

/// nginx with the proven configuration: tenant-a bound to directory `ns/acme`, tenant-b to `ns/globex`.
fn nginx_config(prefix: &Path, listen: u16, verifier: u16, scim: u16, ns: &str) -> String {
    let routes = [("tenant-a", "acme"), ("tenant-b", "globex")];
    scim_stack::nginx_config(prefix, listen, None, verifier, scim, ns, &routes)
}

/// `scim -u <url> [args]` (scim2-cli) with the token in its header variable (kept out of `ps`).
fn scim(cli: &str, url: &str, token: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cli)
        .args(["-u", url])
        .args(args)
        .env("SCIM_CLI_HEADERS", format!("Authorization: Bearer {token}"))
        .stdin(Stdio::null())
        .output()
        .expect("run scim2-cli");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn get(port: u16, path: &str, token: &str) -> HttpResponse {
    http_request(port, "GET", path, &[("Authorization", &format!("Bearer {token}"))]).expect("nginx answers")
}

async fn wait_status(port: u16, path: &str, token: &str, status: u16, what: &str) -> Duration {
    let started = Instant::now();
    wait_for(what, Duration::from_secs(30), || async { (get(port, path, token).status == status).then_some(()) }).await;
    started.elapsed()
}

async fn next_token(env: &Env, secret: &str, old: &str) -> String {
    wait_for("a new token", Duration::from_secs(30), || async { env.token(secret).await.filter(|t| t != old) }).await
}

/// Paths that lead from tenant-a's route (or from none) to tenant-b's, or name tenant-b first and
/// lead to tenant-a's, once someone resolves them: dot segments, percent-encoded dots and slashes,
/// backslashes, repeated slashes.
const TRAVERSALS: &[&str] = &[
    "/tenant-a/../tenant-b/v2/Users",
    "/tenant-a/./../tenant-b/v2/Users",
    "/tenant-a/v2/../../tenant-b/v2/Users",
    "/tenant-a/%2e%2e/tenant-b/v2/Users",
    "/tenant-a/%2E%2E/tenant-b/v2/Users",
    "/tenant-a/.%2e/tenant-b/v2/Users",
    "/tenant-a/..%2ftenant-b/v2/Users",
    "/tenant-a/..%2Ftenant-b/v2/Users",
    "/tenant-a/%2e%2e%2ftenant-b/v2/Users",
    "/tenant-a%2f..%2ftenant-b/v2/Users",
    "/tenant-a/..%5ctenant-b/v2/Users",
    "/tenant-a/..\\tenant-b/v2/Users",
    "/tenant-a//../tenant-b/v2/Users",
    "/tenant-a/..//tenant-b/v2/Users",
    "//tenant-b/v2/Users",
    "///tenant-b/v2/Users",
    "/tenant-b/../tenant-a/v2/Users",
    "/tenant-b/%2e%2e/tenant-a/v2/Users",
    "/tenant-b/..%2ftenant-a/v2/Users",
];

/// What a backend that decodes the path and then resolves it itself (backslash as slash, repeated
/// slashes merged, dot segments removed) serves for the path it received.
fn resolved(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let path = path.replace('\\', "/");
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

/// The paths scim2-server received (PATH_INFO, already percent-decoded by WSGI) while `request` ran,
/// read from its debug log.
fn forwarded<T>(server_log: &Path, request: impl FnOnce() -> T) -> (T, Vec<String>) {
    let before = std::fs::metadata(server_log).map(|m| m.len()).unwrap_or(0) as usize;
    let result = request();
    let log = std::fs::read(server_log).unwrap_or_default();
    let new = String::from_utf8_lossy(log.get(before..).unwrap_or_default()).into_owned();
    let paths = new
        .lines()
        .filter_map(|l| l.trim().strip_prefix("'PATH_INFO': '"))
        .map(|l| l.trim_end_matches(',').trim_end_matches('\'').to_owned())
        .collect();
    (result, paths)
}

/// Sends each of [`TRAVERSALS`] exactly as written (a raw HTTP/1.0 request line: no client library
/// normalises it first) with tenant-a's valid token, and asserts that none reaches tenant-b: whatever
/// the proxy forwards to scim2-server names tenant-b neither as its first segment (where scim2-server
/// takes the tenant from) nor once resolved (what a backend that resolves paths serves), and the
/// answer is a refusal (400, 401, 403, or 404 for no route) or comes from scim2-server. Prints each
/// path's status and what scim2-server received.
fn assert_no_traversal(proxy: &str, port: u16, server_log: &Path, token_a: &str) {
    // The log is read right: a plain request is seen as it was sent.
    let (r, paths) = forwarded(server_log, || get(port, "/tenant-a/v2/Users", token_a));
    assert_eq!((r.status, paths), (200, vec!["/tenant-a/v2/Users".to_owned()]));
    let mut failures = Vec::new();
    for &path in TRAVERSALS {
        let (r, paths) = forwarded(server_log, || get(port, path, token_a));
        let into_b =
            |p: &String| p.trim_start_matches('/').starts_with("tenant-b/") || resolved(p).starts_with("/tenant-b/");
        if paths.iter().any(into_b) {
            failures.push(format!(
                "{path}: status {}, reached scim2-server as {paths:?}: tenant-b's, for scim2-server's routing or \
                 for a backend that resolves paths",
                r.status
            ));
        } else if paths.is_empty() && !matches!(r.status, 400 | 401 | 403 | 404) {
            failures.push(format!("{path}: status {}, nothing forwarded", r.status));
        }
        eprintln!("{proxy}: {path} with tenant-a's token: {}, scim2-server received {paths:?}", r.status);
    }
    assert!(failures.is_empty(), "tenant-a's token, paths that lead to tenant-b:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn nginx_gates_a_real_scim_server_and_a_real_scim_client_follows_rotations() {
    let peers = peers();
    let env = Env::new("peers").await;
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let mut verifier = env.verifier();
    directories(&env).await;
    verifier.wait_ready().await;
    let dir = scratch(&env);

    let (_server, scim_port) = scim2_server(&peers, &dir).await;

    let nginx_port = free_port();
    let config = nginx_config(&dir, nginx_port, verifier.port, scim_port, &env.ns);
    let _nginx = scim_stack::nginx(&peers, &dir, &config, nginx_port).await;

    let acme = env.token("acme-scim-token").await.unwrap();
    let globex = env.token("globex-scim-token").await.unwrap();
    let tenant_a = format!("http://127.0.0.1:{nginx_port}/tenant-a/v2");

    // The identity provider's compliance run passes with the current token.
    let (ok, out) = scim(&peers["SCIM"], &tenant_a, &acme, &["test"]);
    assert!(ok, "scim2-tester through nginx with the current token:\n{out}");
    assert!(out.contains("SUCCESS") && !out.contains("ERROR"), "{out}");

    // The SCIM server saw the verified directory, never the token.
    let server_log = std::fs::read_to_string(dir.join("scim2-server.log")).unwrap();
    assert!(
        server_log.contains(&format!("'HTTP_X_SCIM_DIRECTORY_NAMESPACE': '{}'", env.ns)),
        "directory headers upstream"
    );
    assert!(server_log.contains("'HTTP_X_SCIM_DIRECTORY_NAME': 'acme'"));
    assert!(!server_log.contains("HTTP_AUTHORIZATION"), "the token stays at the edge");

    // A wrong token: 401 with one RFC 6750 challenge; scim2-cli reports the authorization failure.
    let wrong = Token::generate();
    let r = get(nginx_port, "/tenant-a/v2/Users", wrong.expose());
    assert_eq!(r.status, 401);
    let challenges: Vec<_> = r.headers.iter().filter(|(k, _)| k == "www-authenticate").collect();
    assert_eq!(challenges.len(), 1, "{r:?}");
    assert!(challenges[0].1.contains("invalid_token"));
    let (ok, out) = scim(&peers["SCIM"], &tenant_a, wrong.expose(), &["query", "user"]);
    assert!(!ok && out.contains("Authorization failure"), "{out}");

    // Tenant binding: acme's token on globex's route is 403; a client cannot claim another directory.
    assert_eq!(get(nginx_port, "/tenant-b/v2/Users", &acme).status, 403);
    let forged = http_request(
        nginx_port,
        "GET",
        "/tenant-b/v2/Users",
        &[("Authorization", &format!("Bearer {acme}")), ("X-Scim-Expected-Directory", &format!("{}/acme", env.ns))],
    )
    .unwrap();
    assert_eq!(forged.status, 403, "the route's binding wins over the client's header");
    assert_eq!(get(nginx_port, "/tenant-b/v2/Users", &globex).status, 200);

    // Path tricks: tenant-a's token never reaches tenant-b's directory by a path that starts on
    // tenant-a's route, and nginx forwards the path it routed and authorized, not the raw one.
    assert_no_traversal("nginx", nginx_port, &dir.join("scim2-server.log"), &acme);
    assert_eq!(
        get(nginx_port, "/tenant-a/../tenant-b/v2/Users", &globex).status,
        200,
        "normalised to tenant-b's route"
    );
    assert_eq!(get(nginx_port, "/tenant-a/v2/../v2/Users", &acme).status, 200, "normalised, then forwarded");
    assert_eq!(get(nginx_port, "/elsewhere/v2/Users", &globex).status, 404, "no unbound route reaches the server");

    // Rotation without an overlap: the old token is refused within a second, the new one works.
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "globex", "scim.tokenops.dev/rotate=r1"]);
    assert!(ok, "{err}");
    let globex2 = next_token(&env, "globex-scim-token", &globex).await;
    let took = wait_status(nginx_port, "/tenant-b/v2/Users", &globex, 401, "old token refused").await;
    assert!(took < Duration::from_secs(1), "refused {took:?} after the rotation");
    assert_eq!(get(nginx_port, "/tenant-b/v2/Users", &globex2).status, 200);

    // Rotation with an overlap: both tokens work until its end, then only the new one.
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "acme", "scim.tokenops.dev/rotate=r1"]);
    assert!(ok, "{err}");
    let acme2 = next_token(&env, "acme-scim-token", &acme).await;
    wait_status(nginx_port, "/tenant-a/v2/Users", &acme2, 200, "the new token through nginx").await;
    let (ok, out) = scim(&peers["SCIM"], &tenant_a, &acme, &["query", "user"]);
    assert!(ok, "the IdP still on the previous token during the overlap: {out}");
    let (ok, out) = scim(&peers["SCIM"], &tenant_a, &acme2, &["query", "user"]);
    assert!(ok, "the IdP switched to the new token: {out}");
    wait_status(nginx_port, "/tenant-a/v2/Users", &acme, 401, "the previous token refused after the overlap").await;
    assert_eq!(get(nginx_port, "/tenant-a/v2/Users", &acme2).status, 200);

    // An expired token: refused from its expiry on.
    let soon = expire_soon(&env).await;
    wait_status(nginx_port, "/tenant-b/v2/Users", &globex2, 401, "the expired token refused").await;
    assert!(k8s_openapi::jiff::Timestamp::now() >= soon);

    // A stopped verifier is a refusal, never an open door.
    verifier.kill();
    let r = get(nginx_port, "/tenant-a/v2/Users", &acme2);
    assert!(r.status >= 500, "nginx fails closed without its verifier: {r:?}");

    // No token in any log: the operator's and the verifier's, nginx's and scim2-server's.
    env.assert_log_clean().await;
    for log in ["access.log", "error.log", "nginx.out", "scim2-server.log"] {
        let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
        for token in [&acme, &acme2, &globex, &globex2] {
            assert!(!text.contains(&token[5..]), "a token in {log}");
        }
    }
}

#[tokio::test]
async fn envoy_ext_authz_over_grpc_gates_the_same_scim_server() {
    let peers = peers();
    let env = Env::new("envoy").await;
    let _op = env.operator(&[("MIN_ISSUE_INTERVAL", "1s")]);
    let mut verifier = env.verifier_with(&[("VERIFY_STRIP_AUTHORIZATION", "true")]);
    directories(&env).await;
    verifier.wait_ready().await;
    let dir = scratch(&env);
    let (_server, scim_port) = scim2_server(&peers, &dir).await;

    let envoy_port = free_port();
    let config = std::fs::read_to_string(format!("{PEERS}/envoy.yaml.template"))
        .unwrap()
        .replace("{{LISTEN}}", &envoy_port.to_string())
        .replace("{{VERIFIER_GRPC}}", &verifier.grpc_port.to_string())
        .replace("{{SCIM_SERVER}}", &scim_port.to_string())
        .replace("{{NAMESPACE}}", &env.ns);
    assert!(!config.contains("{{"), "every placeholder filled");
    std::fs::write(dir.join("envoy.yaml"), config).unwrap();
    let mut envoy = Command::new(&peers["ENVOY"]);
    envoy.arg("-c").arg(dir.join("envoy.yaml")).args(["--disable-hot-restart", "--log-level", "warn"]);
    let _envoy = start(envoy, &dir.join("envoy.log"));
    wait_port(envoy_port, "envoy").await;

    let acme = env.token("acme-scim-token").await.unwrap();
    let globex = env.token("globex-scim-token").await.unwrap();
    let tenant_a = format!("http://127.0.0.1:{envoy_port}/tenant-a/v2");

    // The current token passes (the IdP's client, a real SCIM request), and the SCIM server sees the
    // directory, never the token (the verifier has Envoy strip it), even when the client claims another.
    let (ok, out) = scim(&peers["SCIM"], &tenant_a, &acme, &["query", "user"]);
    assert!(ok, "scim2-cli through Envoy with the current token: {out}");
    let smuggled = http_request(
        envoy_port,
        "GET",
        "/tenant-a/v2/Users",
        &[("Authorization", &format!("Bearer {acme}")), ("X-Scim-Directory-Name", "globex")],
    )
    .unwrap();
    assert_eq!(smuggled.status, 200);
    let server_log = std::fs::read_to_string(dir.join("scim2-server.log")).unwrap();
    assert!(
        server_log.contains(&format!("'HTTP_X_SCIM_DIRECTORY_NAMESPACE': '{}'", env.ns)),
        "directory headers upstream"
    );
    assert!(server_log.contains("'HTTP_X_SCIM_DIRECTORY_NAME': 'acme'"));
    assert!(
        !server_log.contains("'HTTP_X_SCIM_DIRECTORY_NAME': 'globex'"),
        "the verifier's value replaces the client's"
    );
    assert!(!server_log.contains("HTTP_AUTHORIZATION"), "Authorization removed before the backend");

    // Wrong token: 401 with the verifier's challenge and a SCIM error body.
    let wrong = Token::generate();
    let r = get(envoy_port, "/tenant-a/v2/Users", wrong.expose());
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some_and(|c| c.contains("invalid_token")), "{r:?}");
    assert!(r.body.contains("urn:ietf:params:scim:api:messages:2.0:Error"));
    // Another directory's token on a route: 403, whatever header the client adds.
    let r = http_request(
        envoy_port,
        "GET",
        "/tenant-b/v2/Users",
        &[("Authorization", &format!("Bearer {acme}")), ("X-Scim-Expected-Directory", &format!("{}/acme", env.ns))],
    )
    .unwrap();
    assert_eq!(r.status, 403);
    assert!(r.header("www-authenticate").is_some_and(|c| c.contains("insufficient_scope")), "{r:?}");
    assert_eq!(get(envoy_port, "/tenant-b/v2/Users", &globex).status, 200);

    // Path tricks: tenant-a's token never reaches tenant-b's directory by a path that starts on
    // tenant-a's route. Envoy normalises before routing (and rejects escaped slashes), so a path routes
    // as what the backend will serve, and each tenant's route still needs its own token.
    assert_no_traversal("envoy", envoy_port, &dir.join("scim2-server.log"), &acme);
    assert_eq!(
        get(envoy_port, "/tenant-a/../tenant-b/v2/Users", &globex).status,
        200,
        "normalised to tenant-b's route"
    );
    assert_eq!(get(envoy_port, "/tenant-a/v2/../v2/Users", &acme).status, 200, "normalised, then forwarded");

    // Rotation: the old token refused within a second; with an overlap both work until its end.
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "globex", "scim.tokenops.dev/rotate=r1"]);
    assert!(ok, "{err}");
    let globex2 = next_token(&env, "globex-scim-token", &globex).await;
    let took = wait_status(envoy_port, "/tenant-b/v2/Users", &globex, 401, "old token refused").await;
    assert!(took < Duration::from_secs(1), "refused {took:?} after the rotation");
    assert_eq!(get(envoy_port, "/tenant-b/v2/Users", &globex2).status, 200);
    let (ok, _, err) = env.kubectl(&["annotate", "scimdir", "acme", "scim.tokenops.dev/rotate=r1"]);
    assert!(ok, "{err}");
    let acme2 = next_token(&env, "acme-scim-token", &acme).await;
    wait_status(envoy_port, "/tenant-a/v2/Users", &acme2, 200, "the new token through Envoy").await;
    assert_eq!(get(envoy_port, "/tenant-a/v2/Users", &acme).status, 200, "the previous token during the overlap");
    wait_status(envoy_port, "/tenant-a/v2/Users", &acme, 401, "the previous token refused after the overlap").await;

    // Expired: refused from its expiry on.
    let soon = expire_soon(&env).await;
    wait_status(envoy_port, "/tenant-b/v2/Users", &globex2, 401, "the expired token refused").await;
    assert!(k8s_openapi::jiff::Timestamp::now() >= soon);

    // failure_mode_allow is false: a stopped verifier is a refusal (Envoy's 403), never an open door.
    verifier.kill();
    let r = get(envoy_port, "/tenant-a/v2/Users", &acme2);
    assert!(r.status == 403 || r.status >= 500, "Envoy fails closed without its verifier: {r:?}");

    env.assert_log_clean().await;
    for log in ["envoy.log", "scim2-server.log"] {
        let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
        for token in [&acme, &acme2, &globex, &globex2] {
            assert!(!text.contains(&token[5..]), "a token in {log}");
        }
    }
}
