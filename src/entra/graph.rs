//! The five Microsoft Graph calls on a service principal's synchronization (v1.0, the contract in
//! ../shared/specs): validate credentials, set them, read them back (masked), list the jobs, restart
//! a job. Request bodies carry the SCIM token: they are built here, sent over TLS, and never logged.

use std::time::Duration;

use http_body_util::Full;
use hyper::Method;
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use super::auth::AccessToken;
use super::error::{Call, GraphError};
use super::http::Https;
use crate::token::Token;

/// Entra calls the SCIM endpoint during validateCredentials: that can take a while.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(90);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A synchronization job as `GET .../synchronization/jobs` lists it (only what the operator reads).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    #[serde(default)]
    pub status: Option<SyncStatus>,
}

/// `synchronizationStatus`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatus {
    /// `synchronizationStatusCode`: NotConfigured, NotRun, Active, Paused, Quarantine.
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub quarantine: Option<Quarantine>,
    #[serde(default)]
    pub last_execution: Option<Execution>,
    #[serde(default)]
    pub last_successful_execution: Option<Execution>,
}

/// `synchronizationQuarantine`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quarantine {
    /// `quarantineReason`.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub current_began: Option<String>,
    #[serde(default)]
    pub error: Option<SyncError>,
}

/// `synchronizationTaskExecution`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Execution {
    #[serde(default)]
    pub time_began: Option<String>,
    #[serde(default)]
    pub time_ended: Option<String>,
    /// `synchronizationTaskExecutionResult`: Succeeded, Failed, EntryLevelErrors.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub error: Option<SyncError>,
}

/// `synchronizationError`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// Graph at `endpoint` (e.g. `https://graph.microsoft.com`), with one access token.
pub struct Graph<'a> {
    pub(super) https: &'a Https,
    pub(super) endpoint: &'a str,
    pub(super) access: &'a AccessToken,
}

impl Graph<'_> {
    /// `POST .../jobs/{job}/validateCredentials`: Entra calls `base_address` with `token` before
    /// anything is saved. 204 when the SCIM endpoint accepted it.
    pub async fn validate_credentials(
        &self,
        sp: &str,
        job: &str,
        base_address: &str,
        token: &Token,
    ) -> Result<(), GraphError> {
        let body = Zeroizing::new(
            json!({ "useSavedCredentials": false, "credentials": credentials(base_address, token) }).to_string(),
        );
        let path = format!("servicePrincipals/{sp}/synchronization/jobs/{job}/validateCredentials");
        self.call(Call::ValidateCredentials, Method::POST, &path, Some(body), VALIDATE_TIMEOUT)
            .await
            .map_err(|e| e.redacted(token))
            .map(drop)
    }

    /// `PUT .../synchronization/secrets` with the base address and the token together (whether a PUT
    /// of the token alone keeps the saved base address is not documented).
    pub async fn put_secrets(&self, sp: &str, base_address: &str, token: &Token) -> Result<(), GraphError> {
        let body = Zeroizing::new(json!({ "value": credentials(base_address, token) }).to_string());
        let path = format!("servicePrincipals/{sp}/synchronization/secrets");
        self.call(Call::PutSecrets, Method::PUT, &path, Some(body), CALL_TIMEOUT)
            .await
            .map_err(|e| e.redacted(token))
            .map(drop)
    }

    /// `GET .../synchronization/secrets`: the keys saved, their values masked by Graph.
    pub async fn get_secrets(&self, sp: &str) -> Result<Vec<(String, String)>, GraphError> {
        #[derive(Deserialize)]
        struct Pair {
            key: String,
            #[serde(default)]
            value: Option<String>,
        }
        #[derive(Deserialize)]
        struct List {
            #[serde(default)]
            value: Vec<Pair>,
        }
        let path = format!("servicePrincipals/{sp}/synchronization/secrets");
        let body = self.call(Call::GetSecrets, Method::GET, &path, None, CALL_TIMEOUT).await?;
        let list: List = parse(Call::GetSecrets, &body)?;
        Ok(list.value.into_iter().map(|p| (p.key, p.value.unwrap_or_default())).collect())
    }

    /// `GET .../synchronization/jobs`.
    pub async fn list_jobs(&self, sp: &str) -> Result<Vec<Job>, GraphError> {
        #[derive(Deserialize)]
        struct List {
            #[serde(default)]
            value: Vec<Job>,
        }
        let path = format!("servicePrincipals/{sp}/synchronization/jobs");
        let body = self.call(Call::ListJobs, Method::GET, &path, None, CALL_TIMEOUT).await?;
        Ok(parse::<List>(Call::ListJobs, &body)?.value)
    }

    /// `POST .../jobs/{job}/restart` with `resetScope: QuarantineState`: out of quarantine.
    pub async fn restart(&self, sp: &str, job: &str) -> Result<(), GraphError> {
        let body = Zeroizing::new(json!({ "criteria": { "resetScope": "QuarantineState" } }).to_string());
        let path = format!("servicePrincipals/{sp}/synchronization/jobs/{job}/restart");
        self.call(Call::Restart, Method::POST, &path, Some(body), CALL_TIMEOUT).await.map(drop)
    }

    /// One call; the answer's body on 2xx, Graph's error otherwise.
    async fn call(
        &self,
        call: Call,
        method: Method,
        path: &str,
        body: Option<Zeroizing<String>>,
        timeout: Duration,
    ) -> Result<Bytes, GraphError> {
        let url = format!("{}/v1.0/{path}", self.endpoint.trim_end_matches('/'));
        let mut authorization = HeaderValue::from_str(&self.access.bearer())
            .map_err(|_| GraphError::without_answer(call, "unusable access token"))?;
        authorization.set_sensitive(true);
        let mut request = hyper::Request::builder().method(method).uri(&url).header(AUTHORIZATION, authorization);
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let payload = body.map(|b| Bytes::from(b.as_bytes().to_vec())).unwrap_or_default();
        let request = request.body(Full::new(payload)).map_err(|e| GraphError::without_answer(call, e.to_string()))?;
        let answer = self.https.send(request, timeout).await.map_err(|e| GraphError::without_answer(call, e))?;
        if (200..300).contains(&answer.status) {
            Ok(answer.body)
        } else {
            Err(GraphError::from_answer(call, answer.status, answer.retry_after, &answer.body))
        }
    }
}

