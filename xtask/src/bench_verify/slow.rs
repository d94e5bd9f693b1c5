//! Slow clients: `--slow-clients` connections (300 by default) that send the start of a request
//! head and then trickle one byte a second, never finishing it (slowloris). Measured beside them:
//! the verifier's latency for a valid token (one keep-alive client, one request at a time, as
//! before them), its RSS with all of them open, and how many of them the verifier closed and when
//! (its header read timeout). A client still open `GRACE` past the timeout counts as never closed.
//!
//! Correctness in every mode: every request beside them is answered 200. `--check` also requires
//! every slow connection closed by the verifier; never a time.

use std::time::{Duration, Instant};

use anyhow::ensure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http::Http;
use super::memory::Memory;

/// How long past the header read timeout a slow client waits to be closed before giving up.
pub(super) const GRACE: Duration = Duration::from_secs(10);

pub(super) struct SlowClients {
    pub clients: usize,
    pub header_timeout: Duration,
    /// Latencies of the valid token's requests before the slow clients and beside them.
    pub before: Vec<Duration>,
    pub beside: Vec<Duration>,
    /// RSS with every slow client connected and trickling.
    pub memory: Memory,
    /// When each closed slow connection was closed, from its connect.
    pub closed: Vec<Duration>,
}

/// Requests with `token` one at a time on one keep-alive connection for `time`: their latencies,
/// each answered 200.
async fn latencies(port: u16, token: &str, time: Duration) -> anyhow::Result<Vec<Duration>> {
    let mut http = Http::new(port);
    let mut samples = vec![];
    let started = Instant::now();
    while started.elapsed() < time {
        let sent = Instant::now();
        let answer = http.verify(token, None).await?;
        samples.push(sent.elapsed());
        ensure!(answer.status == 200, "a valid token beside the slow clients got {}", answer.status);
    }
    Ok(samples)
}

/// One slow client: the start of a head, then a byte a second until the server closes the
/// connection (its close time, from the connect) or `give_up` passes (`None`).
async fn trickle(port: u16, give_up: Duration) -> anyhow::Result<Option<Duration>> {
    let connected = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut read, mut write) = stream.split();
    write.write_all(b"GET /verify HTTP/1.1\r\nHost: verifier\r\nX-Slow: ").await?;
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + give_up;
    loop {
        tokio::select! {
            n = read.read(&mut buf) => match n {
                // A 408 or anything else the server says first is read on; EOF or a reset is the close.
                Ok(0) | Err(_) => return Ok(Some(connected.elapsed())),
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                // A write to a connection the server closed fails, or the next read sees the close.
                if write.write_all(b"x").await.is_err() {
                    return Ok(Some(connected.elapsed()));
                }
            }
            () = tokio::time::sleep_until(deadline) => return Ok(None),
        }
    }
}

pub(super) async fn run(
    port: u16,
    pid: u32,
    token: &str,
    clients: usize,
    header_timeout: Duration,
    sample: Duration,
) -> anyhow::Result<SlowClients> {
    let before = latencies(port, token, sample).await?;
    let give_up = header_timeout + GRACE;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(trickle(port, give_up));
    }
    // All connected and trickling, well inside the timeout: the memory with them, then the latency.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let memory = Memory::of(pid);
    let beside = latencies(port, token, sample.min(header_timeout.mul_f64(0.7))).await?;
    let mut closed = vec![];
    while let Some(result) = tasks.join_next().await {
        if let Some(at) = result?? {
            closed.push(at);
        }
    }
    closed.sort();
    println!(
        "    {clients} slow clients: {} closed by the verifier (header read timeout {} s); {} requests beside them, all 200",
        closed.len(),
        header_timeout.as_secs_f64(),
        beside.len()
    );
    Ok(SlowClients { clients, header_timeout, before, beside, memory, closed })
}
