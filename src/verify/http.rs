//! The HTTP external-auth protocol shared by nginx `auth_request`, Caddy `forward_auth`, Traefik
//! ForwardAuth, Envoy `ext_authz` (HTTP mode) and Gateway API's `ExternalAuth` filter: a thin adapter
//! from a request to [`Index::verify`] and from its verdict to a status and headers.
//!
//! 200 carries the directory for the proxy to copy upstream; 401 carries an RFC 6750
//! `WWW-Authenticate` challenge; 403 means a valid token on another directory's route. Nothing is
//! ever answered with 5xx (nginx turns any status but 2xx/401/403 into 500).

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use super::index::{DirectoryId, MalformedBinding, Verdict};
use super::verifier::{EXPECTED_HEADER, EXPECTED_PARAM, NAME_HEADER, NAMESPACE_HEADER, Verifier, challenge};

/// `/verify` and every path below it (Envoy's HTTP mode appends the original path), any method.
pub fn router(verifier: Verifier) -> Router {
    Router::new().route("/verify", any(handle)).route("/verify/{*rest}", any(handle)).with_state(verifier)
}

async fn handle(State(v): State<Verifier>, request: Request) -> Response {
    let headers = request.headers();
    let expected = expected_directory(headers, request.uri().query());
    let authorization = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let verdict = v.check(authorization, expected);
    let mut response = match &verdict {
        Verdict::Allowed { directory, .. } => {
            let mut response = StatusCode::OK.into_response();
            // Namespace and name are DNS labels/subdomains: always valid header values.
            if let (Ok(ns), Ok(name)) =
                (HeaderValue::from_str(&directory.namespace), HeaderValue::from_str(&directory.name))
            {
                response.headers_mut().insert(NAMESPACE_HEADER, ns);
                response.headers_mut().insert(NAME_HEADER, name);
            }
            response
        }
        Verdict::Denied(_) => StatusCode::UNAUTHORIZED.into_response(),
        Verdict::WrongDirectory { .. } => StatusCode::FORBIDDEN.into_response(),
    };
    if let Some(challenge) = challenge(&verdict).and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The directory the route belongs to, from the header and/or the query parameter. Every binding
/// given must name the same directory: proxies that pass client headers (or the client's query) on to
/// the auth request would otherwise let a client re-bind a route to its own directory. `Err` when one
/// is malformed or they disagree: the request is refused.
pub fn expected_directory(headers: &HeaderMap, query: Option<&str>) -> Result<Option<DirectoryId>, MalformedBinding> {
    let from_headers =
        headers.get_all(EXPECTED_HEADER).iter().map(|v| v.to_str().map(str::to_owned).map_err(|_| MalformedBinding));
    let from_query = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == EXPECTED_PARAM)
        .map(|(_, v)| Ok(v.into_owned()));
    let mut bound: Option<DirectoryId> = None;
    for value in from_headers.chain(from_query) {
        let id = DirectoryId::parse(value?.trim()).ok_or(MalformedBinding)?;
        match &bound {
            Some(earlier) if *earlier != id => return Err(MalformedBinding),
            _ => bound = Some(id),
        }
    }
    Ok(bound)
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
        assert_eq!(expected_directory(&headers, Some("directory=nope")), Err(MalformedBinding));
        assert_eq!(expected_directory(&headers, Some("directory=t1/a&directory=t1/a")), id("t1/a"));
        // Two bindings that disagree (a client adding its own): refused, whichever came from where.
        assert_eq!(expected_directory(&headers, Some("directory=t1/a&directory=t2/b")), Err(MalformedBinding));
        headers.insert(EXPECTED_HEADER, HeaderValue::from_static("t2/b"));
        assert_eq!(expected_directory(&headers, Some("directory=t1/a")), Err(MalformedBinding));
        assert_eq!(expected_directory(&headers, Some("directory=t2/b")), id("t2/b"));
        assert_eq!(expected_directory(&headers, None), id("t2/b"));
        headers.append(EXPECTED_HEADER, HeaderValue::from_static("t1/a"));
        assert_eq!(expected_directory(&headers, None), Err(MalformedBinding));
        headers.insert(EXPECTED_HEADER, HeaderValue::from_static("t2"));
        assert_eq!(expected_directory(&headers, None), Err(MalformedBinding));
    }
}