/// `synchronizationSecretKeyStringValuePair`s: BaseAddress and SecretToken.
fn credentials(base_address: &str, token: &Token) -> serde_json::Value {
    json!([
        { "key": "BaseAddress", "value": base_address },
        { "key": "SecretToken", "value": token.expose() },
    ])
}

fn parse<T: serde::de::DeserializeOwned>(call: Call, body: &[u8]) -> Result<T, GraphError> {
    serde_json::from_slice(body).map_err(|e| GraphError::without_answer(call, format!("unexpected answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_reads_as_graph_lists_it() {
        let listed = serde_json::json!({ "value": [{
            "id": "scim.0123.abc",
            "templateId": "scim",
            "schedule": { "interval": "PT40M", "state": "Active" },
            "status": {
                "code": "Quarantine",
                "countSuccessiveCompleteFailures": 3,
                "escrowsPruned": false,
                "quarantine": {
                    "currentBegan": "2026-01-01T00:00:00Z", "nextAttempt": "2026-01-01T01:00:00Z",
                    "reason": "EncounteredQuarantineException", "seriesBegan": "2026-01-01T00:00:00Z",
                    "seriesCount": 1, "error": { "code": "SystemForCrossDomainIdentityManagementCredentialValidationUnavailable", "message": "401", "tenantActionable": true }
                },
                "lastExecution": { "timeBegan": "2026-01-01T00:00:00.1234567Z", "timeEnded": "2026-01-01T00:00:01Z", "state": "Failed" },
                "lastSuccessfulExecution": null
            }
        }] });
        #[derive(Deserialize)]
        struct List {
            value: Vec<Job>,
        }
        let jobs = serde_json::from_value::<List>(listed).unwrap().value;
        let status = jobs[0].status.as_ref().unwrap();
        assert_eq!(status.code.as_deref(), Some("Quarantine"));
        assert_eq!(status.quarantine.as_ref().unwrap().reason.as_deref(), Some("EncounteredQuarantineException"));
        assert_eq!(status.last_execution.as_ref().unwrap().state.as_deref(), Some("Failed"));
        assert_eq!(status.last_successful_execution, None);
    }

    #[test]
    fn credentials_are_base_address_and_secret_token() {
        let token = Token::from_plaintext("scim_t".into());
        let c = credentials("https://scim.example.com/scim/v2", &token);
        assert_eq!(c[0]["key"], "BaseAddress");
        assert_eq!(c[1], serde_json::json!({ "key": "SecretToken", "value": "scim_t" }));
    }
}
