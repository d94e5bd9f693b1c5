//! The floor of `cargo xtask bench-verify`: the verifier's HTTP stack without the verifier. The same
//! axum (one version in Cargo.lock, the same `http1` + `tokio` features), the same runtime
//! (`#[tokio::main]`: multi-threaded, one worker per core), the same `axum::serve` with graceful
//! shutdown on SIGTERM and the same routes (`/verify` and below, any method), answering 200 with no
//! work at all. Whatever the verifier costs beyond this binary is its own work: reading the header,
//! hashing the token, the index lookup, the metrics.
//!
//! It is also the benchmark's trivial upstream behind nginx (any other path: 200 as well).
//!
//! With a second address it is also the floor of the gRPC side: the verifier's tonic stack without
//! the verifier (the same tonic version and features, `tonic::transport::Server` with the standard
//! health service and envoy-types' `AuthorizationServer`, shut down the same way), answering every
//! `Check` with a bare OK: no header read, no hash, no lookup, no header set.
//!
//! usage: verify-floor LISTEN_ADDR [GRPC_LISTEN_ADDR]

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::any;
use envoy_types::ext_authz::v3::CheckResponseExt;
use envoy_types::ext_authz::v3::pb::{Authorization, AuthorizationServer, CheckRequest, CheckResponse};

const USAGE: &str = "usage: verify-floor LISTEN_ADDR [GRPC_LISTEN_ADDR]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args().nth(1).context(USAGE)?.parse()?;
    let grpc_addr: Option<SocketAddr> = std::env::args().nth(2).map(|a| a.parse()).transpose()?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let app = Router::new().route("/verify", any(ok)).route("/verify/{*rest}", any(ok)).fallback(ok);
    let http = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown()).await });
    if let Some(grpc_addr) = grpc_addr {
        let (_reporter, health) = tonic_health::server::health_reporter();
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(AuthorizationServer::new(Floor))
            .serve_with_shutdown(grpc_addr, shutdown())
            .await
            .with_context(|| format!("serving gRPC on {grpc_addr}"))?;
    }
    http.await??;
    Ok(())
}

/// The gRPC floor: every request allowed, without looking at it.
struct Floor;

#[tonic::async_trait]
impl Authorization for Floor {
    async fn check(&self, _: tonic::Request<CheckRequest>) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse::with_status(tonic::Status::ok("allowed"))))
    }
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
