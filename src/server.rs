//! `/metrics`, `/healthz` and `/readyz`, and the bounded HTTP/1.1 accept loop that serves them and the
//! verifier's `/verify`.
//!
//! `axum::serve` installs no timer and no limit: a client that opens a connection and trickles a
//! request it never finishes holds it forever, and a few hundred of them hold the process's file
//! descriptors and memory. Every listener here is served by [`serve_http`] instead:
//!
//! - at most [`Limits::max_connections`] connections at once; past that a new connection is accepted
//!   and closed at once (counted), so the kernel's backlog never fills with connections that would
//!   hang, and a proxy sees a reset it fails over from rather than a connect that never answers;
//! - a request's head must arrive within [`Limits::header_read_timeout`] of its first byte (of the
//!   accept, for a connection's first request), and a keep-alive connection idle between requests is
//!   closed after [`Limits::idle_timeout`]: an idle proxy connection is not a slow client, so the two
//!   are separate (hyper's own `header_read_timeout` starts when the previous response is done, so it
//!   would be both at once);
//! - a request head larger than [`Limits::max_header_bytes`] is answered 431 and the connection
//!   closed; HTTP/1.1 only (no HTTP/2 to bound).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};

/// What the endpoints serve: the Prometheus text of a registry, and readiness.
#[derive(Clone)]
pub struct Health {
    pub encode: Arc<dyn Fn() -> String + Send + Sync>,
    /// True once the caches are synced (leader) or while waiting as a standby replica.
    pub ready: Arc<AtomicBool>,
}

/// Bounds on the clients of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; a connection past it is accepted and closed at once.
    pub max_connections: usize,
    /// From a request's first byte (a connection's accept, for its first request) to its complete head.
    pub header_read_timeout: Duration,
    /// A keep-alive connection without a request for this long is closed; also the longest a
    /// response may wait for the client to read it.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers), bytes; at least 8 KiB (hyper's minimum).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// Connection counts of one listener, for metrics (unregistered ones count for nobody).
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub refused: Counter,
}

/// The operator's endpoint: default limits, until the process is ended.
pub async fn serve(addr: SocketAddr, health: Health) -> std::io::Result<()> {
    serve_with(addr, health, Limits::default(), ConnectionMetrics::default(), std::future::pending()).await
}

pub async fn serve_with(
    addr: SocketAddr,
    health: Health,
    limits: Limits,
    connections: ConnectionMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    serve_http(listener, app, limits, connections, shutdown).await
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], (h.encode)())
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::SeqCst) { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

/// Serves `app` over HTTP/1.1 on `listener` within `limits` until `shutdown`; then stops accepting,
/// lets the requests in progress finish and returns once every connection is closed.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    connections: ConnectionMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(limits.max_header_bytes.max(8192))
        // The deadlines are [`Deadlines`]'; hyper's (without a timer) stays off.
        .header_read_timeout(None)
        .keep_alive(true);
    let slots = Slots::new(limits.max_connections, connections);
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            stream = accept(&listener) => stream,
        };
        let Some(slot) = slots.take() else { continue };
        let io = hyper_util::rt::TokioIo::new(Deadlines::http1(stream, limits, slot));
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http.serve_connection(io, service);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => return finished(result),
                _ = stopped.changed() => conn.as_mut().graceful_shutdown(),
            }
            finished(conn.await);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    slots.drained().await;
    Ok(())
}

fn finished(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        // Timeouts, resets and oversized heads: the client's doing, not worth more than a debug line.
        tracing::debug!(error = %e, "connection closed");
    }
}

/// The next accepted connection, with TCP_NODELAY. Every listener accepts here ([`serve_http`] and
/// [`incoming_h2`]), so none can miss it.
///
/// Without it (the kernel's default, Nagle's algorithm) a small write waits while an earlier one is
/// unacknowledged; a client still waiting for the rest of its answer sends nothing that would carry
/// the ACK, so the write waits for the client's delayed ACK, 40 ms on Linux. h2 writes a gRPC answer
/// whose DATA frame has 256 bytes or more (1 KiB without vectored writes; a denial, with its body and
/// challenge, has 320) in two writes: the HEADERS and DATA frames (the payload chained, not copied),
/// then the trailers once those are out: each denial would wait 44 ms (packet capture in
/// BENCHMARKS.md). An HTTP/1.1 answer is one write, but any answer written in pieces behind a proxy
/// that keeps its connection open would pay the same. An accept error (out of file descriptors, say)
/// is retried after a pause instead of spinning.
pub async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "setting TCP_NODELAY failed");
                }
                return stream;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The accepted connections of an HTTP/2 listener (gRPC), for tonic's `serve_with_incoming`: each
/// with TCP_NODELAY ([`accept`]; tonic sets it only on listeners it binds itself, and a
/// `TcpIncoming::from(listener)` leaves it off), within `max_connections` (a connection past it is
/// closed at once), its `preface` bytes due within the header read timeout of the accept.
pub fn incoming_h2(
    listener: TcpListener,
    preface: usize,
    limits: Limits,
    connections: ConnectionMetrics,
) -> impl futures::Stream<Item = std::io::Result<Deadlines<TcpStream>>> {
    let slots = Slots::new(limits.max_connections, connections);
    futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        loop {
            let stream = accept(&listener).await;
            if let Some(slot) = slots.take() {
                let io = Deadlines::handshake(stream, preface, limits.header_read_timeout, slot);
                return Some((Ok(io), (listener, slots)));
            }
        }
    })
}

