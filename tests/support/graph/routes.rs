//! The REST calls of the contract (shared specs README) and their answers: the identity platform's
//! token endpoint on one listener, Graph's synchronization API on the other.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{Value, json};

use super::Shared;
use super::state::{
    AccessToken, AppCredential, Call, CallRecord, Execution, ExecutionKind, Fault, State, TaskExecution, now, stamp,
};
use super::tls;
use crate::support::sha256;

pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Graph's JSON media type as it answers it.
const GRAPH_JSON: &str =
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8";
/// Members of `synchronizationSecret` (the CSDL excerpt): a PUT or a validation naming another key is
/// refused, as Graph refuses a value outside the enum.
const SECRET_KEYS: &[&str] = &[
    "None",
    "UserName",
    "Password",
    "SecretToken",
    "AppKey",
    "BaseAddress",
    "ClientIdentifier",
    "ClientSecret",
    "SingleSignOnType",
    "Sandbox",
    "Url",
    "Domain",
    "ConsumerKey",
    "ConsumerSecret",
    "TokenKey",
    "TokenExpiration",
    "Oauth2AccessToken",
    "Oauth2AccessTokenCreationTime",
    "Oauth2RefreshToken",
    "SyncAll",
    "InstanceName",
    "Oauth2ClientId",
    "Oauth2ClientSecret",
    "CompanyId",
    "UpdateKeyOnSoftDelete",
    "SynchronizationSchedule",
    "SystemOfRecord",
    "SandboxName",
    "EnforceDomain",
    "SyncNotificationSettings",
    "SkipOutOfScopeDeletions",
    "Oauth2AuthorizationCode",
    "Oauth2RedirectUri",
    "ApplicationTemplateIdentifier",
    "Oauth2TokenExchangeUri",
    "Oauth2AuthorizationUri",
    "AuthenticationType",
    "Server",
    "PerformInboundEntitlementGrants",
    "HardDeletesEnabled",
    "SyncAgentCompatibilityKey",
    "SyncAgentADContainer",
    "ValidateDomain",
    "TestReferences",
    "ConnectionString",
];
/// Members of `synchronizationJobRestartScope` (a flags enum: OData writes several as "A, B").
const RESTART_SCOPES: &[&str] =
    &["None", "ConnectorDataStore", "Escrows", "Watermark", "QuarantineState", "Full", "ForceDeletes"];

/// How every access token the double issues begins (then 64 hex digits): what a log scan looks for.
pub const ACCESS_TOKEN_PREFIX: &str = "gd1.";

/// The error code a failed credential test carries (validateCredentials' 400, a cycle's
/// `synchronizationError`): not in the contract; the code Microsoft's support answers name for
/// Entra's provisioning refused by the SCIM endpoint's credential check. The double's choice.
pub const CREDENTIAL_FAILURE: &str = "SystemForCrossDomainIdentityManagementCredentialValidationFailure";
/// The same when the SCIM endpoint cannot be reached (TLS, connect, timeout): the double's choice.
pub const UNREACHABLE: &str = "SystemForCrossDomainIdentityManagementServiceUnavailable";

#[derive(Clone, Copy, Debug)]
pub enum Listener {
    Graph,
    Authority,
}

pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<(&'static str, String)>,
}

impl Answer {
    fn no_content() -> Answer {
        Answer { status: 204, headers: vec![], body: None }
    }

    fn json(status: u16, value: Value) -> Answer {
        Answer { status, headers: vec![], body: Some((GRAPH_JSON, value.to_string())) }
    }
}

fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Graph's error shape: `{"error": {"code", "message", "innerError": {"request-id", "date"}}}`.
pub fn graph_error(status: u16, code: &str, message: &str) -> Answer {
    let request_id = uuid();
    let mut answer = Answer::json(
        status,
        json!({ "error": {
            "code": code,
            "message": message,
            "innerError": { "date": stamp(now()), "request-id": request_id, "client-request-id": request_id },
        }}),
    );
    answer.headers.push(("request-id", request_id));
    if status == 401 {
        // What Graph sends with a 401 (the identity platform's authorize endpoint and Graph's app id).
        answer.headers.push((
            "www-authenticate",
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", \
             client_id=\"00000003-0000-0000-c000-000000000000\""
                .to_owned(),
        ));
    }
    answer
}

