//! Microsoft Entra ID: pushing a directory's new token to its enterprise application's provisioning
//! job through Microsoft Graph (see docs/entra.md and the published contract in ../shared/specs).
//!
//! - `auth.rs`: access tokens (client secret or workload identity federation), cached in memory.
//! - `graph.rs`: the Graph calls. `error.rs`: what a failed call says.
//! - `plan.rs`: the steps of a push, as pure decisions. `http.rs`: the HTTPS client.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::Method;
use hyper::body::Bytes;
use hyper::header::CONTENT_TYPE;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use zeroize::Zeroizing;

use crate::api::{EntraAuth, EntraProvisioning};

pub mod auth;
pub mod error;
pub mod graph;
mod http;
pub mod plan;

pub use auth::AccessToken;
pub use error::{Call, GraphError};
pub use graph::Graph;

/// The condition's type. True once Entra has run successfully with the current token.
pub const CONDITION: &str = "IdentityProviderSynced";

/// The reasons of the condition. A public contract, like Ready's (Argo CD's health check, `kubectl
/// scim status`, docs/entra.md).
pub mod reason {
    /// True: Entra's provisioning job succeeded with the current token.
    pub const SYNCED: &str = "Synced";
    /// The current token is not pushed yet (a new token: the verifier must see it first).
    pub const PUSH_PENDING: &str = "PushPending";
    /// Pushed; waiting for the job's next successful run.
    pub const AWAITING_SYNC: &str = "AwaitingSync";
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailed";
    pub const VALIDATION_FAILED: &str = "ValidationFailed";
    pub const PUSH_FAILED: &str = "PushFailed";
    pub const JOB_STATUS_FAILED: &str = "JobStatusFailed";
    pub const JOB_NOT_FOUND: &str = "JobNotFound";
    pub const RESTART_FAILED: &str = "RestartFailed";
    /// The job was in quarantine and was restarted.
    pub const QUARANTINED: &str = "Quarantined";
    /// The job's last run after the push failed.
    pub const SYNC_FAILED: &str = "SyncFailed";
    /// The token has expired: nothing is pushed.
    pub const TOKEN_EXPIRED: &str = "TokenExpired";
    pub const ALL: [&str; 12] = [
        SYNCED,
        PUSH_PENDING,
        AWAITING_SYNC,
        AUTHENTICATION_FAILED,
        VALIDATION_FAILED,
        PUSH_FAILED,
        JOB_STATUS_FAILED,
        JOB_NOT_FOUND,
        RESTART_FAILED,
        QUARANTINED,
        SYNC_FAILED,
        TOKEN_EXPIRED,
    ];
}

const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where Graph and the Microsoft identity platform are, and how often to look at a job.
#[derive(Clone, Debug)]
pub struct Config {
    /// `https://graph.microsoft.com` unless a national cloud or a test double.
    pub graph_endpoint: String,
    /// `https://login.microsoftonline.com/`; the token endpoint is `{authority}{tenant}/oauth2/v2.0/token`.
    pub authority_host: String,
    /// Extra trust roots for both (a TLS-inspecting egress proxy, a test CA).
    pub ca_file: Option<PathBuf>,
    /// The projected ServiceAccount token for workload identity federation (AZURE_FEDERATED_TOKEN_FILE).
    pub federated_token_file: Option<PathBuf>,
    /// How often a pushed token's job is read until Entra has run with it.
    pub poll_interval: Duration,
}