/// The connection slots of one listener.
#[derive(Clone)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    max: usize,
    metrics: ConnectionMetrics,
}

/// One open connection's slot: freed (and uncounted) when the connection is dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Slots {
    pub fn new(max: usize, metrics: ConnectionMetrics) -> Slots {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Slots { semaphore: Arc::new(Semaphore::new(max)), max, metrics }
    }

    /// A slot for a new connection, or `None` (counted as refused) when all are taken: the caller
    /// drops the connection, which closes it.
    pub fn take(&self) -> Option<Slot> {
        match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => {
                self.metrics.open.inc();
                Some(Slot { _permit: permit, open: self.metrics.open.clone() })
            }
            Err(_) => {
                self.metrics.refused.inc();
                None
            }
        }
    }

    /// Waits until every slot is free again (every connection closed).
    pub async fn drained(&self) {
        let _ = self.semaphore.acquire_many(u32::try_from(self.max).unwrap_or(u32::MAX)).await;
    }
}

/// A connection with read deadlines (and its slot): reading fails with `TimedOut` once the current
/// deadline passes, which makes the server close the connection.
///
/// HTTP/1.1 ([`Deadlines::http1`]): a request's head must arrive within the header timeout of its
/// first byte (of the accept, for the first request); once a response is written the connection is
/// idle, and the deadline is the idle timeout (which also bounds a write the client does not read).
/// The head's timeout is not restarted by later bytes, so a trickle does not extend it; it also
/// covers a body until the response (`/verify` reads none).
///
/// A handshake ([`Deadlines::handshake`], for HTTP/2): the first `n` bytes (the client's preface)
/// must arrive within the timeout of the accept; after that no deadline (HTTP/2's keep-alive pings
/// reap dead peers).
pub struct Deadlines<IO> {
    io: IO,
    timer: Pin<Box<Sleep>>,
    phase: Phase,
    header: Duration,
    idle: Duration,
    _slot: Slot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// HTTP/1.1: reading a request (its head, and its body until the response).
    Request,
    /// HTTP/1.1: between a response and the next request's first byte.
    Idle,
    /// Waiting for this many more bytes of the preface.
    Handshake(usize),
    /// No deadline.
    Open,
}

impl<IO> Deadlines<IO> {
    pub fn http1(io: IO, limits: Limits, slot: Slot) -> Deadlines<IO> {
        Deadlines {
            io,
            timer: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            phase: Phase::Request,
            header: limits.header_read_timeout,
            idle: limits.idle_timeout,
            _slot: slot,
        }
    }

    pub fn handshake(io: IO, bytes: usize, timeout: Duration, slot: Slot) -> Deadlines<IO> {
        Deadlines {
            io,
            timer: Box::pin(tokio::time::sleep(timeout)),
            phase: if bytes == 0 { Phase::Open } else { Phase::Handshake(bytes) },
            header: timeout,
            idle: timeout,
            _slot: slot,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// `Err(TimedOut)` if the current deadline has passed (and registers for it otherwise).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        if self.phase == Phase::Open || self.timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        let what = match self.phase {
            Phase::Request => "request head not received within the header read timeout",
            Phase::Idle => "idle keep-alive connection past the idle timeout",
            _ => "connection preface not received within the handshake timeout",
        };
        Some(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
    }
}

impl<IO> Deadlines<IO> {
    /// After a write: once (part of) a response went out, the request is answered and the connection
    /// idle; a write the client does not take fails once the deadline passes.
    fn wrote(&mut self, cx: &mut Context<'_>, written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 && matches!(self.phase, Phase::Request | Phase::Idle) {
                    self.phase = Phase::Idle;
                    let deadline = Instant::now() + self.idle;
                    self.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match self.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => ready,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadlines<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                match this.phase {
                    Phase::Idle if read > 0 => {
                        this.phase = Phase::Request;
                        let deadline = Instant::now() + this.header;
                        this.timer.as_mut().reset(deadline);
                    }
                    Phase::Handshake(left) => {
                        this.phase = if read >= left { Phase::Open } else { Phase::Handshake(left - read) };
                    }
                    _ => {}
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => ready,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadlines<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, written)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::AsyncWrite;

    use super::*;

    /// Every listener's connections get TCP_NODELAY (without it a gRPC denial waits 44 ms),
    /// and the deadline wrapper passes the socket's vectored writes through (hyper and h2 choose how
    /// they write from `is_write_vectored`).
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_vectored_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let stream = accept(&listener).await;
        assert!(stream.nodelay().unwrap(), "the HTTP listener's connection has TCP_NODELAY");
        let slot = Slots::new(1, ConnectionMetrics::default()).take().unwrap();
        assert!(Deadlines::http1(stream, Limits::default(), slot).is_write_vectored());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = incoming_h2(listener, 24, Limits::default(), ConnectionMetrics::default());
        let mut incoming = std::pin::pin!(incoming);
        let _client = TcpStream::connect(addr).await.unwrap();
        let io = incoming.next().await.unwrap().unwrap();
        assert!(io.get_ref().nodelay().unwrap(), "the gRPC listener's connection has TCP_NODELAY");
        assert!(io.is_write_vectored());
    }
}
