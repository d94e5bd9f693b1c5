//! What the double remembers: applications and their credentials, access tokens, service principals
//! with their saved synchronization secrets and one job, injected faults, and the call records. Names
//! of properties and enum members are those of the Graph v1.0 metadata excerpt
//! (`synchronizationStatus`, `synchronizationQuarantine`, `synchronizationTaskExecution`, ...).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::jiff::{Timestamp, Unit};
use serde_json::{Value, json};

/// How an application proves itself at the token endpoint.
#[derive(Clone)]
pub enum AppCredential {
    /// `client_secret=<this>`.
    ClientSecret(String),
    /// `client_assertion=<this>` (the exact JWT, e.g. the projected ServiceAccount token's file
    /// content) with `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`.
    FederatedToken(String),
}

/// The calls a fault can be injected into, and the calls recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// `POST {authority}{tenant}/oauth2/v2.0/token`
    Token,
    /// `POST .../jobs/{jobId}/validateCredentials`
    ValidateCredentials,
    /// `PUT .../synchronization/secrets`
    PutSecrets,
    /// `GET .../synchronization/secrets`
    GetSecrets,
    /// `GET .../synchronization/jobs`
    ListJobs,
    /// `GET .../synchronization/jobs/{jobId}`
    GetJob,
    /// `POST .../jobs/{jobId}/restart`
    Restart,
    /// `POST .../jobs/{jobId}/start` or `/pause`
    StartPause,
    /// Anything else (answered 400 or 405 as Graph does for an unknown segment).
    Other,
}

/// A failure the double answers instead of the real answer, for the next `times` matching calls.
/// It wins over every other answer, a missing access token's 401 included.
#[derive(Clone, Debug)]
pub struct Fault {
    pub call: Call,
    /// 401, 403, 404, 429, 500, 503 (any status is answered; these get Graph's matching error code).
    pub status: u16,
    /// Sent as `Retry-After: <seconds>`.
    pub retry_after: Option<u64>,
    pub times: u32,
    /// The call takes effect first (e.g. the secrets are saved), then the fault is answered: a
    /// response lost after the service acted.
    pub after_effect: bool,
}

impl Fault {
    /// The next matching call answers `status`; once, no Retry-After, before any effect.
    pub fn new(call: Call, status: u16) -> Fault {
        Fault { call, status, retry_after: None, times: 1, after_effect: false }
    }

    pub fn retry_after(mut self, seconds: u64) -> Fault {
        self.retry_after = Some(seconds);
        self
    }

    pub fn times(mut self, times: u32) -> Fault {
        self.times = times;
        self
    }

    pub fn after_effect(mut self) -> Fault {
        self.after_effect = true;
        self
    }
}

/// One call to the double: never a body, never a token, never a query string.
#[derive(Clone, Debug)]
pub struct CallRecord {
    pub call: Call,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub at: SystemTime,
    /// The application that made the call, when it authenticated (token endpoint: the `client_id`
    /// it named; Graph: the access token's application).
    pub client_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutionKind {
    /// `validateCredentials` called the SCIM endpoint.
    Validation,
    /// A provisioning cycle called it with the saved credentials.
    Cycle,
}

/// One request the double (as Entra) made to a SCIM endpoint.
#[derive(Clone, Debug)]
pub struct Execution {
    pub kind: ExecutionKind,
    /// `support::sha256` of the SecretToken sent as the bearer token.
    pub token_sha256: String,
    /// The SCIM endpoint's HTTP status; `None` when it could not be reached (TLS, connect, timeout).
    pub scim_status: Option<u16>,
    pub succeeded: bool,
    pub at: SystemTime,
}

/// `synchronizationTaskExecution`, kept as Graph returns it.
#[derive(Clone)]
pub struct TaskExecution {
    pub time_began: Timestamp,
    pub time_ended: Timestamp,
    pub succeeded: bool,
    pub error: Option<(String, String)>,
}

impl TaskExecution {
    pub fn json(&self) -> Value {
        json!({
            "activityIdentifier": null,
            "countEntitled": 0,
            "countEntitledForProvisioning": 0,
            "countEscrowed": 0,
            "countEscrowedRaw": 0,
            "countExported": 0,
            "countExports": 0,
            "countImported": 0,
            "countImportedDeltas": 0,
            "countImportedReferenceDeltas": 0,
            "error": self.error.as_ref().map(|(code, message)| sync_error(code, message)),
            "state": if self.succeeded { "Succeeded" } else { "Failed" },
            "timeBegan": stamp(self.time_began),
            "timeEnded": stamp(self.time_ended),
        })
    }
}

/// `synchronizationQuarantine`.
#[derive(Clone)]
pub struct Quarantine {
    pub current_began: Timestamp,
    pub next_attempt: Timestamp,
    pub reason: &'static str,
    pub series_began: Timestamp,
    pub series_count: i64,
    pub error: (String, String),
}

pub fn sync_error(code: &str, message: &str) -> Value {
    json!({ "code": code, "message": message, "tenantActionable": true })
}

/// Graph's `Edm.DateTimeOffset` form, to the millisecond.
pub fn stamp(t: Timestamp) -> String {
    t.round(Unit::Millisecond).unwrap_or(t).to_string()
}

/// The value Graph returns for a non-nullable date that never happened.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

pub struct Job {
    pub id: String,
    pub paused: bool,
    pub last_execution: Option<TaskExecution>,
    pub last_successful_execution: Option<TaskExecution>,
    pub successive_failures: i64,
    pub quarantine: Option<Quarantine>,
    pub quarantine_next: bool,
    pub steady_first: Option<Timestamp>,
    pub steady_last: Option<Timestamp>,
    pub next_cycle: Option<Instant>,
}

pub struct ServicePrincipal {
    pub tenant: String,
    pub owner_client_id: String,
    pub job: Job,
    /// Saved `synchronizationSecretKeyStringValuePair`s (key, value), as the last PUT set them.
    pub secrets: Vec<(String, String)>,
    /// sha256 of each PUT's SecretToken, in order.
    pub puts: Vec<String>,
    pub executions: Vec<Execution>,
}

impl ServicePrincipal {
    pub fn secret(&self, key: &str) -> Option<&str> {
        self.secrets.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `synchronizationStatusCode`: the double's reading of it (the contract names the members, not
    /// when each applies): no saved credentials → NotConfigured; paused → Paused; in quarantine →
    /// Quarantine; saved but never run → NotRun; otherwise Active.
    pub fn code(&self) -> &'static str {
        if self.job.quarantine.is_some() {
            "Quarantine"
        } else if self.job.paused {
            "Paused"
        } else if self.secrets.is_empty() {
            "NotConfigured"
        } else if self.job.last_execution.is_none() {
            "NotRun"
        } else {
            "Active"
        }
    }

