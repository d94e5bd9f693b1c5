//! Access tokens for Microsoft Graph (OAuth 2.0 client credentials at the Microsoft identity
//! platform): with a client secret, or with workload identity federation (the projected
//! ServiceAccount token as the client assertion). Cached in memory only, until shortly before they
//! expire; never logged, never in a `Debug`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::error::{Call, GraphError};

/// The only scope the operator asks for.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// A cached token is used until this long before it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);

/// An access token for Graph.
pub struct AccessToken(Zeroizing<String>);

impl AccessToken {
    /// The `Authorization` header's value, in memory zeroed on drop (sized up front: a growing
    /// string would leave copies in freed memory).
    pub(super) fn bearer(&self) -> Zeroizing<String> {
        let mut value = Zeroizing::new(String::with_capacity(BEARER.len() + self.0.len()));
        value.push_str(BEARER);
        value.push_str(&self.0);
        value
    }

    /// The token itself, to remove from an error answer that echoes it.
    pub(super) fn expose(&self) -> &str {
        &self.0
    }
}

const BEARER: &str = "Bearer ";

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

/// What proves the operator is the app registration.
pub enum Credential {
    ClientSecret(Zeroizing<String>),
    /// The projected ServiceAccount token (a JWT), read afresh for every request: the kubelet
    /// rotates it.
    FederatedToken(Zeroizing<String>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::ClientSecret(_) => "ClientSecret([redacted])",
            Credential::FederatedToken(_) => "FederatedToken([redacted])",
        })
    }
}

impl Credential {
    /// What goes into the request.
    fn value(&self) -> &str {
        match self {
            Credential::ClientSecret(secret) => secret,
            Credential::FederatedToken(jwt) => jwt.trim(),
        }
    }

    /// Every form of the credential a token endpoint could echo back: as sent in the form body
    /// (URL-encoded) and as it is.
    fn forms(&self) -> [Zeroizing<String>; 2] {
        let value = self.value();
        let mut encoded = Zeroizing::new(String::with_capacity(3 * value.len()));
        encoded.extend(form_urlencoded::byte_serialize(value.as_bytes()));
        [Zeroizing::new(value.to_owned()), encoded]
    }
}

/// The form body of a client-credentials token request. Sized up front: a growing string would
/// leave copies of the credential in freed memory.
pub(super) fn token_request(client_id: &str, credential: &Credential) -> Zeroizing<String> {
    // Percent-encoding at most triples a byte; the rest is the fixed names and the scope.
    let capacity = 3 * (client_id.len() + credential.value().len() + GRAPH_SCOPE.len() + ASSERTION_TYPE.len()) + 128;
    let mut form = form_urlencoded::Serializer::new(String::with_capacity(capacity));
    form.append_pair("grant_type", "client_credentials")
        .append_pair("client_id", client_id)
        .append_pair("scope", GRAPH_SCOPE);
    match credential {
        Credential::ClientSecret(_) => form.append_pair("client_secret", credential.value()),
        Credential::FederatedToken(_) => form
            .append_pair("client_assertion_type", ASSERTION_TYPE)
            .append_pair("client_assertion", credential.value()),
    };
    let body = Zeroizing::new(form.finish());
    debug_assert!(body.len() <= capacity, "the token request outgrew its buffer");
    body
}

/// The token endpoint's error answer, with the credential the request carried removed from it.
pub(super) fn token_error(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    credential: &Credential,
) -> GraphError {
    let forms = credential.forms();
    GraphError::from_answer(Call::Token, status, retry_after, body).without(&[&forms[0], &forms[1]])
}

/// The token endpoint's answer: `{"token_type": "Bearer", "expires_in": 3599, "access_token": "..."}`.
pub(super) fn token_answer(body: &[u8]) -> Result<(AccessToken, Duration), String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
        expires_in: Option<serde_json::Value>,
        token_type: Option<String>,
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|_| "the token endpoint's answer is not a token".to_owned())?;
    if answer.token_type.as_deref().is_some_and(|t| !t.eq_ignore_ascii_case("Bearer")) || answer.access_token.is_empty()
    {
        return Err("the token endpoint's answer is not a bearer token".to_owned());
    }
    // A number, or a string holding one (both occur in the wild).
    let expires_in = match answer.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .unwrap_or(300);
    Ok((AccessToken(Zeroizing::new(answer.access_token)), Duration::from_secs(expires_in)))
}

/// Which app, in which tenant, with which credential source: one cached token each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub tenant: String,
    pub client_id: String,
    /// `workload-identity`, or `secret:<namespace>/<name>/<key>`.
    pub source: String,
}