/// Graph's code for a status the double answers by fault injection.
fn graph_fault(fault: &Fault) -> Answer {
    let (code, message) = match fault.status {
        400 => ("BadRequest", "Bad request (injected)."),
        401 => ("InvalidAuthenticationToken", "Access token validation failure (injected)."),
        403 => ("Authorization_RequestDenied", "Insufficient privileges to complete the operation (injected)."),
        404 => ("Request_ResourceNotFound", "Resource does not exist (injected)."),
        429 => ("TooManyRequests", "Too many requests, please retry later (injected)."),
        500 => ("generalException", "An unspecified error has occurred (injected)."),
        503 => ("serviceNotAvailable", "The service is temporarily unavailable (injected)."),
        _ => ("UnknownError", "Injected failure."),
    };
    with_retry_after(graph_error(fault.status, code, message), fault)
}

fn with_retry_after(mut answer: Answer, fault: &Fault) -> Answer {
    if let Some(seconds) = fault.retry_after {
        answer.headers.push(("retry-after", seconds.to_string()));
    }
    answer
}

/// The identity platform's OAuth error shape (`error`, `error_description` starting with the
/// AADSTS code, `error_codes`, `timestamp`, `trace_id`, `correlation_id`, `error_uri`).
fn identity_error(status: u16, error: &str, aadsts: u32, message: &str) -> Answer {
    let (trace, correlation, timestamp) = (uuid(), uuid(), stamp(now()));
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{aadsts}: {message} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"
        ),
        "error_codes": [aadsts],
        "timestamp": timestamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}"),
    });
    Answer { status, headers: vec![], body: Some(("application/json; charset=utf-8", body.to_string())) }
}

fn identity_fault(fault: &Fault) -> Answer {
    let answer = match fault.status {
        400 => identity_error(400, "invalid_request", 900144, "Injected bad request."),
        401 => identity_error(401, "invalid_client", 7000215, "Invalid client secret provided (injected)."),
        429 => identity_error(429, "temporarily_unavailable", 50196, "The server is busy (injected)."),
        s if s >= 500 => {
            identity_error(s, "temporarily_unavailable", 90033, "A transient error has occurred (injected).")
        }
        s => identity_error(s, "invalid_request", 90000, "Injected failure."),
    };
    with_retry_after(answer, fault)
}

/// Entry point: reads the whole body (bounded), answers, records and logs method, path and status.
pub async fn handle(
    shared: Arc<Shared>,
    listener: Listener,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let authorization =
        request.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned).unwrap_or_default();
    let body = match Limited::new(request.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let (call, client_id, answer) = match listener {
        Listener::Authority => token(&shared, &method, &path, &body),
        Listener::Graph => graph(&shared, &method, &path, &authorization, &body).await,
    };
    shared.record(CallRecord { call, method, path, status: answer.status, at: SystemTime::now(), client_id });
    let mut response = Response::builder().status(answer.status);
    for (k, v) in &answer.headers {
        response = response.header(*k, v);
    }
    let body = match answer.body {
        Some((content_type, text)) => {
            response = response.header("content-type", content_type);
            Bytes::from(text)
        }
        None => Bytes::new(),
    };
    Ok(response.body(Full::new(body)).unwrap())
}

/// `POST /{tenant}/oauth2/v2.0/token`, client credentials with a secret or a federated assertion.
fn token(shared: &Shared, method: &str, path: &str, body: &[u8]) -> (Call, Option<String>, Answer) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let tenant = match segments.as_slice() {
        [tenant, "oauth2", "v2.0", "token"] => *tenant,
        _ => return (Call::Other, None, identity_error(404, "invalid_request", 90000, "Unknown endpoint.")),
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let client_id = field("client_id").map(str::to_owned);
    let mut state = shared.state.lock().unwrap();
    if let Some(fault) = state.take_fault(Call::Token) {
        return (Call::Token, client_id, identity_fault(&fault));
    }
    if method != "POST" {
        return (
            Call::Token,
            client_id,
            identity_error(405, "invalid_request", 900561, "The endpoint only accepts POST requests."),
        );
    }
    let answer = issue_token(&mut state, tenant, &field);
    (Call::Token, client_id, answer)
}