/// The Graph client of the operator: one HTTPS connection pool, the cached access tokens and the
/// retry state per directory.
pub struct Entra {
    config: Config,
    https: http::Https,
    tokens: auth::TokenCache,
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Entra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entra").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Entra {
    /// Refuses endpoints that are not https:// and an unreadable CA file.
    pub fn new(mut config: Config) -> Result<Entra, String> {
        for (flag, url) in
            [("--graph-endpoint", &config.graph_endpoint), ("--entra-authority-host", &config.authority_host)]
        {
            let uri: hyper::Uri = url.parse().map_err(|e| format!("{flag} {url:?}: {e}"))?;
            if uri.scheme_str() != Some("https") || uri.host().is_none() {
                return Err(format!("{flag} must be an https:// URL, got {url:?}"));
            }
        }
        if !config.authority_host.ends_with('/') {
            config.authority_host.push('/');
        }
        let https = http::Https::new(config.ca_file.as_deref())?;
        Ok(Entra { config, https, tokens: auth::TokenCache::default(), failures: Mutex::default() })
    }

    pub fn poll_interval(&self) -> Duration {
        self.config.poll_interval
    }

    /// Graph, with `access`.
    pub fn graph<'a>(&'a self, access: &'a AccessToken) -> Graph<'a> {
        Graph { https: &self.https, endpoint: &self.config.graph_endpoint, access }
    }

    /// An access token for `entra`'s app (cached until shortly before it expires). A client secret
    /// is read from the directory's namespace, `namespace`, never from anywhere else.
    pub async fn access_token(
        &self,
        kube: &kube::Client,
        namespace: &str,
        entra: &EntraProvisioning,
    ) -> Result<Arc<AccessToken>, GraphError> {
        let key = cache_key(namespace, entra);
        if let Some(token) = self.tokens.get(&key) {
            return Ok(token);
        }
        let (client_id, credential) = self.credential(kube, namespace, &entra.auth).await?;
        let url = format!("{}{}/oauth2/v2.0/token", self.config.authority_host, entra.tenant_id);
        let body = auth::token_request(client_id, &credential);
        let request = hyper::Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            // The buffer itself, zeroed once the request is sent and dropped.
            .body(Full::new(Bytes::from_owner(body)))
            .map_err(|e| GraphError::without_answer(Call::Token, e.to_string()))?;
        let answer =
            self.https.send(request, TOKEN_TIMEOUT).await.map_err(|e| GraphError::without_answer(Call::Token, e))?;
        if !(200..300).contains(&answer.status) {
            return Err(auth::token_error(answer.status, answer.retry_after, &answer.body, &credential));
        }
        let (token, expires_in) =
            auth::token_answer(&answer.body).map_err(|e| GraphError::without_answer(Call::Token, e))?;
        Ok(self.tokens.put(key, token, expires_in))
    }

    /// Forgets `entra`'s cached access token (Graph answered 401 with it).
    pub fn forget_access_token(&self, namespace: &str, entra: &EntraProvisioning) {
        self.tokens.forget(&cache_key(namespace, entra));
    }

