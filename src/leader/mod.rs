//! Leader election on a `coordination.k8s.io` Lease, as client-go's leaderelection does it, with a
//! write [`Fence`] that every write checks.
//!
//! The leader renews every retry period with a resourceVersion-guarded patch; it is leader while its
//! last confirmed renewal is younger than the renew deadline, and stops for good once it is not. A
//! replica takes over a Lease held by another only after a whole lease duration without seeing the
//! Lease change, measured on its own monotonic clock from when it saw the last change: clock skew
//! between nodes does not shorten that wait.

mod fence;
mod lifecycle;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{debug, warn};

pub use fence::{Fence, FenceLayer, Fenced, limited};
pub use lifecycle::{Leadership, acquire};

const FIELD_MANAGER: &str = "scim-token-operator-leader-election";

/// The Lease and its timing.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long others wait, after they last saw the Lease renewed, before they take it over.
    pub lease_duration: Duration,
    /// How long the leader goes on writing after its last confirmed renewal.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby tries to acquire.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Refuses timings under which two replicas could write at once, or a leader would not renew in time.
    pub fn validate(&self) -> Result<(), String> {
        let (lease, renew, retry) = (self.lease_duration, self.renew_deadline, self.retry_period);
        if lease < Duration::from_secs(1) || lease.subsec_nanos() != 0 {
            return Err(format!("the lease duration must be whole seconds, at least 1s (got {lease:?})"));
        }
        if renew >= lease {
            return Err(format!(
                "the renew deadline ({renew:?}) must be shorter than the lease duration ({lease:?}): the difference is \
                 what keeps a deposed leader's last writes ahead of a takeover"
            ));
        }
        if retry.is_zero() || retry >= renew {
            return Err(format!(
                "the retry period ({retry:?}) must be above zero and shorter than the renew deadline ({renew:?})"
            ));
        }
        Ok(())
    }
}

/// Why leadership ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    #[error("the Lease was not renewed within the renew deadline ({0:?})")]
    NotRenewed(Duration),
    #[error("the Lease is held by {0}")]
    TakenBy(String),
}

/// A Lease call that failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// Treated as any failed attempt; the call is abandoned (its connection with it).
    #[error("the API server did not answer within {0:?}")]
    TimedOut(Duration),
}

/// The outcome of one attempt to acquire or renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease; the fence was confirmed.
    Holding,
    /// Another replica holds it and renewed it within its lease duration.
    HeldBy(String),
    /// Someone wrote the Lease between our read and our write: look again next time.
    Contended,
}

pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    fence: Fence,
    /// The Lease's resourceVersion as last seen, and when it was first seen (client-go's observed time).
    observed: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(client: kube::Client, settings: LeaseSettings, fence: Fence) -> Elector {
        let api = Api::namespaced(client, &settings.namespace);
        Elector { api, settings, fence, observed: None }
    }

    /// Tries to acquire the Lease until it succeeds.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Holding) => return,
                Ok(attempt) => debug!(?attempt, "not the leader"),
                Err(e) => warn!(error = %e, "could not read or write the Lease"),
            }
            tokio::time::sleep(jittered(self.settings.retry_period)).await;
        }
    }

    /// Renews the Lease every retry period; returns (with the fence closed) once leadership is lost.
    pub async fn keep(&mut self) -> Lost {
        let lost = loop {
            tokio::time::sleep(self.settings.retry_period).await;
            // A leader past its deadline (e.g. resumed after a pause) steps down without asking: it
            // may already have been replaced, and its fence is closed anyway.
            if let Err(Fenced::Expired { .. }) = self.fence.check() {
                break Lost::NotRenewed(self.settings.renew_deadline);
            }
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Holding) => {}
                Ok(Attempt::HeldBy(other)) => break Lost::TakenBy(other),
                Ok(Attempt::Contended) => debug!("the Lease changed while being renewed; trying again"),
                Err(e) => {
                    warn!(error = %e, "could not renew the Lease");
                    // A call that timed out did so at the deadline: step down now, not a period later.
                    if let Err(Fenced::Expired { .. }) = self.fence.check() {
                        break Lost::NotRenewed(self.settings.renew_deadline);
                    }
                }
            }
        };
        self.fence.revoke();
        lost
    }

    /// Hands the Lease over (a graceful stop), so a standby need not wait for it to expire. Bounded by
    /// the renew deadline: a hung API server does not hold up the stop (the Lease then expires).
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        self.fence.revoke();
        let limit = self.settings.renew_deadline;
        tokio::time::timeout(limit, self.hand_over()).await.map_err(|_| LeaseError::TimedOut(limit))?
    }

    async fn hand_over(&mut self) -> Result<(), LeaseError> {
        let Some(lease) = self.api.get_opt(&self.settings.name).await? else { return Ok(()) };
        if holder(&lease) != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        // Every field null, as kube-lease-manager releases a Lease: a replica of a release that elects
        // with it, still running during a rolling update, then sees the Lease free too.
        let patch = json!({
            "metadata": { "resourceVersion": lease.metadata.resource_version },
            "spec": { "holderIdentity": null, "acquireTime": null, "renewTime": null, "leaseDurationSeconds": null },
        });
        self.api.patch(&self.settings.name, &PatchParams::default(), &Patch::Merge(patch)).await?;
        Ok(())
    }

    /// One round: read the Lease, and write ourselves in as holder if it is ours or free or expired;
    /// every call of it bounded by [`attempt_timeout`].
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaseError> {
        let limit = attempt_timeout(self.settings.renew_deadline, self.fence.time_left());
        match tokio::time::timeout(limit, self.attempt()).await {
            Ok(attempt) => Ok(attempt?),
            Err(_) => Err(LeaseError::TimedOut(limit)),
        }
    }

    async fn attempt(&mut self) -> Result<Attempt, kube::Error> {
        // Taken before anything is sent: a renewal counts from no later than when others can see it.
        let sent_at = Instant::now();
        let now = Timestamp::now();
        let Some(lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.settings.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.record(None, now)),
            };
            let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
            return match self.api.create(&params, &lease).await {
                Ok(created) => Ok(self.holding(&created, sent_at)),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Contended),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seen_at = self.observe(&version);
        let spec = lease.spec.clone().unwrap_or_default();
        if let Some(other) = holder(&lease).filter(|h| *h != self.settings.identity) {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.settings.lease_duration, Duration::from_secs);
            if held(seen_at, duration, Instant::now()) {
                return Ok(Attempt::HeldBy(other.to_string()));
            }
        }
        let patch = json!({
            "metadata": { "resourceVersion": version },
            "spec": self.record(Some(&spec), now),
        });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        match self.api.patch(&self.settings.name, &params, &Patch::Merge(patch)).await {
            Ok(written) => Ok(self.holding(&written, sent_at)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Contended),
            Err(e) => Err(e),
        }
    }

    fn holding(&mut self, written: &Lease, sent_at: Instant) -> Attempt {
        self.observe(written.metadata.resource_version.as_deref().unwrap_or_default());
        self.fence.confirm(sent_at);
        Attempt::Holding
    }

    /// When this version of the Lease was first seen.
    fn observe(&mut self, version: &str) -> Instant {
        match &self.observed {
            Some((seen, at)) if seen == version => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((version.to_string(), at));
                at
            }
        }
    }

    /// Our record: renewed now; acquired now unless we already held it.
    fn record(&self, current: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let ours = current.is_some_and(|c| c.holder_identity.as_deref() == Some(self.settings.identity.as_str()));
        let transitions = current.and_then(|c| c.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: i32::try_from(self.settings.lease_duration.as_secs()).ok(),
            acquire_time: if ours { current.and_then(|c| c.acquire_time.clone()) } else { Some(MicroTime(now)) },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if ours || current.is_none() { transitions } else { transitions + 1 }),
            ..LeaseSpec::default()
        }
    }
}

