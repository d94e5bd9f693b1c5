//! A stateful test double of Microsoft Graph's synchronization API (a service principal's SCIM
//! provisioning credentials and job) and of the Microsoft identity platform's token endpoint, on
//! 127.0.0.1 over TLS with a test CA generated at start.
//!
//! It follows the published contract kept with the project's shared specs (Microsoft Graph v1.0
//! metadata excerpt `msgraph-synchronization.csdl.xml` and the REST calls of its README): property and
//! enum names, the calls and their answers, Graph's error JSON. It has never been run against a real
//! tenant. Where the tests need behaviour the contract does not describe, the double's choice is said
//! where it is made and in docs/entra-double.md: the provisioning cycle's interval, when a job goes
//! into quarantine, the error code of a failed credential test, which request Entra sends to the SCIM
//! endpoint.
//!
//! It runs on its own thread and runtime, so a test that blocks its own runtime cannot stall it. It
//! logs method, path and status only (to `graph-double.log` in its directory), never a body, a query
//! or a token.

mod routes;
mod state;
pub mod tls;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

// Re-exported for the tests; a test binary that uses none of them must not warn.
#[allow(unused_imports)]
pub use routes::{ACCESS_TOKEN_PREFIX, CREDENTIAL_FAILURE, GRAPH_SCOPE, JWT_BEARER, UNREACHABLE};
#[allow(unused_imports)]
pub use state::{AppCredential, Call, CallRecord, Execution, ExecutionKind, Fault};
use state::{Job, ServicePrincipal, State};

/// Successive failed cycles after which a job goes into quarantine. Microsoft documents only "most
/// or all calls consistently fail"; three is the double's choice.
pub const QUARANTINE_AFTER: i64 = 3;

/// What the server tasks share with the test's handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Trusts only the test CA: the double calls SCIM endpoints whose certificate that CA issued.
    client: Arc<rustls::ClientConfig>,
    log: Mutex<File>,
}

impl Shared {
    fn record(&self, record: CallRecord) {
        let line = format!("graph-double: {} {} -> {}\n", record.method, record.path, record.status);
        let _ = self.log.lock().unwrap().write_all(line.as_bytes());
        self.state.lock().unwrap().calls.push(record);
    }

    fn execution(&self, sp_id: &str, execution: Execution) {
        let line = format!(
            "graph-double: {:?} of {sp_id} -> SCIM {}\n",
            execution.kind,
            execution.scim_status.map(|s| s.to_string()).unwrap_or_else(|| "unreachable".to_owned())
        );
        let _ = self.log.lock().unwrap().write_all(line.as_bytes());
        if let Some(sp) = self.state.lock().unwrap().sps.get_mut(sp_id) {
            sp.executions.push(execution);
        }
    }
}