    async fn credential<'a>(
        &self,
        kube: &kube::Client,
        namespace: &str,
        auth: &'a EntraAuth,
    ) -> Result<(&'a str, auth::Credential), GraphError> {
        let fail = |message: String| GraphError::without_answer(Call::Token, message);
        if let Some(wi) = &auth.workload_identity {
            let path = self.config.federated_token_file.as_ref().ok_or_else(|| {
                fail("workload identity: AZURE_FEDERATED_TOKEN_FILE is not set (is the pod labelled azure.workload.identity/use: \"true\"?)".to_owned())
            })?;
            let jwt = read_credential(path)
                .await
                .map_err(|e| fail(format!("workload identity: cannot read {}: {e}", path.display())))?;
            return Ok((&wi.client_id, auth::Credential::FederatedToken(jwt)));
        }
        let Some(cs) = &auth.client_secret else {
            return Err(fail("spec.identityProvider.entra.auth names no method".to_owned()));
        };
        let (name, key) = (&cs.secret_ref.name, &cs.secret_ref.key);
        let secrets: Api<Secret> = Api::namespaced(kube.clone(), namespace);
        let secret =
            secrets.get_opt(name).await.map_err(|e| fail(format!("reading Secret {namespace}/{name}: {e}")))?;
        let value = secret
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(key))
            .map(|v| Zeroizing::new(v.0))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| fail(format!("Secret {namespace}/{name} has no key {key:?} (the app's client secret)")))?;
        let secret = std::str::from_utf8(&value)
            .map_err(|_| fail(format!("Secret {namespace}/{name} key {key:?} is not UTF-8")))?;
        Ok((&cs.client_id, auth::Credential::ClientSecret(Zeroizing::new(secret.to_owned()))))
    }

    /// Counts a failure of `directory`'s push; returns how many in a row.
    pub fn failed(&self, directory: &str) -> u32 {
        let mut failures = self.failures.lock().expect("poisoned");
        let n = failures.entry(directory.to_owned()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    pub fn succeeded(&self, directory: &str) {
        self.failures.lock().expect("poisoned").remove(directory);
    }
}

/// A file holding a credential, read into memory zeroed on drop. The buffer is sized from the
/// file's length with the room tokio's reader wants, so that no growing buffer leaves a copy behind.
async fn read_credential(path: &Path) -> std::io::Result<Zeroizing<String>> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let len = usize::try_from(file.metadata().await?.len()).unwrap_or(0);
    let mut bytes = Zeroizing::new(Vec::with_capacity(len + 64));
    file.read_to_end(&mut bytes).await?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))?;
    Ok(Zeroizing::new(text.to_owned()))
}

fn cache_key(namespace: &str, entra: &EntraProvisioning) -> auth::CacheKey {
    let (client_id, source) = match (&entra.auth.workload_identity, &entra.auth.client_secret) {
        (Some(wi), _) => (wi.client_id.clone(), "workload-identity".to_owned()),
        (None, Some(cs)) => {
            (cs.client_id.clone(), format!("secret:{namespace}/{}/{}", cs.secret_ref.name, cs.secret_ref.key))
        }
        (None, None) => (String::new(), String::new()),
    };
    auth::CacheKey { tenant: entra.tenant_id.to_ascii_lowercase(), client_id, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_condition_reason_is_documented_and_the_health_check_knows_the_pending_ones() {
        let doc = include_str!("../../docs/entra.md");
        let health = include_str!("../../argocd/resource_customizations/scim.tokenops.dev/ScimDirectory/health.lua");
        for r in reason::ALL {
            assert!(doc.contains(&format!("| `{r}` |")), "docs/entra.md does not explain {r}");
        }
        for r in [CONDITION, reason::PUSH_PENDING, reason::AWAITING_SYNC] {
            assert!(health.contains(&format!("\"{r}\"")), "Argo CD's health check does not read {r}");
        }
    }

    #[test]
    fn endpoints_must_be_https() {
        let config = |graph: &str, authority: &str| Config {
            graph_endpoint: graph.into(),
            authority_host: authority.into(),
            ca_file: None,
            federated_token_file: None,
            poll_interval: Duration::from_secs(60),
        };
        assert!(Entra::new(config("https://graph.microsoft.com", "https://login.microsoftonline.com/")).is_ok());
        let e = Entra::new(config("http://graph.microsoft.com", "https://login.microsoftonline.com/")).unwrap_err();
        assert!(e.contains("--graph-endpoint must be an https:// URL"), "{e}");
        let e = Entra::new(config("https://graph.microsoft.com", "http://127.0.0.1:8080/")).unwrap_err();
        assert!(e.contains("--entra-authority-host"), "{e}");
        let mut missing = config("https://graph.microsoft.com", "https://login.microsoftonline.com");
        missing.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(Entra::new(missing).unwrap_err().contains("--entra-ca-file"));
        let entra = Entra::new(config("https://g.example", "https://login.example")).unwrap();
        assert_eq!(entra.config.authority_host, "https://login.example/", "the tenant is appended after a slash");
        assert!(format!("{entra:?}").ends_with(", .. }"), "the cached access tokens stay out of Debug");
    }
}
