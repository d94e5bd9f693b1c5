//! The real SCIM stack around the verifier: **Debian's nginx** gating **PyPI's scim2-server** with
//! `auth_request` to the verifier (tests/peers/nginx.conf.template), over plain HTTP or over TLS with
//! a given certificate (e.g. one the Graph double's CA issued, so the double calls it as Entra does).
//!
//! `hack/test-peers.sh` installs nginx and the Python tools into the cache (or fails saying what is
//! missing). Routing: nginx's `location /<tenant>/` requires the token of one ScimDirectory
//! (`X-Scim-Expected-Directory: <ns>/<name>` to the verifier) and forwards to scim2-server's tenant
//! `<tenant>`; so a directory's SCIM base address is `<scheme>://127.0.0.1:<port>/<tenant>/v2`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::{Env, Verifier, free_port, wait_for};

pub const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");

/// Paths printed by hack/test-peers.sh (NGINX, SCIM2_SERVER, SCIM, PYTHON, ENVOY, ...).
pub fn peers() -> BTreeMap<String, String> {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/test-peers.sh"))
        .output()
        .expect("run hack/test-peers.sh");
    assert!(
        out.status.success(),
        "hack/test-peers.sh could not provide nginx and the SCIM tools:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A child process killed (and reaped) on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with stdout and stderr into `log`.
pub fn start(mut cmd: Command, log: &Path) -> Process {
    let log = std::fs::File::create(log).unwrap();
    Process(cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("start a peer"))
}

pub async fn wait_port(port: u16, what: &str) {
    wait_for(what, Duration::from_secs(30), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .await;
}

/// A fresh scratch directory `<target tmp>/<prefix>-<namespace>` for this test's peers.
pub fn scratch(env: &Env, prefix: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{}", env.ns));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// scim2-server with no token of its own (the proxy is the only gate) and one store per tenant;
/// --debug logs each request's headers (to `dir/scim2-server.log`), so a test sees what reached it.
/// Its environment is emptied: the debug log prints that too.
pub async fn scim2_server(peers: &BTreeMap<String, String>, dir: &Path, tenants: &[&str]) -> (Process, u16) {
    let port = free_port();
    let mut server = Command::new(&peers["SCIM2_SERVER"]);
    server.args(["--hostname", "127.0.0.1", "--port", &port.to_string()]);
    for tenant in tenants {
        server.args(["--tenant", tenant]);
    }
    server.arg("--debug").env_clear().env("PATH", "/usr/bin:/bin");
    let process = start(server, &dir.join("scim2-server.log"));
    wait_port(port, "scim2-server").await;
    (process, port)
}

/// nginx's TLS material: a certificate (chain) and its key, PEM files.
pub struct Tls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// The proven configuration (tests/peers/nginx.conf.template) filled for `prefix`, listening on
/// 127.0.0.1:`listen` (with TLS when given), each `(tenant, directory)` route bound to ScimDirectory
/// `ns/directory` and served by scim2-server's tenant `tenant`.
pub fn nginx_config(
    prefix: &Path,
    listen: u16,
    tls: Option<&Tls<'_>>,
    verifier: u16,
    scim: u16,
    ns: &str,
    routes: &[(&str, &str)],
) -> String {
    let tenant = std::fs::read_to_string(format!("{PEERS}/tenant-location.conf.template")).unwrap();
    let locations: String = routes
        .iter()
        .map(|(t, d)| {
            tenant.replace("{{TENANT}}", t).replace("{{DIRECTORY_NAMESPACE}}", ns).replace("{{DIRECTORY_NAME}}", d)
        })
        .collect();
    let (listen, tls) = match tls {
        Some(tls) => (
            format!("127.0.0.1:{listen} ssl"),
            format!(
                "        ssl_certificate {};\n        ssl_certificate_key {};\n",
                tls.cert.display(),
                tls.key.display()
            ),
        ),
        None => (format!("127.0.0.1:{listen}"), String::new()),
    };
    let config = std::fs::read_to_string(format!("{PEERS}/nginx.conf.template"))
        .unwrap()
        .replace("{{PREFIX}}", prefix.to_str().unwrap())
        .replace("{{LISTEN}}", &listen)
        .replace("{{TLS}}", &tls)
        .replace("{{VERIFIER}}", &format!("127.0.0.1:{verifier}"))
        .replace("{{SCIM_SERVER}}", &format!("127.0.0.1:{scim}"))
        .replace("{{TENANT_LOCATIONS}}", &locations);
    assert!(!config.contains("{{"), "every placeholder filled");
    config
}

/// Writes `config` to `prefix/nginx.conf` and runs nginx in the foreground from that prefix (logs:
/// `prefix/error.log`, `prefix/access.log`, `prefix/nginx.out`); waits for its port.
pub async fn nginx(peers: &BTreeMap<String, String>, prefix: &Path, config: &str, port: u16) -> Process {
    std::fs::write(prefix.join("nginx.conf"), config).unwrap();
    let mut nginx = Command::new(&peers["NGINX"]);
    nginx.arg("-p").arg(format!("{}/", prefix.display())).arg("-c").arg(prefix.join("nginx.conf"));
    nginx.arg("-e").arg(prefix.join("error.log"));
    let process = start(nginx, &prefix.join("nginx.out"));
    wait_port(port, "nginx").await;
    process
}

/// The verifier (watching the test's namespace) + nginx + scim2-server, one route per directory.
/// Dropped: all three stop.
pub struct ScimStack {
    pub verifier: Verifier,
    /// nginx's prefix and scim2-server's log: `dir/nginx.conf`, `access.log`, `error.log`,
    /// `nginx.out`, `scim2-server.log`.
    pub dir: PathBuf,
    pub nginx_port: u16,
    pub scim_port: u16,
    https: bool,
    _nginx: Process,
    _server: Process,
}

impl ScimStack {
    /// Starts the three for `directories` of `env`'s namespace: each directory's route is
    /// `/<directory name>/`, served by a scim2-server tenant of the same name (a ScimDirectory name
    /// is a DNS label: a valid tenant, never `v2`). With `tls`, nginx serves HTTPS with that
    /// certificate. Waits until the verifier is ready and nginx listens.
    pub async fn start(env: &Env, dir: &Path, tls: Option<Tls<'_>>, directories: &[&str]) -> ScimStack {
        ScimStack::start_with(env, dir, tls, directories, &[]).await
    }

    /// [`ScimStack::start`] with extra environment for the verifier (e.g. `VERIFY_STRIP_AUTHORIZATION`).
    pub async fn start_with(
        env: &Env,
        dir: &Path,
        tls: Option<Tls<'_>>,
        directories: &[&str],
        verifier_env: &[(&str, &str)],
    ) -> ScimStack {
        let peers = peers();
        std::fs::create_dir_all(dir).unwrap();
        let verifier = env.verifier_with(verifier_env);
        let (server, scim_port) = scim2_server(&peers, dir, directories).await;
        let routes: Vec<(&str, &str)> = directories.iter().map(|d| (*d, *d)).collect();
        let nginx_port = free_port();
        let config = nginx_config(dir, nginx_port, tls.as_ref(), verifier.port, scim_port, &env.ns, &routes);
        let nginx = nginx(&peers, dir, &config, nginx_port).await;
        verifier.wait_ready().await;
        ScimStack {
            verifier,
            dir: dir.to_owned(),
            nginx_port,
            scim_port,
            https: tls.is_some(),
            _nginx: nginx,
            _server: server,
        }
    }

    /// The SCIM base address of `directory` (Entra's "Tenant URL", the BaseAddress secret):
    /// `https://127.0.0.1:<nginx port>/<directory>/v2` (http without TLS).
    pub fn base_address(&self, directory: &str) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{directory}/v2", self.nginx_port)
    }

    /// `GET <base address>/Users` through nginx with `token` as the bearer token; the status. Over
    /// HTTPS `client` must trust nginx's certificate (e.g. `GraphDouble::client_config()`); `None`
    /// for plain HTTP.
    pub async fn users_status(
        &self,
        client: Option<std::sync::Arc<rustls::ClientConfig>>,
        directory: &str,
        token: &str,
    ) -> u16 {
        let authorization = format!("Bearer {token}");
        match client {
            Some(client) => {
                let url = format!("{}/Users", self.base_address(directory));
                let headers = [("authorization", authorization.as_str())];
                let request = super::graph::tls::Request { method: "GET", url: &url, headers: &headers, body: None };
                super::graph::tls::send(client, request, Duration::from_secs(10)).await.expect("nginx answers").status
            }
            None => {
                let path = format!("/{directory}/v2/Users");
                super::http_request(self.nginx_port, "GET", &path, &[("Authorization", &authorization)])
                    .expect("nginx answers")
                    .status
            }
        }
    }

    /// The logs of nginx and scim2-server, concatenated (for a test's "no token in any log").
    pub fn logs(&self) -> String {
        ["access.log", "error.log", "nginx.out", "scim2-server.log"]
            .iter()
            .map(|log| std::fs::read_to_string(self.dir.join(log)).unwrap_or_default())
            .collect()
    }
}
