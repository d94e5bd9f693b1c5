//! The load generator of `cargo xtask bench-verify` for Envoy's gRPC authorization service, and for
//! the HTTP endpoint in the test command's `--check` run (so that the test command needs no oha).
//! A closed loop (`--concurrency` requests in flight, each sent when the previous one of its worker
//! was answered) for the peak, or an open loop at `--rate` requests/s for latency at a given load.
//!
//! Open loop: request k is due at `start + k / rate`; a free worker takes the next due request. A
//! request sent late because every worker was still waiting for an answer is charged from the instant
//! it was due, so a stalled server pays for the requests it delayed (no coordinated omission). A
//! worker that was early sleeps, and its request is charged from when it woke: tokio's timer has a
//! 1 ms resolution, and the timer's lateness is the generator's, not the server's. So requests leave
//! in bursts of about rate/1000 per millisecond, the same for the verifier and its floor.
//!
//! gRPC: `envoy.service.auth.v3.Authorization/Check` with the token in the request's HTTP headers,
//! as Envoy sends it, over `--connections` HTTP/2 connections (tonic channels) shared by the workers.
//! HTTP: `GET` on the URL over one HTTP/1.1 keep-alive connection per worker (hyper).
//!
//! usage: verify-load grpc|http URL --token TOKEN --secs S --concurrency C [--connections K] [--rate R]
//!
//! Prints one JSON object: `responses`, `seconds`, `p50`, `p99` (seconds), `statuses` (the HTTP
//! status of each answer; for gRPC the one Envoy gives the client: 200 for OK, else the denied
//! response's) and `errors` (message → count). Timing only: the caller judges the answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttributeRequest};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Grpc,
    Http,
}

struct Args {
    protocol: Protocol,
    url: http::Uri,
    token: String,
    duration: Duration,
    concurrency: usize,
    connections: usize,
    rate: Option<f64>,
}

fn args() -> anyhow::Result<Args> {
    const USAGE: &str =
        "usage: verify-load grpc|http URL --token TOKEN --secs S --concurrency C [--connections K] [--rate R]";
    let mut it = std::env::args().skip(1);
    let protocol = match it.next().as_deref() {
        Some("grpc") => Protocol::Grpc,
        Some("http") => Protocol::Http,
        _ => bail!(USAGE),
    };
    let url: http::Uri = it.next().context(USAGE)?.parse()?;
    let (mut token, mut secs, mut concurrency, mut connections, mut rate) = (None, None, None, 1, None);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--token" => token = Some(value),
            "--secs" => secs = Some(value.parse()?),
            "--concurrency" => concurrency = Some(value.parse()?),
            "--connections" => connections = value.parse()?,
            "--rate" => rate = Some(value.parse::<f64>()?),
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    let args = Args {
        protocol,
        url,
        token: token.context(USAGE)?,
        duration: Duration::from_secs(secs.context(USAGE)?),
        concurrency: concurrency.context(USAGE)?,
        connections,
        rate,
    };
    ensure!(args.concurrency > 0 && args.connections > 0, "--concurrency and --connections must be positive");
    ensure!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    Ok(args)
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
}

/// When requests are due: the shared open-loop schedule, or none (closed loop).
struct Schedule {
    start: Instant,
    end: Instant,
    rate: Option<f64>,
    next: AtomicU64,
}

impl Schedule {
    /// Waits for this worker's next request; returns the instant it is charged from, or `None` when
    /// the run is over.
    async fn next(&self) -> Option<Instant> {
        let Some(rate) = self.rate else {
            let now = Instant::now();
            return (now < self.end).then_some(now);
        };
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let due = self.start + Duration::from_secs_f64(k as f64 / rate);
        if due >= self.end {
            return None;
        }
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
            Some(Instant::now())
        } else {
            Some(due)
        }
    }
}

/// One worker's connection to the server.
enum Client {
    Grpc(AuthorizationClient<Channel>, Box<CheckRequest>),
    Http(Box<HttpConnection>),
}

/// An HTTP/1.1 keep-alive connection, opened again when the server has closed it between two
/// requests (nginx does after 1000 on one connection, announcing it with `Connection: close`), as
/// any HTTP client does: only a request that fails once sent counts as an error.
struct HttpConnection {
    authority: String,
    send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    template: http::Request<()>,
}

impl HttpConnection {
    async fn open(authority: &str, template: http::Request<()>) -> anyhow::Result<HttpConnection> {
        Ok(HttpConnection { authority: authority.to_owned(), send: handshake(authority).await?, template })
    }
}

