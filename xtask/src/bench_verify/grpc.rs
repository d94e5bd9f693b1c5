//! The gRPC side's checks: Envoy's `Check` one request at a time (the one-by-one sweep, the rotation
//! polls), as Envoy sends it (the token in the request's HTTP headers, the route's binding in its
//! `context_extensions`), and the gRPC health service that the chart's probe asks.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, ensure};
use envoy_types::ext_authz::v3::pb::{CheckRequest, HeaderValueOption, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttributeRequest};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use scim_token_operator::token::Token;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::NS;
use super::http::Sweep;

/// The service name the verifier registers its authorization service under (tonic's `NamedService`).
pub(super) const AUTHORIZATION_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// One HTTP/2 connection to a gRPC server, one request at a time.
pub(super) struct Grpc {
    authorization: AuthorizationClient<Channel>,
    health: HealthClient<Channel>,
}

/// A `Check` answer in the client's terms.
pub(super) struct GrpcAnswer {
    /// The gRPC status code (0 OK, 16 UNAUTHENTICATED, 7 PERMISSION_DENIED).
    pub code: i32,
    /// The HTTP status Envoy gives the client: 200 when allowed, else the denied response's.
    pub status: u16,
    /// Headers set on the upstream request (allowed) or on the client's response (denied).
    pub headers: BTreeMap<String, String>,
}

impl Grpc {
    pub async fn connect(port: u16) -> anyhow::Result<Grpc> {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to the gRPC server on port {port}"))?;
        Ok(Grpc { authorization: AuthorizationClient::new(channel.clone()), health: HealthClient::new(channel) })
    }

    /// `Check` with `token` as Envoy sends it, the route bound to `directory` if given.
    pub async fn check(&mut self, token: &str, directory: Option<&str>) -> anyhow::Result<GrpcAnswer> {
        let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
        let context_extensions = directory.map(|d| HashMap::from([("directory".to_owned(), d.to_owned())]));
        let request = CheckRequest {
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
                context_extensions: context_extensions.unwrap_or_default(),
                ..Default::default()
            }),
        };
        let response = self.authorization.check(request).await?.into_inner();
        let code = response.status.map_or(0, |s| s.code);
        let pairs = |options: &[HeaderValueOption]| -> BTreeMap<String, String> {
            options.iter().filter_map(|o| o.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect()
        };
        let (status, headers) = match &response.http_response {
            Some(HttpResponse::OkResponse(ok)) => (200, pairs(&ok.headers)),
            Some(HttpResponse::DeniedResponse(denied)) => {
                let status = denied.status.as_ref().and_then(|s| u16::try_from(s.code).ok()).unwrap_or(403);
                (status, pairs(&denied.headers))
            }
            // Envoy's defaults without an HTTP response: allowed, or 403.
            _ => (if code == 0 { 200 } else { 403 }, BTreeMap::new()),
        };
        Ok(GrpcAnswer { code, status, headers })
    }

    /// The gRPC health service's answer for `service`.
    pub async fn serving(&mut self, service: &str) -> anyhow::Result<ServingStatus> {
        let request = HealthCheckRequest { service: service.to_owned() };
        let answer = self.health.check(request).await?.into_inner();
        Ok(ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown))
    }
}

/// The verifier's gRPC health once it is ready: the server ("", what the chart's `grpc:` probe asks
/// when it names no service) and the authorization service, both SERVING.
pub(super) async fn check_health(port: u16) -> anyhow::Result<()> {
    let mut grpc = Grpc::connect(port).await?;
    for service in ["", AUTHORIZATION_SERVICE] {
        let status = grpc.serving(service).await?;
        ensure!(status == ServingStatus::Serving, "gRPC health of {service:?}: {status:?} once ready");
    }
    Ok(())
}

/// Every token on a route bound to its own directory: OK naming it; as many unknown tokens: 401.
pub(super) async fn sweep(port: u16, tokens: &BTreeMap<String, String>) -> anyhow::Result<Sweep> {
    let mut grpc = Grpc::connect(port).await?;
    let mut sweep = Sweep { allowed: 0, refused: 0 };
    for (name, token) in tokens {
        let a = grpc.check(token, Some(&format!("{NS}/{name}"))).await?;
        ensure!(
            a.code == 0
                && a.headers.get("x-scim-directory-namespace").map(String::as_str) == Some(NS)
                && a.headers.get("x-scim-directory-name") == Some(name),
            "{name}'s token over gRPC: code {} {:?}",
            a.code,
            a.headers
        );
        sweep.allowed += 1;
    }
    for _ in 0..tokens.len() {
        let a = grpc.check(Token::generate().expose(), None).await?;
        ensure!(a.code == 16 && a.status == 401, "an unknown token over gRPC got code {} ({})", a.code, a.status);
        sweep.refused += 1;
    }
    Ok(sweep)
}
