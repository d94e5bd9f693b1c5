//! Access tokens for Microsoft Graph (OAuth 2.0 client credentials at the Microsoft identity
//! platform): with a client secret, or with workload identity federation (the projected
//! ServiceAccount token as the client assertion). Cached in memory only, until shortly before they
//! expire; never logged, never in a `Debug`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

/// The only scope the operator asks for.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// A cached token is used until this long before it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);

/// An access token for Graph.
pub struct AccessToken(Zeroizing<String>);

impl AccessToken {
    pub(super) fn bearer(&self) -> String {
        format!("Bearer {}", self.0.as_str())
    }
}

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

/// The form body of a client-credentials token request.
pub(super) fn token_request(client_id: &str, credential: &Credential) -> Zeroizing<String> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials")
        .append_pair("client_id", client_id)
        .append_pair("scope", GRAPH_SCOPE);
    match credential {
        Credential::ClientSecret(secret) => form.append_pair("client_secret", secret),
        Credential::FederatedToken(jwt) => {
            form.append_pair("client_assertion_type", ASSERTION_TYPE).append_pair("client_assertion", jwt.trim())
        }
    };
    Zeroizing::new(form.finish())
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
        assert_eq!((token.bearer(), expires), ("Bearer at-123".to_owned(), Duration::from_secs(3599)));
        assert_eq!(format!("{token:?}"), "AccessToken([redacted])");
        assert!(token_answer(br#"{"error":"invalid_client"}"#).is_err());
        let e = token_answer(br#"{"token_type":"mac","access_token":"at-123"}"#).unwrap_err();
        assert!(!e.contains("at-123"));
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