fn issue_token<'a>(state: &mut State, tenant: &str, field: &dyn Fn(&str) -> Option<&'a str>) -> Answer {
    if field("grant_type") != Some("client_credentials") {
        return identity_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.");
    }
    let known_tenant = state.apps.keys().any(|(t, _)| t == tenant) || state.sps.values().any(|sp| sp.tenant == tenant);
    if !known_tenant {
        return identity_error(400, "invalid_request", 90002, &format!("Tenant '{tenant}' not found."));
    }
    let Some(client_id) = field("client_id") else {
        return identity_error(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        );
    };
    let Some(credential) = state.apps.get(&(tenant.to_owned(), client_id.to_owned())) else {
        return identity_error(
            400,
            "unauthorized_client",
            700016,
            &format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'."),
        );
    };
    if field("scope") != Some(GRAPH_SCOPE) {
        return identity_error(400, "invalid_scope", 1002012, "The provided value for scope is not valid.");
    }
    let secret = field("client_secret");
    let assertion = field("client_assertion");
    if secret.is_none() && assertion.is_none() {
        return identity_error(
            401,
            "invalid_client",
            7000216,
            "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
        );
    }
    let accepted = match credential {
        AppCredential::ClientSecret(expected) => secret == Some(expected.as_str()),
        AppCredential::FederatedToken(expected) => {
            field("client_assertion_type") == Some(JWT_BEARER) && assertion == Some(expected.as_str())
        }
    };
    if !accepted {
        return match credential {
            AppCredential::ClientSecret(_) => {
                identity_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
            }
            AppCredential::FederatedToken(_) => identity_error(
                400,
                "invalid_request",
                70021,
                "No matching federated identity record found for presented assertion.",
            ),
        };
    }
    let access_token = format!("{ACCESS_TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
    let lifetime = state.access_token_lifetime.unwrap_or(Duration::from_secs(3599));
    state.access_tokens.insert(
        sha256(&access_token),
        AccessToken { tenant: tenant.to_owned(), client_id: client_id.to_owned(), expires: Instant::now() + lifetime },
    );
    Answer {
        status: 200,
        headers: vec![("cache-control", "no-store, no-cache".to_owned())],
        body: Some((
            "application/json; charset=utf-8",
            json!({ "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": access_token })
                .to_string(),
        )),
    }
}

/// What a Graph path names.
enum Target<'a> {
    Secrets,
    Jobs,
    Job(&'a str),
    Action(&'a str, &'a str),
}

fn classify<'a>(method: &str, path: &'a str) -> Option<(&'a str, Target<'a>, Call)> {
    let rest = path.strip_prefix("/v1.0/servicePrincipals/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (sp, target) = match segments.as_slice() {
        [sp, "synchronization", "secrets"] => (*sp, Target::Secrets),
        [sp, "synchronization", "jobs"] => (*sp, Target::Jobs),
        [sp, "synchronization", "jobs", job] => (*sp, Target::Job(job)),
        [sp, "synchronization", "jobs", job, action] => (*sp, Target::Action(job, action)),
        _ => return None,
    };
    let call = match (&target, method) {
        (Target::Secrets, "PUT") => Call::PutSecrets,
        (Target::Secrets, "GET") => Call::GetSecrets,
        (Target::Jobs, "GET") => Call::ListJobs,
        (Target::Job(_), "GET") => Call::GetJob,
        (Target::Action(_, "validateCredentials"), "POST") => Call::ValidateCredentials,
        (Target::Action(_, "restart"), "POST") => Call::Restart,
        (Target::Action(_, "start" | "pause"), "POST") => Call::StartPause,
        _ => Call::Other,
    };
    Some((sp, target, call))
}

