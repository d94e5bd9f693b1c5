//! Shared pieces of the end-to-end suite: the real control plane, the real operator binary as a child
//! process, and polling helpers. Every test works in a namespace of its own.
#![allow(dead_code)]

pub mod graph;
pub mod scim_stack;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use envtest::ControlPlane;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams};
use scim_token_operator::api::ScimDirectory;

pub const BIN: &str = env!("CARGO_BIN_EXE_scim-token-operator");

/// Every token the suite has seen in a Secret, to search the operator logs for at the end.
pub static SEEN_TOKENS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub struct Env {
    pub cp: &'static ControlPlane,
    pub client: Client,
    pub ns: String,
    pub log: PathBuf,
}

impl Env {
    pub async fn new(prefix: &str) -> Env {
        let cp = ControlPlane::shared();
        let client = cp.client().await;
        let ns = cp.create_namespace(prefix).await.expect("namespace");
        let log = fresh_log(&ns);
        Env { cp, client, ns, log }
    }

    pub fn dirs(&self) -> Api<ScimDirectory> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Starts the operator binary against the test control plane, watching only this namespace.
    pub fn operator(&self, extra_env: &[(&str, &str)]) -> Operator {
        Operator::start(self, extra_env)
    }

    /// `kubectl ... -n <ns>`; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.cp.kubectl().args(args).args(["-n", &self.ns]).output().expect("run kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kubectl apply -f -` of a manifest given as a string.
    pub fn apply(&self, manifest: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child = self
            .cp
            .kubectl()
            .args(["apply", "-n", &self.ns, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub async fn events_for(&self, name: &str) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    /// Waits until the directory's Ready condition has the given reason; returns the directory.
    pub async fn wait_ready_reason(&self, name: &str, reason: &str) -> ScimDirectory {
        let dirs = self.dirs();
        wait_for(&format!("{name} Ready reason {reason}"), Duration::from_secs(60), || async {
            let d = dirs.get_opt(name).await.ok().flatten()?;
            (d.ready_condition()?.reason == reason).then_some(d)
        })
        .await
    }

    /// Records every token now in this namespace's Secrets, then searches this test's operator log for
    /// every token the suite has seen: a plaintext token must never be logged.
    pub async fn assert_log_clean(&self) {
        for s in self.secrets().list(&Default::default()).await.unwrap() {
            if let Some(t) = s.data.and_then(|d| d.get("token").cloned()) {
                SEEN_TOKENS.lock().unwrap().insert(String::from_utf8_lossy(&t.0).into_owned());
            }
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(text.contains("starting controller"), "{} holds the operator's output", self.log.display());
        let tokens = SEEN_TOKENS.lock().unwrap().clone();
        for token in tokens.iter().filter(|t| t.len() > 20) {
            assert!(!text.contains(&token[5..]), "a plaintext token appeared in {}", self.log.display());
        }
    }

    /// The token in a Secret (recorded for the log scan).
    pub async fn token(&self, secret: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.unwrap()?;
        let bytes = s.data?.get("token")?.0.clone();
        let token = String::from_utf8(bytes).unwrap();
        SEEN_TOKENS.lock().unwrap().insert(token.clone());
        Some(token)
    }
}

/// Polls `f` every 100 ms until it returns Some, or panics after `timeout`.
/// Name of the record key Secret the operator creates in its namespace (the test namespace: every
/// test's operator runs with `--lease-namespace` = its namespace).
pub const RECORD_KEY_SECRET: &str = scim_token_operator::secret::seal::DEFAULT_KEY_SECRET;

impl Env {
    /// The operator's record key, as a test with the cluster admin's rights reads it.
    pub async fn record_key(&self) -> scim_token_operator::secret::RecordKey {
        let secret = self.secrets().get(RECORD_KEY_SECRET).await.expect("the operator created its record key");
        let bytes = &secret.data.as_ref().and_then(|d| d.get("key")).expect("data.key").0;
        scim_token_operator::secret::RecordKey::from_bytes(bytes).unwrap()
    }

    /// Rewrites the issue record on directory `name`'s Secret and seals it with the operator's key:
    /// the suite's test-only way to move a token through time (a tenant, who cannot read the key, can
    /// only write an unsealed record, which the operator does not believe).
    pub async fn rewrite_record(&self, name: &str, change: impl FnOnce(&mut scim_token_operator::policy::IssueRecord)) {
        use scim_token_operator::policy::RecordState;
        use scim_token_operator::secret;
        let dir = self.dirs().get(name).await.unwrap();
        let stored = self.secrets().get(&dir.secret_name()).await.unwrap();
        let RecordState::Valid(mut record) = secret::read_record(stored.metadata.annotations.as_ref().unwrap()) else {
            panic!("{name}'s Secret has no readable record")
        };
        change(&mut record);
        let annotations = secret::record_annotations(&dir, &record, &self.record_key().await);
        let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
        self.secrets()
            .patch(&dir.secret_name(), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(patch))
            .await
            .unwrap();
    }

    /// Back-dates directory `name`'s token (of `lifetime` seconds) so that it expires `in_secs` from
    /// now; returns that instant.
    pub async fn backdate(&self, name: &str, lifetime: i64, in_secs: i64) -> k8s_openapi::jiff::Timestamp {
        use k8s_openapi::jiff::Timestamp;
        let soon = Timestamp::from_second(Timestamp::now().as_second() + in_secs).unwrap();
        let issued = Timestamp::from_second(soon.as_second() - lifetime).unwrap();
        self.rewrite_record(name, |record| {
            record.issued_at = issued;
            record.expires_at = Some(soon);
        })
        .await;
        soon
    }
}

pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn sha256(token: &str) -> String {
    scim_token_operator::token::TokenHash::of_bytes(token.as_bytes()).to_string()
}

pub fn logs_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The operator log for namespace `ns`, emptied: namespace names repeat from one run of a test binary
/// to the next, and a previous run's lines must not be searched (or blamed) again.
pub fn fresh_log(ns: &str) -> PathBuf {
    let log = logs_dir().join(format!("{ns}.log"));
    let _ = std::fs::remove_file(&log);
    log
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The operator binary running as a child process; killed on drop. Its stdout and stderr are appended
/// to the namespace's log file, which the suite later searches for plaintext tokens.
pub struct Operator {
    child: Child,
    pub metrics_port: u16,
}

impl Operator {
    fn start(env: &Env, extra_env: &[(&str, &str)]) -> Operator {
        let log = OpenOptions::new().create(true).append(true).open(&env.log).unwrap();
        let metrics_port = free_port();
        let child = Command::new(BIN)
            .args(["run", "--namespace", &env.ns, "--lease-namespace", &env.ns])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("KUBECONFIG", env.cp.kubeconfig_path())
            .env("RUST_LOG", "debug,kube=info,hyper=info,tower=info,rustls=info,h2=info")
            .envs(extra_env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the operator");
        Operator { child, metrics_port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself (for failpoints).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for("operator exit", timeout, || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
    }

    /// SIGTERM, then wait for a graceful exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// GET /metrics over plain HTTP/1.0 (no client dependency needed for one request).
    pub fn metrics(&self) -> String {
        self.get("/metrics")
    }

    /// GET `path` on the operator's HTTP endpoint; returns the raw response (status line, headers, body).
    pub fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("connect to the operator's endpoint");
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    /// Starts the operator binary with an explicit kubeconfig, arguments (e.g. a Deployment's container
    /// args) and environment (e.g. its env with the downward-API values filled in), appending its output
    /// to `log`. `--metrics-addr 127.0.0.1:<free port>` is added after `args`.
    pub fn start_with_kubeconfig(
        kubeconfig: &Path,
        args: &[String],
        envs: &[(String, String)],
        log: &Path,
    ) -> Operator {
        let log = OpenOptions::new().create(true).append(true).open(log).unwrap();
        let metrics_port = free_port();
        let child = Command::new(BIN)
            .args(args)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "debug,kube=info,hyper=info,tower=info,rustls=info,h2=info")
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the operator");
        Operator { child, metrics_port }
    }
}

/// `scim-token-operator verify` as a child process, watching the test's namespace; killed on drop.
/// Its output goes to the namespace's log, which the suite searches for plaintext tokens.
pub struct Verifier {
    child: Child,
    /// HTTP external auth (`/verify`).
    pub port: u16,
    /// gRPC (Envoy's ext_authz and gRPC health).
    pub grpc_port: u16,
    pub metrics_port: u16,
}

impl Env {
    pub fn verifier(&self) -> Verifier {
        self.verifier_with(&[])
    }

    pub fn verifier_with(&self, extra_env: &[(&str, &str)]) -> Verifier {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let (port, grpc_port, metrics_port) = (free_port(), free_port(), free_port());
        let child = Command::new(BIN)
            .args(["verify", "--namespace", &self.ns])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .env("KUBECONFIG", self.cp.kubeconfig_path())
            .env("RUST_LOG", "debug,kube=info,hyper=info,tower=info,rustls=info,h2=info")
            .envs(extra_env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the verifier");
        Verifier { child, port, grpc_port, metrics_port }
    }
}

impl Verifier {
    /// Waits until /readyz says the index holds the initial list.
    pub async fn wait_ready(&self) {
        wait_for("the verifier to be ready", Duration::from_secs(30), || async {
            http_request(self.metrics_port, "GET", "/readyz", &[]).filter(|r| r.status == 200).map(|_| ())
        })
        .await
    }

    pub fn verify(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_request(self.port, "GET", path, headers).expect("the verifier answers")
    }

    /// `/verify` with `token` as the bearer token.
    pub fn check(&self, token: &str) -> HttpResponse {
        self.verify("/verify", &[("Authorization", &format!("Bearer {token}"))])
    }

    /// Waits until `token` gets `status` from the verifier; returns how long that took.
    pub async fn wait_status(&self, token: &str, status: u16, what: &str) -> Duration {
        let started = Instant::now();
        wait_for(what, Duration::from_secs(30), || async { (self.check(token).status == status).then_some(()) }).await;
        started.elapsed()
    }

    pub fn metrics(&self) -> String {
        http_request(self.metrics_port, "GET", "/metrics", &[]).map(|r| r.body).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.0 request to 127.0.0.1:`port` (no client library needed); `None` if nothing listens.
pub fn http_request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<HttpResponse> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(HttpResponse { status, headers, body: body.to_owned() })
}