async fn handshake(authority: &str) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream =
        tokio::net::TcpStream::connect(authority).await.with_context(|| format!("connecting to {authority}"))?;
    stream.set_nodelay(true)?;
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(send)
}

impl Client {
    /// One request; the HTTP status the client would get.
    async fn call(&mut self) -> anyhow::Result<u16> {
        match self {
            Client::Grpc(client, request) => Ok(envoy_status(&client.check((**request).clone()).await?.into_inner())),
            Client::Http(http) => {
                if http.send.ready().await.is_err() {
                    http.send = handshake(&http.authority).await?;
                    http.send.ready().await?;
                }
                let mut request = http::Request::new(Empty::new());
                *request.uri_mut() = http.template.uri().clone();
                *request.headers_mut() = http.template.headers().clone();
                let response = http.send.send_request(request).await?;
                let status = response.status().as_u16();
                response.into_body().collect().await?;
                Ok(status)
            }
        }
    }
}

/// The status Envoy answers the client with: 200 for OK, else the denied response's (403 without
/// one, Envoy's default).
fn envoy_status(response: &CheckResponse) -> u16 {
    if response.status.as_ref().is_none_or(|s| s.code == 0) {
        return 200;
    }
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            denied.status.as_ref().and_then(|s| u16::try_from(s.code).ok()).unwrap_or(403)
        }
        _ => 403,
    }
}

fn check_request(token: &str) -> CheckRequest {
    let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttributeRequest {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/scim/v2/Users".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn connect(args: &Args) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(args.concurrency);
    match args.protocol {
        Protocol::Grpc => {
            let mut channels = vec![];
            for _ in 0..args.connections {
                let endpoint = Endpoint::from(args.url.clone()).tcp_nodelay(true);
                channels.push(endpoint.connect().await.with_context(|| format!("connecting to {}", args.url))?);
            }
            let request = check_request(&args.token);
            for i in 0..args.concurrency {
                let client = AuthorizationClient::new(channels[i % channels.len()].clone());
                clients.push(Client::Grpc(client, Box::new(request.clone())));
            }
        }
        Protocol::Http => {
            let authority = args.url.authority().context("the URL has no host")?.clone();
            let template = http::Request::get(args.url.path_and_query().map_or("/", |p| p.as_str()))
                .header(http::header::HOST, authority.as_str())
                .header(http::header::AUTHORIZATION, format!("Bearer {}", args.token))
                .body(())?;
            for _ in 0..args.concurrency {
                clients.push(Client::Http(Box::new(HttpConnection::open(authority.as_str(), template.clone()).await?)));
            }
        }
    }
    Ok(clients)
}

async fn worker(mut client: Client, schedule: Arc<Schedule>) -> Tally {
    let mut tally = Tally::default();
    while let Some(charged_from) = schedule.next().await {
        match client.call().await {
            Ok(status) => {
                tally.latencies_ns.push(u64::try_from(charged_from.elapsed().as_nanos()).unwrap_or(u64::MAX));
                *tally.statuses.entry(status).or_default() += 1;
            }
            Err(e) => {
                *tally.errors.entry(format!("{e:#}")).or_default() += 1;
                // A request that failed once sent leaves the HTTP/1.1 connection broken; a tonic
                // channel reconnects.
                if matches!(client, Client::Http(..)) {
                    break;
                }
            }
        }
    }
    tally
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let clients = connect(&args).await?;
    let start = Instant::now();
    let schedule = Arc::new(Schedule { start, end: start + args.duration, rate: args.rate, next: AtomicU64::new(0) });
    let workers: Vec<_> = clients.into_iter().map(|c| tokio::spawn(worker(c, schedule.clone()))).collect();
    let mut all = Tally::default();
    for w in workers {
        let t = w.await?;
        all.latencies_ns.extend(t.latencies_ns);
        for (status, n) in t.statuses {
            *all.statuses.entry(status).or_default() += n;
        }
        for (error, n) in t.errors {
            *all.errors.entry(error).or_default() += n;
        }
    }
    // Requests in flight at the end are answered and counted: the run lasts until the last one is.
    let seconds = start.elapsed().as_secs_f64();
    all.latencies_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        let l = &all.latencies_ns;
        if l.is_empty() {
            return 0.0;
        }
        l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1] as f64 / 1e9
    };
    let out = serde_json::json!({
        "responses": all.latencies_ns.len(),
        "seconds": seconds,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "statuses": all.statuses.iter().map(|(s, n)| (s.to_string(), n)).collect::<BTreeMap<_, _>>(),
        "errors": all.errors,
    });
    println!("{out}");
    Ok(())
}
