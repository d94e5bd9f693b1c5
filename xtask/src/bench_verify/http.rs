//! The HTTP side: a small keep-alive client for the checks between load runs, the one-by-one sweep
//! of every token, oha (the HTTP load generator of the published numbers), and nginx `auth_request`
//! in front of the verifier against the same nginx without auth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use scim_token_operator::token::Token;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::NS;
use super::load::{LoadGen, Run, only, printed};
use super::procs::Guard;

/// A minimal HTTP/1.1 keep-alive client for the checks between load runs (one request at a time).
pub(super) struct Http {
    port: u16,
    conn: Option<BufReader<tokio::net::TcpStream>>,
}

pub(super) struct Answer {
    pub status: u16,
    headers: Vec<(String, String)>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl Http {
    pub fn new(port: u16) -> Http {
        Http { port, conn: None }
    }

    pub async fn verify(&mut self, token: &str, expected: Option<&str>) -> anyhow::Result<Answer> {
        let mut request = format!("GET /verify HTTP/1.1\r\nHost: verifier\r\nAuthorization: Bearer {token}\r\n");
        if let Some(expected) = expected {
            request.push_str(&format!("X-Scim-Expected-Directory: {expected}\r\n"));
        }
        request.push_str("\r\n");
        // One retry on a fresh connection: a kept-alive one may have been closed by the server.
        match self.exchange(&request).await {
            Ok(answer) => Ok(answer),
            Err(_) => {
                self.conn = None;
                self.exchange(&request).await
            }
        }
    }

    async fn exchange(&mut self, request: &str) -> anyhow::Result<Answer> {
        if self.conn.is_none() {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.set_nodelay(true)?;
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().expect("connected");
        conn.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        ensure!(conn.read_line(&mut line).await? > 0, "connection closed");
        let status: u16 = line.split_whitespace().nth(1).context("no status")?.parse()?;
        let mut headers = vec![];
        loop {
            line.clear();
            ensure!(conn.read_line(&mut line).await? > 0, "connection closed in the headers");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').context("malformed header")?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let answer = Answer { status, headers };
        let length: usize = answer.header("content-length").map(str::parse).transpose()?.unwrap_or(0);
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await?;
        if answer.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            self.conn = None;
        }
        Ok(answer)
    }
}

pub(super) struct Sweep {
    pub allowed: usize,
    pub refused: usize,
}

/// Every token, bound to its own directory: 200 naming it; as many unknown tokens: 401.
pub(super) async fn sweep(port: u16, tokens: &BTreeMap<String, String>) -> anyhow::Result<Sweep> {
    let mut http = Http::new(port);
    let mut sweep = Sweep { allowed: 0, refused: 0 };
    for (name, token) in tokens {
        let a = http.verify(token, Some(&format!("{NS}/{name}"))).await?;
        ensure!(
            a.status == 200
                && a.header("x-scim-directory-namespace") == Some(NS)
                && a.header("x-scim-directory-name") == Some(name.as_str()),
            "{name}'s token: {} {:?}",
            a.status,
            a.headers
        );
        sweep.allowed += 1;
    }
    for _ in 0..tokens.len() {
        let a = http.verify(Token::generate().expose(), None).await?;
        ensure!(a.status == 401, "an unknown token got {}", a.status);
        sweep.refused += 1;
    }
    Ok(sweep)
}

/// nginx from the e2e test's template: `/auth/` is a tenant location (auth_request → the verifier,
/// bound to the first directory), `/plain/` the same proxying without auth; the floor is upstream.
pub(super) fn start_nginx(
    root: &Path,
    nginx: &Path,
    prefix: &Path,
    port: u16,
    verifier_port: u16,
    floor_port: u16,
    connections: usize,
) -> anyhow::Result<Guard<Child>> {
    std::fs::create_dir_all(prefix)?;
    let peers = root.join("tests/peers");
    let tenant = std::fs::read_to_string(peers.join("tenant-location.conf.template"))?
        .replace("{{TENANT}}", "auth")
        .replace("{{DIRECTORY_NAMESPACE}}", NS)
        .replace("{{DIRECTORY_NAME}}", "tenant-00000");
    let plain = r#"
        # The benchmark's comparison: the same proxying to the same upstream, without auth_request.
        location /plain/ {
            proxy_pass http://scim_backend/plain/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header Authorization "";
        }
"#;
    let prefix_str = prefix.to_str().context("non-UTF-8 path")?;
    let mut conf = std::fs::read_to_string(peers.join("nginx.conf.template"))?
        .replace("{{PREFIX}}", prefix_str)
        .replace("{{LISTEN}}", &format!("127.0.0.1:{port}"))
        .replace("{{TLS}}", "")
        .replace("{{VERIFIER}}", &format!("127.0.0.1:{verifier_port}"))
        .replace("{{SCIM_SERVER}}", &format!("127.0.0.1:{floor_port}"))
        .replace("{{TENANT_LOCATIONS}}", &(tenant + plain));
    // Three changes for a load run, each required to apply (a changed template fails here instead of
    // silently benchmarking another config): no access log (a disk write per request, the same on
    // both routes), enough client connections, and as many idle upstream connections kept alive as
    // the load generator opens, so that neither route reconnects to its upstream per request.
    for (from, to) in [
        (format!("access_log {prefix_str}/access.log combined;"), "access_log off;".to_owned()),
        ("worker_connections 256;".to_owned(), "worker_connections 4096;".to_owned()),
        ("keepalive 8;".to_owned(), format!("keepalive {};", connections.max(8))),
    ] {
        ensure!(conf.contains(&from), "tests/peers/nginx.conf.template no longer has `{from}`");
        conf = conf.replace(&from, &to);
    }
    ensure!(!conf.contains("{{"), "an unfilled placeholder is left in the nginx config");
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(format!("{prefix_str}/"))
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", nginx.display()))?;
    Ok(Guard(child))
}

/// oha (`hack/oha.sh`): `connections` keep-alive connections, one request in flight on each.
pub(super) struct Oha {
    pub bin: PathBuf,
    pub duration: Duration,
    pub connections: usize,
}

impl LoadGen for Oha {
    /// Open loop (`rate`) with `--latency-correction`: a stalled server is charged for the requests it
    /// delayed.
    fn run(&self, what: &str, url: &str, token: &str, rate: Option<f64>, want: u16) -> anyhow::Result<Run> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--no-tui", "--output-format", "json"])
            .args(["-z", &format!("{}s", self.duration.as_secs())])
            .args(["-c", &self.connections.to_string()])
            .args(["-H", &format!("Authorization: Bearer {token}")]);
        if let Some(rate) = rate {
            cmd.args(["-q", &format!("{rate}"), "--latency-correction"]);
        }
        let out = cmd.arg(url).stderr(Stdio::inherit()).output().context("running oha")?;
        ensure!(out.status.success(), "oha failed on {what}");
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("oha's JSON for {what}"))?;
        let statuses: BTreeMap<String, u64> = serde_json::from_value(v["statusCodeDistribution"].clone())?;
        let errors: BTreeMap<String, u64> = serde_json::from_value(v["errorDistribution"].clone())?;
        let responses = only(what, &statuses, want)?;
        // No error but the requests in flight when the run's time was up.
        ensure!(errors.keys().all(|e| e.contains("deadline")), "{what}: errors {errors:?}");
        let seconds = |key: &str| -> anyhow::Result<Duration> {
            let s = v["latencyPercentiles"][key].as_f64().with_context(|| format!("no {key} in oha's JSON"))?;
            Ok(Duration::from_secs_f64(s))
        };
        let run = Run {
            rps: responses as f64 / v["summary"]["total"].as_f64().context("no summary.total")?,
            p50: seconds("p50")?,
            p99: seconds("p99")?,
            responses,
        };
        Ok(printed(run, what, rate, want))
    }
}