async fn graph(
    shared: &Shared,
    method: &str,
    path: &str,
    authorization: &str,
    body: &[u8],
) -> (Call, Option<String>, Answer) {
    let Some((sp_id, target, call)) = classify(method, path) else {
        return (Call::Other, None, graph_error(400, "BadRequest", "Resource not found for the segment."));
    };
    // Checks under the lock; validateCredentials then calls out without it.
    let (client_id, fault) = {
        let mut state = shared.state.lock().unwrap();
        let fault = state.take_fault(call);
        let client_id = match authorize(&state, sp_id, authorization) {
            Ok(client_id) => client_id,
            Err(answer) => {
                return match fault {
                    Some(f) => (call, None, graph_fault(&f)),
                    None => (call, None, answer),
                };
            }
        };
        if let Some(f) = fault.as_ref().filter(|f| !f.after_effect) {
            return (call, Some(client_id), graph_fault(f));
        }
        (client_id, fault)
    };
    let answer = match (call, &target) {
        (Call::Other, _) => graph_error(405, "Request_BadRequest", "The HTTP method is not allowed on this resource."),
        (Call::PutSecrets, _) => put_secrets(shared, sp_id, body),
        (Call::GetSecrets, _) => {
            let state = shared.state.lock().unwrap();
            let sp = &state.sps[sp_id];
            // A read never returns a value: every one is masked.
            let value: Vec<Value> = sp.secrets.iter().map(|(k, _)| json!({ "key": k, "value": "*" })).collect();
            Answer::json(200, json!({ "value": value }))
        }
        (Call::ListJobs, _) => {
            let state = shared.state.lock().unwrap();
            Answer::json(200, json!({ "value": [state.sps[sp_id].job_json(state.cycle)] }))
        }
        (_, Target::Job(job) | Target::Action(job, _)) if !job_exists(shared, sp_id, job) => {
            graph_error(404, "Request_ResourceNotFound", &format!("Job '{job}' does not exist."))
        }
        (Call::GetJob, _) => {
            let state = shared.state.lock().unwrap();
            Answer::json(200, state.sps[sp_id].job_json(state.cycle))
        }
        (Call::ValidateCredentials, _) => validate_credentials(shared, sp_id, body).await,
        (Call::Restart, _) => restart(shared, sp_id, body),
        (Call::StartPause, Target::Action(_, action)) => {
            let mut state = shared.state.lock().unwrap();
            let job = &mut state.sps.get_mut(sp_id).unwrap().job;
            job.paused = *action == "pause";
            Answer::no_content()
        }
        _ => graph_error(400, "BadRequest", "Resource not found for the segment."),
    };
    match fault {
        Some(f) => (call, Some(client_id), graph_fault(&f)),
        None => (call, Some(client_id), answer),
    }
}

fn job_exists(shared: &Shared, sp_id: &str, job: &str) -> bool {
    shared.state.lock().unwrap().sps[sp_id].job.id == job
}

/// 401 without a valid access token, 404 for a service principal the token's tenant does not have,
/// 403 when the application neither owns it nor holds a tenant-wide grant. Returns the client id.
fn authorize(state: &State, sp_id: &str, authorization: &str) -> Result<String, Answer> {
    let Some(token) = authorization.strip_prefix("Bearer ").filter(|t| !t.is_empty()) else {
        return Err(graph_error(401, "InvalidAuthenticationToken", "Access token is empty."));
    };
    let Some(access) = state.access_tokens.get(&sha256(token)) else {
        return Err(graph_error(401, "InvalidAuthenticationToken", "Access token validation failure."));
    };
    if access.expires <= Instant::now() {
        return Err(graph_error(
            401,
            "InvalidAuthenticationToken",
            "Lifetime validation failed, the token is expired.",
        ));
    }
    let sp = state.sps.get(sp_id).filter(|sp| sp.tenant == access.tenant).ok_or_else(|| {
        graph_error(
            404,
            "Request_ResourceNotFound",
            &format!(
                "Resource '{sp_id}' does not exist or one of its queried reference-property objects are not present."
            ),
        )
    })?;
    let owner = sp.owner_client_id == access.client_id;
    if !owner && !state.tenant_wide.contains(&(access.tenant.clone(), access.client_id.clone())) {
        return Err(graph_error(
            403,
            "Authorization_RequestDenied",
            "Insufficient privileges to complete the operation.",
        ));
    }
    Ok(access.client_id.clone())
}