pub struct GraphDouble {
    shared: Arc<Shared>,
    ca: tls::TestCa,
    dir: PathBuf,
    graph_port: u16,
    authority_port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GraphDouble {
    /// Generates the test CA (written to `dir/graph-ca.pem`), binds Graph and the token endpoint on
    /// two loopback ports, and serves them until dropped.
    pub async fn start(dir: &Path) -> GraphDouble {
        std::fs::create_dir_all(dir).unwrap();
        let ca = tls::TestCa::generate();
        std::fs::write(dir.join("graph-ca.pem"), &ca.pem).unwrap();
        let log = OpenOptions::new().create(true).append(true).open(dir.join("graph-double.log")).unwrap();
        let shared =
            Arc::new(Shared { state: Mutex::new(State::default()), client: ca.client_config(), log: Mutex::new(log) });
        let graph = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (graph_port, authority_port) = (graph.local_addr().unwrap().port(), authority.local_addr().unwrap().port());
        graph.set_nonblocking(true).unwrap();
        authority.set_nonblocking(true).unwrap();
        let server_config = ca.server_config();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("graph-double".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
                    let graph = tokio::net::TcpListener::from_std(graph).unwrap();
                    let authority = tokio::net::TcpListener::from_std(authority).unwrap();
                    let _ = ready.send(());
                    tokio::select! {
                        _ = serve(graph, acceptor.clone(), thread_shared.clone(), routes::Listener::Graph) => {}
                        _ = serve(authority, acceptor, thread_shared.clone(), routes::Listener::Authority) => {}
                        _ = cycle_loop(thread_shared) => {}
                        _ = stopped => {}
                    }
                });
            })
            .unwrap();
        is_ready.await.unwrap();
        GraphDouble {
            shared,
            ca,
            dir: dir.to_owned(),
            graph_port,
            authority_port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `https://127.0.0.1:PORT` (the operator's `--graph-endpoint`; calls go to `{this}/v1.0/...`).
    pub fn graph_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.graph_port)
    }

    /// `https://127.0.0.1:PORT/` (the operator's `--entra-authority-host`; the token endpoint is
    /// `{this}{tenant}/oauth2/v2.0/token`).
    pub fn authority_host(&self) -> String {
        format!("https://127.0.0.1:{}/", self.authority_port)
    }

    /// `{authority_host}{tenant}/oauth2/v2.0/token`.
    pub fn token_endpoint(&self, tenant: &str) -> String {
        format!("{}{tenant}/oauth2/v2.0/token", self.authority_host())
    }

    /// The test CA (PEM): trust root for both endpoints, and issuer of [`GraphDouble::issue_server_cert`].
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("graph-ca.pem")
    }

    /// Where the double logs method, path and status of each call (never a body or a token).
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("graph-double.log")
    }

    /// A rustls client configuration trusting only the test CA (for tests that call the double or
    /// a SCIM endpoint with a certificate it issued).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.ca.client_config()
    }

    /// Writes a certificate and key for 127.0.0.1 and localhost signed by the test CA into
    /// `dir/server.crt` and `dir/server.key` (e.g. for nginx's TLS); returns (cert, key).
    pub fn issue_server_cert(&self, dir: &Path) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let (cert, key, _, _) = self.ca.server_cert();
        let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        (cert_path, key_path)
    }

    /// Registers an application (a client id in `tenant`) and how it authenticates.
    pub fn add_app(&self, tenant: &str, client_id: &str, credential: AppCredential) {
        self.state().apps.insert((tenant.to_owned(), client_id.to_owned()), credential);
    }

    /// Grants an application `Synchronization.ReadWrite.All` in its tenant: every service principal
    /// there, not only those it owns.
    pub fn grant_tenant_wide(&self, tenant: &str, client_id: &str) {
        self.state().tenant_wide.insert((tenant.to_owned(), client_id.to_owned()));
    }

    /// A service principal with one synchronization job and no saved credentials, owned by
    /// `owner_client_id` (which may then call Graph on it, as `Application.ReadWrite.OwnedBy` allows).
    pub fn add_service_principal(&self, tenant: &str, sp_id: &str, job_id: &str, owner_client_id: &str) {
        let job = Job {
            id: job_id.to_owned(),
            paused: false,
            last_execution: None,
            last_successful_execution: None,
            successive_failures: 0,
            quarantine: None,
            quarantine_next: false,
            steady_first: None,
            steady_last: None,
            next_cycle: None,
        };
        let sp = ServicePrincipal {
            tenant: tenant.to_owned(),
            owner_client_id: owner_client_id.to_owned(),
            job,
            secrets: Vec::new(),
            puts: Vec::new(),
            executions: Vec::new(),
        };
        self.state().sps.insert(sp_id.to_owned(), sp);
    }

    /// Saves credentials as an administrator would in the portal (the state before the operator
    /// takes over); not counted in [`GraphDouble::puts`].
    pub fn seed_credentials(&self, sp_id: &str, base_address: &str, token: &str) {
        self.sp_mut(sp_id, |sp| {
            sp.secrets =
                vec![("BaseAddress".to_owned(), base_address.to_owned()), ("SecretToken".to_owned(), token.to_owned())]
        });
    }

    /// The next matching call(s) answer the fault (see [`Fault`]).
    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    /// The job goes into quarantine (reason `QuarantinedOnDemand`) on its next provisioning cycle,
    /// whatever the SCIM endpoint answers.
    pub fn quarantine_next_runs(&self, sp_id: &str) {
        self.sp_mut(sp_id, |sp| sp.job.quarantine_next = true);
    }

    /// Entra's provisioning cycle: every `every` (off until called), each job with saved
    /// credentials, neither paused nor in quarantine, calls its SCIM endpoint with them and records
    /// `lastExecution` / `lastSuccessfulExecution`. Entra's real interval is about 40 minutes and a
    /// quarantined job's about a day; a quarantined job here waits for a restart.
    pub fn set_cycle(&self, every: Duration) {
        let mut state = self.state();
        state.cycle = Some(every);
        for sp in state.sps.values_mut() {
            sp.job.next_cycle = Some(Instant::now() + every);
        }
    }

    /// Stops the provisioning cycle.
    pub fn stop_cycle(&self) {
        self.state().cycle = None;
    }

    /// Runs the job's next cycle now (if the cycle is on).
    pub fn cycle_now(&self, sp_id: &str) {
        self.sp_mut(sp_id, |sp| sp.job.next_cycle = Some(Instant::now()));
    }

    /// Access tokens issued from now on are valid for `lifetime` only (the answer still says
    /// `expires_in: 3599`, as a revoked or early-expired token would).
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.state().access_token_lifetime = Some(lifetime);
    }

    /// Every access token issued so far is refused from now on (401).
    pub fn expire_access_tokens(&self) {
        let now = Instant::now();
        for token in self.state().access_tokens.values_mut() {
            token.expires = now;
        }
    }

    /// `support::sha256` of the saved SecretToken.
    pub fn saved_token_sha256(&self, sp_id: &str) -> Option<String> {
        self.sp(sp_id, |sp| sp.secret("SecretToken").map(crate::support::sha256))
    }

    pub fn saved_base_address(&self, sp_id: &str) -> Option<String> {
        self.sp(sp_id, |sp| sp.secret("BaseAddress").map(str::to_owned))
    }

    /// Every call so far, in order: call, method, path, status, time, client id. No body, no token.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.state().calls.clone()
    }

    /// `support::sha256` of each SecretToken PUT on `sp_id`, in order (every PUT that took effect).
    pub fn puts(&self, sp_id: &str) -> Vec<String> {
        self.sp(sp_id, |sp| sp.puts.clone())
    }

    /// Every request the double made to `sp_id`'s SCIM endpoint (validations and cycles), in order.
    pub fn executions(&self, sp_id: &str) -> Vec<Execution> {
        self.sp(sp_id, |sp| sp.executions.clone())
    }

    /// The job's `synchronizationStatus`, as `GET .../jobs` returns it.
    pub fn job_status(&self, sp_id: &str) -> Value {
        self.sp(sp_id, |sp| sp.status_json())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    fn sp<T>(&self, sp_id: &str, f: impl FnOnce(&ServicePrincipal) -> T) -> T {
        f(self.state().sps.get(sp_id).unwrap_or_else(|| panic!("no service principal {sp_id} in the double")))
    }

    fn sp_mut<T>(&self, sp_id: &str, f: impl FnOnce(&mut ServicePrincipal) -> T) -> T {
        f(self.state().sps.get_mut(sp_id).unwrap_or_else(|| panic!("no service principal {sp_id} in the double")))
    }
}