/// How long one attempt to acquire or renew may take, its Lease calls together (`time_left`: until
/// the fence would close, for a leader; `None` for a standby).
///
/// A leader waits until its fence would close, the renew deadline after the start of its last
/// confirmed renewal, and no longer: at that moment it stops being the leader anyway ("leader while its
/// last confirmed renewal is younger than the renew deadline"), so a call still hanging then would only
/// keep it from noticing while its writes are refused. Cutting it shorter (say at the retry period)
/// would instead turn a slow but working API server, e.g. one busy with this operator's own mass
/// issuance, into a lost leadership. A standby waits the renew deadline: an acquisition confirmed
/// later than that after it was sent would open a fence already closed. This is client-go's rule too
/// (its renew loop runs under a context with the renew deadline).
fn attempt_timeout(renew_deadline: Duration, time_left: Option<Duration>) -> Duration {
    time_left.map_or(renew_deadline, |left| left.min(renew_deadline))
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// Whether another replica's Lease, whose current version we first saw at `seen_at`, still holds.
fn held(seen_at: Instant, duration: Duration, now: Instant) -> bool {
    now.saturating_duration_since(seen_at) < duration
}

/// Up to 20% more, so standbys do not hit the API server in step (client-go's JitterFactor 1.2).
fn jittered(period: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    period + period.mul_f64(f64::from(nanos % 1000) / 5000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(lease: u64, renew: u64, retry: u64) -> LeaseSettings {
        LeaseSettings {
            name: "l".into(),
            namespace: "ns".into(),
            identity: "me".into(),
            lease_duration: Duration::from_millis(lease),
            renew_deadline: Duration::from_millis(renew),
            retry_period: Duration::from_millis(retry),
        }
    }

    #[test]
    fn timings_must_leave_a_margin_before_a_takeover() {
        assert_eq!(settings(15_000, 10_000, 2_000).validate(), Ok(()));
        for (lease, renew, retry, why) in [
            (15_000, 15_000, 2_000, "renew deadline"),
            (15_000, 20_000, 2_000, "renew deadline"),
            (15_000, 10_000, 10_000, "retry period"),
            (15_000, 10_000, 0, "retry period"),
            (15_500, 10_000, 2_000, "whole seconds"),
            (0, 0, 0, "whole seconds"),
        ] {
            let err = settings(lease, renew, retry).validate().unwrap_err();
            assert!(err.contains(why), "{lease}/{renew}/{retry}: {err}");
        }
    }

    #[test]
    fn another_holder_counts_from_when_its_lease_was_last_seen_changing() {
        let seen = Instant::now();
        let lease = Duration::from_secs(15);
        assert!(held(seen, lease, seen));
        assert!(held(seen, lease, seen + Duration::from_millis(14_999)));
        assert!(!held(seen, lease, seen + lease));
        // A clock that cannot go back: "now" before "seen" (read on another thread) still holds.
        assert!(held(seen + Duration::from_secs(1), lease, seen));
    }

    /// An API server for the Lease that answers or hangs as `hang(method, call number)` says.
    mod hanging {
        use super::*;
        use axum::http::{Method, Request, Response, StatusCode};
        use kube::client::Body;
        use std::sync::{Arc, Mutex};

        pub struct Calls(pub Arc<Mutex<Vec<Method>>>);

        impl Calls {
            pub fn list(&self) -> Vec<Method> {
                self.0.lock().unwrap().clone()
            }
        }

        /// A client whose Lease (held by "me", or absent) answers at once unless `hang` says otherwise.
        pub fn client(exists: bool, hang: fn(&Method, usize) -> bool) -> (kube::Client, Calls) {
            let calls = Arc::new(Mutex::new(Vec::new()));
            let seen = calls.clone();
            let service = tower::service_fn(move |request: Request<Body>| {
                let method = request.method().clone();
                let n = {
                    let mut calls = seen.lock().unwrap();
                    calls.push(method.clone());
                    calls.iter().filter(|m| **m == method).count()
                };
                async move {
                    if hang(&method, n) {
                        std::future::pending::<()>().await;
                    }
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some("l".into()),
                            resource_version: Some(format!("{n}")),
                            ..ObjectMeta::default()
                        },
                        spec: Some(LeaseSpec { holder_identity: Some("me".into()), ..LeaseSpec::default() }),
                    };
                    let response = if method == Method::GET && !exists {
                        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "NotFound", "code": 404, "message": "leases \"l\" not found"});
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Body::from(status.to_string().into_bytes()))
                    } else {
                        Response::builder().body(Body::from(serde_json::to_vec(&lease).unwrap()))
                    };
                    Ok::<_, tower::BoxError>(response.unwrap())
                }
            });
            (kube::Client::new(service, "ns"), Calls(calls))
        }
    }

    fn fast() -> LeaseSettings {
        LeaseSettings {
            lease_duration: Duration::from_secs(1),
            renew_deadline: Duration::from_millis(400),
            retry_period: Duration::from_millis(100),
            ..settings(0, 0, 0)
        }
    }

    #[tokio::test]
    async fn a_leader_whose_renewal_hangs_steps_down_at_its_renew_deadline() {
        // The Lease is read, and the renewal's patch never answers.
        let (client, calls) = hanging::client(true, |method, _| *method == axum::http::Method::PATCH);
        let fence = Fence::new(fast().renew_deadline);
        let mut elector = Elector::new(client, fast(), fence.clone());
        let started = Instant::now();
        fence.confirm(started);
        let lost = tokio::time::timeout(Duration::from_secs(5), elector.keep()).await;
        assert_eq!(lost, Ok(Lost::NotRenewed(fast().renew_deadline)), "noticed: {:?}", calls.list());
        let took = started.elapsed();
        // When the fence closed: not before, and not whenever the hung call might end (never).
        assert!(took >= fast().renew_deadline && took < Duration::from_secs(2), "{took:?}");
        assert_eq!(fence.check(), Err(Fenced::Revoked));
    }

    #[tokio::test]
    async fn a_standby_whose_call_hangs_tries_again() {
        // No Lease; the first read never answers, the next ones do, and the Lease is created.
        let (client, calls) = hanging::client(false, |method, n| *method == axum::http::Method::GET && n == 1);
        let fence = Fence::new(fast().renew_deadline);
        let mut elector = Elector::new(client, fast(), fence.clone());
        let acquired = tokio::time::timeout(Duration::from_secs(5), elector.acquire()).await;
        assert!(acquired.is_ok(), "stuck on the hung read: {:?}", calls.list());
        assert_eq!(calls.list(), [axum::http::Method::GET, axum::http::Method::GET, axum::http::Method::POST]);
        assert_eq!(fence.check(), Ok(()));
    }

    #[tokio::test]
    async fn releasing_does_not_hang_on_the_api_server() {
        let (client, _) = hanging::client(true, |method, _| *method == axum::http::Method::PATCH);
        let mut elector = Elector::new(client, fast(), Fence::new(fast().renew_deadline));
        let released = tokio::time::timeout(Duration::from_secs(5), elector.release()).await;
        let error = released.expect("bounded").expect_err("timed out");
        assert!(error.to_string().contains("did not answer within 400ms"), "{error}");
    }

    #[test]
    fn an_attempt_may_take_until_the_fence_would_close() {
        let deadline = Duration::from_secs(10);
        for (time_left, want) in [
            (None, deadline),
            (Some(Duration::from_secs(10)), deadline),
            (Some(Duration::from_millis(8_500)), Duration::from_millis(8_500)),
            (Some(Duration::ZERO), Duration::ZERO),
            (Some(Duration::from_secs(60)), deadline),
        ] {
            assert_eq!(attempt_timeout(deadline, time_left), want, "{time_left:?}");
        }
    }

    #[test]
    fn jitter_adds_at_most_a_fifth() {
        let period = Duration::from_secs(2);
        let j = jittered(period);
        assert!(j >= period && j <= period.mul_f64(1.2), "{j:?}");
    }
}