    /// `synchronizationStatus`.
    pub fn status_json(&self) -> Value {
        let job = &self.job;
        json!({
            "code": self.code(),
            "countSuccessiveCompleteFailures": job.successive_failures,
            "escrowsPruned": false,
            "lastExecution": job.last_execution.as_ref().map(TaskExecution::json),
            "lastSuccessfulExecution": job.last_successful_execution.as_ref().map(TaskExecution::json),
            "lastSuccessfulExecutionWithExports": null,
            "progress": [],
            "quarantine": job.quarantine.as_ref().map(|q| json!({
                "currentBegan": stamp(q.current_began),
                "error": sync_error(&q.error.0, &q.error.1),
                "nextAttempt": stamp(q.next_attempt),
                "reason": q.reason,
                "seriesBegan": stamp(q.series_began),
                "seriesCount": q.series_count,
            })),
            "steadyStateFirstAchievedTime": job.steady_first.map(stamp).unwrap_or_else(|| NEVER.to_owned()),
            "steadyStateLastAchievedTime": job.steady_last.map(stamp).unwrap_or_else(|| NEVER.to_owned()),
            "synchronizedEntryCountByType": [],
            "troubleshootingUrl": null,
        })
    }

    /// `synchronizationJob`.
    pub fn job_json(&self, cycle: Option<Duration>) -> Value {
        let interval = cycle.map(|d| format!("PT{}S", d.as_secs().max(1))).unwrap_or_else(|| "PT40M".to_owned());
        json!({
            "id": self.job.id,
            "templateId": "scim",
            "schedule": {
                "expiration": null,
                "interval": interval,
                "state": if self.job.paused { "Paused" } else { "Active" },
            },
            "status": self.status_json(),
            "synchronizationJobSettings": [],
        })
    }
}

pub struct AccessToken {
    pub tenant: String,
    pub client_id: String,
    pub expires: Instant,
}

#[derive(Default)]
pub struct State {
    /// (tenant, client_id) → credential.
    pub apps: BTreeMap<(String, String), AppCredential>,
    /// Applications granted `Synchronization.ReadWrite.All` in their tenant (else only the service
    /// principals they own, as `Application.ReadWrite.OwnedBy` allows).
    pub tenant_wide: BTreeSet<(String, String)>,
    /// sha256 of each access token issued → whose it is.
    pub access_tokens: BTreeMap<String, AccessToken>,
    pub sps: BTreeMap<String, ServicePrincipal>,
    pub faults: Vec<Fault>,
    pub calls: Vec<CallRecord>,
    pub cycle: Option<Duration>,
    /// Lifetime of new access tokens (`expires_in` stays 3599 as the contract shows; a test may
    /// shorten the real validity to see the operator fetch a new one on 401).
    pub access_token_lifetime: Option<Duration>,
}

impl State {
    /// Takes one use of the first fault injected for `call`.
    pub fn take_fault(&mut self, call: Call) -> Option<Fault> {
        let index = self.faults.iter().position(|f| f.call == call && f.times > 0)?;
        let fault = self.faults[index].clone();
        self.faults[index].times -= 1;
        if self.faults[index].times == 0 {
            self.faults.remove(index);
        }
        Some(fault)
    }
}

pub fn now() -> Timestamp {
    Timestamp::now()
}
