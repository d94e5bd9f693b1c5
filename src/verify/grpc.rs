//! Envoy's gRPC authorization service (`envoy.service.auth.v3.Authorization/Check`), the protocol of
//! Envoy's `ext_authz` filter in gRPC mode, Istio's `CUSTOM` authorization and Gateway API's
//! `ExternalAuth` filter with `protocol: GRPC`. The same verdicts as the HTTP endpoint, in Envoy's
//! terms: OK with the directory headers set on the upstream request, or a denied response carrying
//! the 401/403 and the `WWW-Authenticate` challenge for the client.

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode};
use envoy_types::ext_authz::v3::{CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder};
use tonic::{Request, Response, Status};

use super::index::{DirectoryId, MalformedBinding, Verdict};
use super::verifier::{EXPECTED_HEADER, NAME_HEADER, NAMESPACE_HEADER, Verifier, challenge};

/// Key of a route's `context_extensions` (Envoy's per-route `ExtAuthzPerRoute`) naming the directory
/// the route belongs to, as `<namespace>/<name>`.
pub const EXPECTED_CONTEXT_KEY: &str = "directory";

/// The gRPC adapter over a [`Verifier`].
#[derive(Clone)]
pub struct GrpcVerifier {
    pub verifier: Verifier,
    /// Remove `Authorization` from the request before Envoy forwards it: the SCIM server behind never
    /// needs the token once the proxy has checked it.
    pub strip_authorization: bool,
}

#[tonic::async_trait]
impl Authorization for GrpcVerifier {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let headers = request.get_client_headers();
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(String::as_str);
        let from_route = request.attributes.as_ref().and_then(|a| a.context_extensions.get(EXPECTED_CONTEXT_KEY));
        // The route's binding wins over anything the client sent.
        let expected = match from_route.map(String::as_str).or_else(|| header(EXPECTED_HEADER)) {
            None => Ok(None),
            Some(value) => DirectoryId::parse(value.trim()).map(Some).ok_or(MalformedBinding),
        };
        let verdict = self.verifier.check(header("authorization").map(str::as_bytes), expected);
        Ok(Response::new(self.response(&verdict)))
    }
}

impl GrpcVerifier {
    fn response(&self, verdict: &Verdict) -> CheckResponse {
        let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
        let (status, http_status) = match verdict {
            Verdict::Allowed { directory, .. } => {
                let mut ok = OkHttpResponseBuilder::new();
                // Overwrite: a client cannot smuggle its own directory headers past the proxy.
                ok.add_header(NAMESPACE_HEADER, directory.namespace.clone(), overwrite, false);
                ok.add_header(NAME_HEADER, directory.name.clone(), overwrite, false);
                if self.strip_authorization {
                    ok.remove_header("authorization");
                }
                let mut response = CheckResponse::with_status(Status::ok("allowed"));
                response.set_http_response(ok);
                return response;
            }
            Verdict::Denied(_) => (Status::unauthenticated("invalid token"), HttpStatusCode::Unauthorized),
            Verdict::WrongDirectory { .. } => {
                (Status::permission_denied("the token belongs to another directory"), HttpStatusCode::Forbidden)
            }
        };
        let mut denied = DeniedHttpResponseBuilder::new();
        denied.set_http_status(http_status);
        if let Some(challenge) = challenge(verdict) {
            denied.add_header("www-authenticate", challenge, overwrite, false);
        }
        denied.add_header("cache-control", "no-store", overwrite, false);
        denied.add_header("content-type", "application/scim+json", overwrite, false);
        let code = if http_status == HttpStatusCode::Unauthorized { 401 } else { 403 };
        denied.set_body(format!(
            r#"{{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"{code}","detail":"{}"}}"#,
            status.message()
        ));
        let mut response = CheckResponse::with_status(status);
        response.set_http_response(denied);
        response
    }
}