/// `[{key, value}, ...]` from a body's array, keys checked against `synchronizationSecret`.
fn secret_pairs(value: Option<&Value>) -> Result<Vec<(String, String)>, Answer> {
    let bad = |message: &str| graph_error(400, "BadRequest", message);
    let items = value.and_then(Value::as_array).ok_or_else(|| bad("Expected an array of key/value pairs."))?;
    let mut pairs = Vec::new();
    for item in items {
        let key = item.get("key").and_then(Value::as_str).ok_or_else(|| bad("A pair has no key."))?;
        if !SECRET_KEYS.contains(&key) {
            return Err(bad(&format!("'{key}' is not a member of synchronizationSecret.")));
        }
        let value = item.get("value").and_then(Value::as_str).unwrap_or_default();
        pairs.push((key.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

/// PUT replaces the saved set with the body's (the contract leaves open whether a PUT keeps keys it
/// does not name; the double keeps none, the strict reading).
fn put_secrets(shared: &Shared, sp_id: &str, body: &[u8]) -> Answer {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return graph_error(400, "BadRequest", "The request body is not valid JSON.");
    };
    let pairs = match secret_pairs(value.get("value")) {
        Ok(pairs) => pairs,
        Err(answer) => return answer,
    };
    let mut state = shared.state.lock().unwrap();
    let sp = state.sps.get_mut(sp_id).unwrap();
    if let Some((_, token)) = pairs.iter().find(|(k, _)| k == "SecretToken") {
        sp.puts.push(sha256(token));
    }
    sp.secrets = pairs;
    Answer::no_content()
}

/// Calls `{BaseAddress}/Users` with `Authorization: Bearer <SecretToken>` over HTTPS, trusting only the
/// double's CA. The contract does not say which request Entra sends; the double's choice is a filter
/// for a user that does not exist (the query Entra makes before creating one). Returns the SCIM
/// status, or what kept the request from being answered.
pub async fn call_scim(shared: &Shared, base: &str, token: &str) -> Result<u16, String> {
    if !base.starts_with("https://") {
        return Err("the BaseAddress is not an https URL".to_owned());
    }
    let filter: String =
        form_urlencoded::byte_serialize(format!("userName eq \"graph-double-probe-{}\"", uuid()).as_bytes()).collect();
    let url = format!("{}/Users?filter={filter}", base.trim_end_matches('/'));
    let authorization = format!("Bearer {token}");
    let request = tls::Request {
        method: "GET",
        url: &url,
        headers: &[("authorization", &authorization), ("accept", "application/scim+json")],
        body: None,
    };
    tls::send(shared.client.clone(), request, Duration::from_secs(10)).await.map(|r| r.status)
}

/// `validateCredentials`: 204 when the SCIM endpoint answers 2xx to the given (or saved) credentials.
/// The contract does not say what Graph answers otherwise. The double's choice: 400 with the code
/// [`CREDENTIAL_FAILURE`] (or [`UNREACHABLE`]) and the SCIM status in the message.
async fn validate_credentials(shared: &Shared, sp_id: &str, body: &[u8]) -> Answer {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return graph_error(400, "BadRequest", "The request body is not valid JSON.");
    };
    let use_saved = value.get("useSavedCredentials").and_then(Value::as_bool).unwrap_or(false);
    let pairs = if use_saved {
        shared.state.lock().unwrap().sps[sp_id].secrets.clone()
    } else {
        match secret_pairs(value.get("credentials")) {
            Ok(pairs) => pairs,
            Err(answer) => return answer,
        }
    };
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let (Some(base), Some(token)) = (get("BaseAddress"), get("SecretToken")) else {
        return graph_error(400, "BadRequest", "The credentials must include BaseAddress and SecretToken.");
    };
    let result = call_scim(shared, &base, &token).await;
    let succeeded = matches!(result, Ok(200..=299));
    shared.execution(
        sp_id,
        Execution {
            kind: ExecutionKind::Validation,
            token_sha256: sha256(&token),
            scim_status: result.as_ref().ok().copied(),
            succeeded,
            at: SystemTime::now(),
        },
    );
    match result {
        _ if succeeded => Answer::no_content(),
        Ok(status) => graph_error(
            400,
            CREDENTIAL_FAILURE,
            &format!("Error validating credentials: the SCIM endpoint answered HTTP {status} to GET /Users."),
        ),
        Err(why) => graph_error(
            400,
            UNREACHABLE,
            &format!("Error validating credentials: the SCIM endpoint could not be reached ({why})."),
        ),
    }
}

/// `restart` with `criteria.resetScope`: a scope including `QuarantineState` (or `Full`) takes the job
/// out of quarantine and starts a cycle now; other scopes only start a cycle (the double keeps no
/// escrows, watermark or connector data to reset).
fn restart(shared: &Shared, sp_id: &str, body: &[u8]) -> Answer {
    let value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v,
            Err(_) => return graph_error(400, "BadRequest", "The request body is not valid JSON."),
        }
    };
    let scope = value.pointer("/criteria/resetScope").and_then(Value::as_str).unwrap_or("None");
    let members: Vec<&str> = scope.split(',').map(str::trim).collect();
    if let Some(bad) = members.iter().find(|m| !RESTART_SCOPES.contains(m)) {
        return graph_error(400, "BadRequest", &format!("'{bad}' is not a member of synchronizationJobRestartScope."));
    }
    let mut state = shared.state.lock().unwrap();
    let job = &mut state.sps.get_mut(sp_id).unwrap().job;
    if members.iter().any(|m| matches!(*m, "QuarantineState" | "Full")) {
        job.quarantine = None;
        job.successive_failures = 0;
    }
    job.next_cycle = Some(Instant::now());
    Answer::no_content()
}

