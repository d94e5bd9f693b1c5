//! The HTTP external-auth protocol shared by nginx `auth_request`, Caddy `forward_auth`, Traefik
//! ForwardAuth, Envoy `ext_authz` (HTTP mode) and Gateway API's `ExternalAuth` filter: a thin adapter
//! from a request to [`Index::verify`] and from its verdict to a status and headers.
//!
//! 200 carries the directory for the proxy to copy upstream; 401 carries an RFC 6750
//! `WWW-Authenticate` challenge; 403 means a valid token on another directory's route. Nothing is
//! ever answered with 5xx (nginx turns any status but 2xx/401/403 into 500).

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use k8s_openapi::jiff::Timestamp;

use super::index::{Denial, DirectoryId, Index, Verdict};
use super::metrics::VerifierMetrics;

/// Response headers naming the directory of an accepted token.
pub const NAMESPACE_HEADER: &str = "x-scim-directory-namespace";
pub const NAME_HEADER: &str = "x-scim-directory-name";
/// Request header (set per route by the proxy) naming the directory the route belongs to.
pub const EXPECTED_HEADER: &str = "x-scim-expected-directory";
/// The same as a query parameter of the auth request.
pub const EXPECTED_PARAM: &str = "directory";

#[derive(Clone)]
pub struct Verifier {
    pub index: Arc<RwLock<Index>>,
    pub metrics: Arc<VerifierMetrics>,
}

/// `/verify` and every path below it (Envoy's HTTP mode appends the original path), any method.
pub fn router(verifier: Verifier) -> Router {
    Router::new().route("/verify", any(handle)).route("/verify/{*rest}", any(handle)).with_state(verifier)
}

async fn handle(State(v): State<Verifier>, request: Request) -> Response {
    let headers = request.headers();
    let expected = match expected_directory(headers, request.uri().query()) {
        Ok(expected) => expected,
        // A route bound to a malformed directory name is the proxy's mistake: refuse, never open.
        Err(()) => return refuse(&v, Denial::Malformed, "the expected directory is not <namespace>/<name>"),
    };
    let authorization = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let verdict = v.index.read().expect("poisoned").verify(authorization, expected.as_ref(), Timestamp::now());
    match verdict {
        Verdict::Allowed { directory, kind } => {
            v.metrics.allowed(&directory, kind);
            let mut response = StatusCode::OK.into_response();
            let h = response.headers_mut();
            // Namespace and name are DNS labels/subdomains: always valid header values.
            if let (Ok(ns), Ok(name)) =
                (HeaderValue::from_str(&directory.namespace), HeaderValue::from_str(&directory.name))
            {
                h.insert(NAMESPACE_HEADER, ns);
                h.insert(NAME_HEADER, name);
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Verdict::Denied(denial) => refuse(&v, denial, description(denial)),
        Verdict::WrongDirectory { .. } => {
            v.metrics.result("wrong_directory");
            let challenge = r#"Bearer realm="scim", error="insufficient_scope", error_description="the token belongs to another directory""#;
            (StatusCode::FORBIDDEN, [(header::WWW_AUTHENTICATE, challenge), (header::CACHE_CONTROL, "no-store")])
                .into_response()
        }
    }
}

fn refuse(v: &Verifier, denial: Denial, description: &str) -> Response {
    v.metrics.result(denial.as_str());
    // RFC 6750 §3.1: a request without credentials gets a challenge without an error code.
    let challenge = match denial {
        Denial::Missing => r#"Bearer realm="scim""#.to_owned(),
        _ => format!(r#"Bearer realm="scim", error="invalid_token", error_description="{description}""#),
    };
    let mut response = StatusCode::UNAUTHORIZED.into_response();
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn description(denial: Denial) -> &'static str {
    match denial {
        Denial::Missing => "",
        Denial::Malformed => "not a SCIM bearer token",
        Denial::Unknown => "the token is not valid",
        Denial::Expired => "the token has expired",
    }
}

/// The directory the route belongs to, from the header or the query parameter (the header wins);
/// `Err` when one is given but malformed.
fn expected_directory(headers: &HeaderMap, query: Option<&str>) -> Result<Option<DirectoryId>, ()> {
    let from_header = headers.get(EXPECTED_HEADER).map(|v| v.to_str().map(str::to_owned).map_err(|_| ()));
    let from_query = || {
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(k, _)| k == EXPECTED_PARAM)
            .map(|(_, v)| Ok(v.into_owned()))
    };
    match from_header.or_else(from_query) {
        None => Ok(None),
        Some(value) => DirectoryId::parse(value?.trim()).map(Some).ok_or(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_directory_comes_from_the_header_or_the_query() {
        let mut headers = HeaderMap::new();
        let id = |s: &str| Ok(Some(DirectoryId::parse(s).unwrap()));
        assert_eq!(expected_directory(&headers, None), Ok(None));
        assert_eq!(expected_directory(&headers, Some("a=b")), Ok(None));
        assert_eq!(expected_directory(&headers, Some("directory=t1%2Fa")), id("t1/a"));
        assert_eq!(expected_directory(&headers, Some("x=1&directory=t1/a")), id("t1/a"));
        assert_eq!(expected_directory(&headers, Some("directory=nope")), Err(()));
        headers.insert(EXPECTED_HEADER, HeaderValue::from_static("t2/b"));
        assert_eq!(expected_directory(&headers, Some("directory=t1/a")), id("t2/b"));
        headers.insert(EXPECTED_HEADER, HeaderValue::from_static("t2"));
        assert_eq!(expected_directory(&headers, None), Err(()));
    }
}
