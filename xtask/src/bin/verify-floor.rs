//! The floor of `cargo xtask bench-verify`: the verifier's HTTP stack without the verifier. The same
//! axum (one version in Cargo.lock, the same `http1` + `tokio` features), the same runtime
//! (`#[tokio::main]`: multi-threaded, one worker per core), the same `axum::serve` with graceful
//! shutdown on SIGTERM and the same routes (`/verify` and below, any method), answering 200 with no
//! work at all. Whatever the verifier costs beyond this binary is its own work: reading the header,
//! hashing the token, the index lookup, the metrics.
//!
//! It is also the benchmark's trivial upstream behind nginx (any other path: 200 as well).
//!
//! usage: verify-floor LISTEN_ADDR

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::any;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args().nth(1).context("usage: verify-floor LISTEN_ADDR")?.parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let app = Router::new().route("/verify", any(ok)).route("/verify/{*rest}", any(ok)).fallback(ok);
    axum::serve(listener, app).with_graceful_shutdown(shutdown()).await?;
    Ok(())
}

async fn ok() -> StatusCode {
    StatusCode::OK
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