impl Drop for GraphDouble {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts TLS connections and serves HTTP/1.1 on each, one task per connection.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    kind: routes::Listener,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
                return;
            };
            let service = hyper::service::service_fn(move |request| routes::handle(shared.clone(), kind, request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Runs due provisioning cycles (see [`GraphDouble::set_cycle`]), one job at a time.
async fn cycle_loop(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let due: Vec<(String, String, String, bool)> = {
            let mut state = shared.state.lock().unwrap();
            let Some(every) = state.cycle else { continue };
            let now = Instant::now();
            state
                .sps
                .iter_mut()
                .filter_map(|(id, sp)| {
                    let job = &mut sp.job;
                    let next = *job.next_cycle.get_or_insert(now + every);
                    if next > now || job.paused || job.quarantine.is_some() {
                        return None;
                    }
                    let base = sp.secret("BaseAddress")?.to_owned();
                    let token = sp.secret("SecretToken")?.to_owned();
                    let job = &mut sp.job;
                    job.next_cycle = Some(now + every);
                    Some((id.clone(), base, token, std::mem::take(&mut job.quarantine_next)))
                })
                .collect()
        };
        for (sp_id, base, token, quarantine_now) in due {
            routes::run_cycle(&shared, &sp_id, base, token, quarantine_now).await;
        }
    }
}
