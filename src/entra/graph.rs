//! The five Microsoft Graph calls on a service principal's synchronization (v1.0, the contract in
//! ../shared/specs): validate credentials, set them, read them back (masked), list the jobs, restart
//! a job. Request bodies carry the SCIM token: they are built here, sent over TLS, and never logged.

use std::time::Duration;

use http_body_util::Full;
use hyper::Method;
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::json;
use zeroize::Zeroizing;

use super::auth::AccessToken;
use super::error::{Call, GraphError};
use super::http::{Answer, Https};
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
        let body =
            request_body(&Validate { use_saved_credentials: false, credentials: credentials(base_address, token) });
        let path = format!("servicePrincipals/{sp}/synchronization/jobs/{job}/validateCredentials");
        self.call(Call::ValidateCredentials, Method::POST, &path, Some(body), VALIDATE_TIMEOUT)
            .await
            .map_err(|e| e.redacted(token))
            .map(drop)
    }

    /// `PUT .../synchronization/secrets` with the base address and the token together (whether a PUT
    /// of the token alone keeps the saved base address is not documented).
    pub async fn put_secrets(&self, sp: &str, base_address: &str, token: &Token) -> Result<(), GraphError> {
        let body = request_body(&Secrets { value: credentials(base_address, token) });
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
        let body = request_body(&json!({ "criteria": { "resetScope": "QuarantineState" } }));
        let path = format!("servicePrincipals/{sp}/synchronization/jobs/{job}/restart");
        self.call(Call::Restart, Method::POST, &path, Some(body), CALL_TIMEOUT).await.map(drop)
    }

    /// One call; the answer's body on 2xx, Graph's error otherwise.
    async fn call(
        &self,
        call: Call,
        method: Method,
        path: &str,
        body: Option<Zeroizing<Vec<u8>>>,
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
        // The buffer itself, zeroed once the request is sent and dropped.
        let payload = body.map(Bytes::from_owner).unwrap_or_default();
        let request = request.body(Full::new(payload)).map_err(|e| GraphError::without_answer(call, e.to_string()))?;
        let answer = self.https.send(request, timeout).await.map_err(|e| GraphError::without_answer(call, e))?;
        if (200..300).contains(&answer.status) { Ok(answer.body) } else { Err(refused(call, &answer, self.access)) }
    }
}

/// Graph's error answer, with the access token the request carried removed from it.
fn refused(call: Call, answer: &Answer, access: &AccessToken) -> GraphError {
    GraphError::from_answer(call, answer.status, answer.retry_after, &answer.body).without(&[access.expose()])
}

/// A `synchronizationSecretKeyStringValuePair`, borrowed: serialized straight into the request body,
/// with no copy of the token in between.
#[derive(Serialize)]
struct Pair<'a> {
    key: &'static str,
    value: &'a str,
}

/// The body of `validateCredentials`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Validate<'a> {
    use_saved_credentials: bool,
    credentials: [Pair<'a>; 2],
}

/// The body of `PUT .../synchronization/secrets`.
#[derive(Serialize)]
struct Secrets<'a> {
    value: [Pair<'a>; 2],
}

/// BaseAddress and SecretToken.
fn credentials<'a>(base_address: &'a str, token: &'a Token) -> [Pair<'a>; 2] {
    [Pair { key: "BaseAddress", value: base_address }, Pair { key: "SecretToken", value: token.expose() }]
}

/// Largest request body: two short keys, a base address and a token, with room for JSON's escapes.
const MAX_REQUEST: usize = 16 * 1024;

/// A request body in memory zeroed on drop, allocated once: a growing buffer would leave copies of
/// the token in freed memory.
fn request_body(value: &impl Serialize) -> Zeroizing<Vec<u8>> {
    let mut body = Zeroizing::new(Vec::with_capacity(MAX_REQUEST));
    serde_json::to_writer(&mut *body, value).expect("a request body serializes");
    body
}

/// A 2xx answer's body as `T`. What serde says of a body that does not fit is left out: it quotes
/// the values it could not read.
fn parse<T: serde::de::DeserializeOwned>(call: Call, body: &[u8]) -> Result<T, GraphError> {
    serde_json::from_slice(body).map_err(|e| {
        GraphError::without_answer(
            call,
            format!("unexpected answer ({:?} at line {} column {})", e.classify(), e.line(), e.column()),
        )
    })
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
    fn request_bodies_carry_base_address_and_secret_token_in_one_allocation() {
        let token = Token::generate();
        let base = "https://scim.example.com/scim/v2?tenant=\"a\"";
        let body = request_body(&Validate { use_saved_credentials: false, credentials: credentials(base, &token) });
        assert_eq!(body.capacity(), MAX_REQUEST, "no reallocation left a copy of the token behind");
        let pairs = serde_json::json!([
            { "key": "BaseAddress", "value": base },
            { "key": "SecretToken", "value": token.expose() },
        ]);
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(sent, serde_json::json!({ "useSavedCredentials": false, "credentials": pairs }));
        let body = request_body(&Secrets { value: credentials(base, &token) });
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap(), serde_json::json!({ "value": pairs }));
        // The longest base address the CRD admits, every byte escaped, still fits.
        let worst = "\u{1}".repeat(2048);
        let body = request_body(&Secrets { value: credentials(&worst, &token) });
        assert_eq!(body.capacity(), MAX_REQUEST);
    }

    #[test]
    fn an_answer_that_does_not_parse_is_not_quoted() {
        // A secrets list whose values are not masked, in an unexpected shape.
        let e = parse::<Vec<Job>>(Call::GetSecrets, br#"[{"id":"j","status":"scim_plaintext"}]"#).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("scim_plaintext"), "{e}");
        assert!(e.message.starts_with("unexpected answer (Data at line 1"), "{e}");
    }

    #[test]
    fn an_error_answer_that_echoes_the_access_token_does_not_carry_it() {
        let (access, _) =
            super::super::auth::token_answer(br#"{"access_token":"eyJ0eXAiOiJKV1QifQ.access.sig"}"#).unwrap();
        let body = br#"{"error":{"code":"InvalidAuthenticationToken","message":"token eyJ0eXAiOiJKV1QifQ.access.sig is expired"}}"#;
        let answer = Answer { status: 401, retry_after: None, body: Bytes::from_static(body) };
        let e = refused(Call::ListJobs, &answer, &access);
        assert_eq!(e.code.as_deref(), Some("InvalidAuthenticationToken"));
        assert!(!format!("{e} {e:?}").contains("access.sig"), "{e}");
    }
}