/// One provisioning cycle of `sp_id` with the saved credentials (see `super::cycle_loop`).
pub async fn run_cycle(shared: &Shared, sp_id: &str, base: String, token: String, quarantine_now: bool) {
    let began = now();
    let result = call_scim(shared, &base, &token).await;
    let ended = now();
    let succeeded = matches!(result, Ok(200..=299)) && !quarantine_now;
    shared.execution(
        sp_id,
        Execution {
            kind: ExecutionKind::Cycle,
            token_sha256: sha256(&token),
            scim_status: result.as_ref().ok().copied(),
            succeeded,
            at: SystemTime::now(),
        },
    );
    let error = match (&result, quarantine_now) {
        (_, true) => {
            Some(("QuarantinedOnDemand".to_owned(), "The job was quarantined on demand (test double).".to_owned()))
        }
        (Ok(200..=299), false) => None,
        // The provisioning service's error codes for a refused credential and for an unexpected
        // answer (Microsoft's provisioning logs reference); which one Entra records is not in the contract.
        (Ok(401 | 403), false) => Some((
            CREDENTIAL_FAILURE.to_owned(),
            format!("The SCIM endpoint refused the saved credentials (HTTP {}).", result.as_ref().unwrap()),
        )),
        (Ok(status), false) => Some((
            "SystemForCrossDomainIdentityManagementServiceIncompatible".to_owned(),
            format!("The SCIM endpoint answered HTTP {status}."),
        )),
        (Err(why), false) => Some((UNREACHABLE.to_owned(), format!("The SCIM endpoint could not be reached ({why})."))),
    };
    let execution = TaskExecution { time_began: began, time_ended: ended, succeeded, error: error.clone() };
    let mut state = shared.state.lock().unwrap();
    let Some(sp) = state.sps.get_mut(sp_id) else { return };
    let job = &mut sp.job;
    job.last_execution = Some(execution.clone());
    match error {
        None => {
            job.last_successful_execution = Some(execution);
            job.successive_failures = 0;
            job.steady_first.get_or_insert(ended);
            job.steady_last = Some(ended);
        }
        Some(error) => {
            job.successive_failures += 1;
            let reason = if quarantine_now {
                Some("QuarantinedOnDemand")
            } else if job.successive_failures >= super::QUARANTINE_AFTER {
                Some("EncounteredQuarantineException")
            } else {
                None
            };
            if let Some(reason) = reason {
                let series = job.quarantine.as_ref().map(|q| (q.series_began, q.series_count));
                let (series_began, series_count) = series.unwrap_or((ended, 0));
                job.quarantine = Some(super::state::Quarantine {
                    current_began: ended,
                    // Entra lowers a quarantined job's cycles to one a day.
                    next_attempt: ended.checked_add(k8s_openapi::jiff::SignedDuration::from_hours(24)).unwrap(),
                    reason,
                    series_began,
                    series_count: series_count + 1,
                    error,
                });
            }
        }
    }
}