/// Largest Check request decoded by default. An ext_authz `CheckRequest` carries the request's
/// headers (all of them unless Envoy's `allowed_headers` says otherwise), its path and the peers'
/// addresses: a few KiB, and within 64 KiB for any request Envoy accepts with its default header
/// limit (`max_request_headers_kb`: 60). tonic's default, 4 MiB, let every stream in flight hold that
/// much.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Requests in flight on one HTTP/2 connection; Envoy opens another connection past it.
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// HTTP/2 pings on every connection this often, and a peer that does not answer within the timeout
/// is closed: a dead proxy's connection does not hold a slot.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The client's HTTP/2 connection preface (RFC 9113 §3.4), due within `--header-read-timeout` of the
/// accept.
pub const PREFACE_BYTES: usize = 24;

impl tonic::transport::server::Connected for crate::server::Deadlines<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, RwLock};

    use envoy_types::ext_authz::v3::pb::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::{ScimDirectory, ScimDirectorySpec, ScimDirectoryStatus};
    use crate::token::Token;
    use crate::verify::index::Index;
    use crate::verify::metrics::VerifierMetrics;

    fn check_request(headers: &[(&str, &str)], context: &[(&str, &str)]) -> CheckRequest {
        let headers: HashMap<String, String> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(HttpRequest { headers, ..Default::default() }),
                    ..Default::default()
                }),
                context_extensions: context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            }),
        }
    }

    fn header<'a>(headers: &'a [envoy_types::ext_authz::v3::pb::HeaderValueOption], name: &str) -> Option<&'a str> {
        headers.iter().filter_map(|h| h.header.as_ref()).find(|h| h.key == name).map(|h| h.value.as_str())
    }

    #[tokio::test]
    async fn verdicts_in_envoys_terms() {
        let token = Token::generate();
        let mut dir = ScimDirectory::new("acme", ScimDirectorySpec::default());
        dir.metadata.namespace = Some("t1".into());
        dir.status = Some(ScimDirectoryStatus {
            token_hash: Some(token.hash().to_string()),
            token_expires_at: Some(Time("2099-01-01T00:00:00Z".parse().unwrap())),
            ..Default::default()
        });
        let mut index = Index::default();
        index.apply(&crate::verify::directory::WatchedDirectory::from(&dir));
        let grpc = GrpcVerifier {
            verifier: Verifier { index: Arc::new(RwLock::new(index)), metrics: Arc::new(VerifierMetrics::default()) },
            strip_authorization: true,
        };
        let bearer = format!("Bearer {}", token.expose());
        let call = |headers: &[(&str, &str)], context: &[(&str, &str)]| {
            let request = Request::new(check_request(headers, context));
            let grpc = grpc.clone();
            async move { grpc.check(request).await.unwrap().into_inner() }
        };

        let ok = call(&[("authorization", &bearer)], &[]).await;
        assert_eq!(ok.status.as_ref().unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = ok.http_response else { panic!("an OK response") };
        assert_eq!(header(&ok.headers, NAMESPACE_HEADER), Some("t1"));
        assert_eq!(header(&ok.headers, NAME_HEADER), Some("acme"));
        assert_eq!(ok.headers_to_remove, vec!["authorization".to_owned()]);

        for (headers, context, code, http, fragment) in [
            (vec![("authorization", "Bearer nope")], vec![], 16, 401, "invalid_token"),
            (vec![], vec![], 16, 401, r#"realm="scim""#),
            (vec![("authorization", bearer.as_str())], vec![("directory", "t2/other")], 7, 403, "insufficient_scope"),
            // The route's context extension wins over the client's header.
            (
                vec![("authorization", bearer.as_str()), ("x-scim-expected-directory", "t1/acme")],
                vec![("directory", "t2/other")],
                7,
                403,
                "insufficient_scope",
            ),
            (vec![("authorization", bearer.as_str())], vec![("directory", "garbage")], 16, 401, "invalid_token"),
        ] {
            let denied = call(&headers, &context).await;
            assert_eq!(denied.status.as_ref().unwrap().code, code, "{headers:?} {context:?}");
            let Some(HttpResponse::DeniedResponse(denied)) = denied.http_response else { panic!("a denied response") };
            assert_eq!(denied.status.unwrap().code, http);
            assert!(header(&denied.headers, "www-authenticate").unwrap().contains(fragment), "{headers:?}");
        }
        // The header binding alone works too.
        let bound = call(&[("authorization", &bearer), ("x-scim-expected-directory", "t1/acme")], &[]).await;
        assert_eq!(bound.status.unwrap().code, 0);
    }
}