#[derive(Default)]
pub(super) struct TokenCache {
    entries: Mutex<HashMap<CacheKey, (Arc<AccessToken>, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, key: &CacheKey) -> Option<Arc<AccessToken>> {
        let entries = self.entries.lock().expect("poisoned");
        entries.get(key).filter(|(_, until)| Instant::now() < *until).map(|(t, _)| t.clone())
    }

    pub fn put(&self, key: CacheKey, token: AccessToken, expires_in: Duration) -> Arc<AccessToken> {
        let token = Arc::new(token);
        // Used until shortly before it expires, and at least a few seconds (a short-lived token).
        let keep = expires_in.saturating_sub(EXPIRY_MARGIN).max(expires_in / 2);
        let mut entries = self.entries.lock().expect("poisoned");
        entries.retain(|_, (_, until)| Instant::now() < *until);
        entries.insert(key, (token.clone(), Instant::now() + keep));
        token
    }

    /// Drops a token Graph refused (401): the next call fetches a new one.
    pub fn forget(&self, key: &CacheKey) {
        self.entries.lock().expect("poisoned").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_carry_the_credential_and_nothing_prints_it() {
        let secret = Credential::ClientSecret(Zeroizing::new("s3cr=t&x".into()));
        let body = token_request("cid", &secret);
        assert!(body.contains("client_secret=s3cr%3Dt%26x") && body.contains("grant_type=client_credentials"));
        assert!(body.contains("scope=https%3A%2F%2Fgraph.microsoft.com%2F.default"));
        assert!(!format!("{secret:?}").contains("s3cr"));
        let jwt = Credential::FederatedToken(Zeroizing::new("eyJ.a.b\n".into()));
        let body = token_request("cid", &jwt);
        assert!(
            body.contains("client_assertion=eyJ.a.b&") || body.ends_with("client_assertion=eyJ.a.b"),
            "{}",
            body.as_str()
        );
        assert!(
            body.contains("client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer")
        );

        let (token, expires) =
            token_answer(br#"{"token_type":"Bearer","expires_in":3599,"access_token":"at-123"}"#).unwrap();
        assert_eq!((token.bearer().as_str(), expires), ("Bearer at-123", Duration::from_secs(3599)));
        assert_eq!(format!("{token:?}"), "AccessToken([redacted])");
        assert!(token_answer(br#"{"error":"invalid_client"}"#).is_err());
        let e = token_answer(br#"{"token_type":"mac","access_token":"at-123"}"#).unwrap_err();
        assert!(!e.contains("at-123"));
    }

    #[test]
    fn a_token_endpoint_that_echoes_the_credential_does_not_put_it_in_the_error() {
        for credential in [
            Credential::ClientSecret(Zeroizing::new("s3cr=t&x~y".into())),
            Credential::FederatedToken(Zeroizing::new("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2ln+/\n".into())),
        ] {
            let value = credential.value().to_owned();
            let request = token_request("cid", &credential);
            // An error that quotes the request it refused: the credential raw and form-encoded.
            let echo = serde_json::json!({
                "error": "invalid_request",
                "error_description": format!("AADSTS90014: bad request {} (value {value})", request.as_str()),
            });
            let e = token_error(400, None, echo.to_string().as_bytes(), &credential);
            let shown = format!("{e} {e:?}");
            assert!(shown.contains("AADSTS90014") && shown.contains("[redacted]"), "{shown}");
            assert!(!shown.contains(&value), "{shown}");
            let encoded: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
            assert!(!shown.contains(&encoded), "{shown}");
        }
    }

    #[test]
    fn the_bearer_header_and_the_token_request_are_sized_up_front() {
        let token = AccessToken(Zeroizing::new("at-".repeat(700)));
        let bearer = token.bearer();
        assert_eq!(bearer.len(), bearer.capacity(), "no reallocation left a copy behind");
        let secret = Credential::ClientSecret(Zeroizing::new("~!@#$%^&*()".repeat(40)));
        let body = token_request(&"c".repeat(36), &secret);
        assert!(body.len() <= body.capacity() && body.capacity() < 4 * body.len());
    }

    #[test]
    fn cached_tokens_expire_before_they_do_and_a_refused_one_is_forgotten() {
        let cache = TokenCache::default();
        let key = CacheKey { tenant: "t".into(), client_id: "c".into(), source: "workload-identity".into() };
        assert!(cache.get(&key).is_none());
        cache.put(key.clone(), AccessToken(Zeroizing::new("a".into())), Duration::from_secs(3599));
        assert!(cache.get(&key).is_some());
        cache.forget(&key);
        assert!(cache.get(&key).is_none());
        cache.put(key.clone(), AccessToken(Zeroizing::new("a".into())), Duration::ZERO);
        assert!(cache.get(&key).is_none(), "an expired token is not used");
    }
}