/// nginx `auth_request` → verifier against the same nginx proxying without auth (the floor upstream).
pub(super) struct NginxRuns {
    pub plain_peak: Run,
    pub auth_peak: Run,
    pub auth_unknown: Run,
    /// Half of auth's peak (requests/s), the rate of the two runs below.
    pub half: f64,
    pub plain_half: Run,
    pub auth_half: Run,
}

pub(super) fn nginx_runs(load: &dyn LoadGen, port: u16, valid: &str, unknown: &str) -> anyhow::Result<NginxRuns> {
    let plain = format!("http://127.0.0.1:{port}/plain/v2/Users");
    let auth = format!("http://127.0.0.1:{port}/auth/v2/Users");
    let plain_peak = load.run("nginx without auth, peak", &plain, valid, None, 200)?;
    let auth_peak = load.run("nginx auth_request, peak", &auth, valid, None, 200)?;
    let auth_unknown = load.run("nginx auth_request, unknown token, peak", &auth, unknown, None, 401)?;
    let half = (auth_peak.rps / 2.0).round().max(1.0);
    let plain_half = load.run("nginx without auth, half of auth's peak", &plain, valid, Some(half), 200)?;
    let auth_half = load.run("nginx auth_request, half of its peak", &auth, valid, Some(half), 200)?;
    Ok(NginxRuns { plain_peak, auth_peak, auth_unknown, half, plain_half, auth_half })
}
