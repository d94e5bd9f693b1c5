//! The write fence: a replica writes only while its last confirmed Lease renewal is recent enough.
//!
//! A Lease says who may write, but a leader learns it lost the Lease only when it next asks; a process
//! paused (SIGSTOP, a long GC, a frozen VM) past its Lease resumes with work in flight and caches that
//! are many seconds old. So every write asks the fence first: it is open while less than the renew
//! deadline has passed since the start of the last renewal the API server confirmed, measured on the
//! monotonic clock (`Instant` keeps running through a pause). Another replica takes over no earlier
//! than a full lease duration after it saw that renewal, so the fence closes `lease duration - renew
//! deadline` before a takeover can start: that margin covers a write checked just before it closed.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

// The http crate as kube's requests use it (one version in the tree; axum re-exports it).
use axum::http::{Method, Request};
use futures::TryFutureExt;
use futures::future::{Either, ErrInto, Ready, ready};
use tower::limit::ConcurrencyLimitLayer;
use tower::{BoxError, Layer, Service, ServiceBuilder};

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    #[error("leadership not confirmed: no Lease renewal yet")]
    NeverConfirmed,
    #[error("leadership lost: the Lease was last renewed {since:?} ago, beyond the renew deadline of {deadline:?}")]
    Expired { since: Duration, deadline: Duration },
    #[error("leadership lost or released")]
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    /// When the last renewal the API server confirmed was sent.
    confirmed: Option<Instant>,
    /// Closed for good: leadership was lost or released.
    revoked: bool,
}

/// Shared by the Lease loop (which confirms renewals) and every writer (which checks before a request).
#[derive(Debug, Clone)]
pub struct Fence {
    /// `None`: leader election is off, the fence is always open.
    renew_deadline: Option<Duration>,
    state: Arc<Mutex<State>>,
}

impl Fence {
    /// A fence that opens with the first confirmed renewal and closes `renew_deadline` after the last.
    pub fn new(renew_deadline: Duration) -> Fence {
        Fence {
            renew_deadline: Some(renew_deadline),
            state: Arc::new(Mutex::new(State { confirmed: None, revoked: false })),
        }
    }

    /// Without leader election nothing is fenced (a single replica is the only writer by configuration).
    pub fn open() -> Fence {
        Fence { renew_deadline: None, state: Arc::new(Mutex::new(State { confirmed: None, revoked: false })) }
    }

    /// A renewal (or the acquisition) sent at `sent_at` was confirmed by the API server.
    pub fn confirm(&self, sent_at: Instant) {
        let mut state = self.state.lock().expect("poisoned");
        *state = confirmed(*state, sent_at);
    }

    /// Closes the fence for good.
    pub fn revoke(&self) {
        self.state.lock().expect("poisoned").revoked = true;
    }

    /// How long the fence stays open without another confirmed renewal; `None` before the first one
    /// (and without leader election).
    pub fn time_left(&self) -> Option<Duration> {
        let deadline = self.renew_deadline?;
        time_left(*self.state.lock().expect("poisoned"), deadline, Instant::now())
    }

    /// Whether a write may be sent now.
    pub fn check(&self) -> Result<(), Fenced> {
        let Some(deadline) = self.renew_deadline else { return Ok(()) };
        check(*self.state.lock().expect("poisoned"), deadline, Instant::now())
    }
}

impl Fenced {
    /// The refusal inside an error of a client made with [`limited`]: its fence layer refused the write.
    pub fn in_kube_error(error: &kube::Error) -> Option<&Fenced> {
        match error {
            kube::Error::Service(e) => e.downcast_ref::<Fenced>(),
            _ => None,
        }
    }
}

/// The layers of the controller's client, outermost first: at most `max_inflight` requests at once,
/// then the fence. A write can wait for a permit for any length of time (32 in flight, each up to the
/// client's read timeout) and the fence may close meanwhile: so it is checked once the permit is held,
/// right before the request is sent, and not only by the controller before it asks to send.
pub fn limited(max_inflight: usize, fence: Fence) -> ServiceBuilder<RequestLayers> {
    ServiceBuilder::new().layer(ConcurrencyLimitLayer::new(max_inflight.max(1))).layer(FenceLayer { fence })
}

/// See [`limited`].
pub type RequestLayers = tower::layer::util::Stack<
    FenceLayer,
    tower::layer::util::Stack<ConcurrencyLimitLayer, tower::layer::util::Identity>,
>;

/// Refuses write requests (POST, PUT, PATCH, DELETE) while the fence is closed, with a [`Fenced`]
/// error ([`Fenced::in_kube_error`] finds it in the `kube::Error`); reads always pass.
#[derive(Debug, Clone)]
pub struct FenceLayer {
    fence: Fence,
}

impl<S> Layer<S> for FenceLayer {
    type Service = FenceService<S>;

    fn layer(&self, inner: S) -> FenceService<S> {
        FenceService { inner, fence: self.fence.clone() }
    }
}

/// See [`FenceLayer`].
#[derive(Debug, Clone)]
pub struct FenceService<S> {
    inner: S,
    fence: Fence,
}

impl<S, B> Service<Request<B>> for FenceService<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<ErrInto<S::Future, BoxError>, Ready<Result<S::Response, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if is_write(request.method())
            && let Err(fenced) = self.fence.check()
        {
            return Either::Right(ready(Err(Box::new(fenced))));
        }
        Either::Left(self.inner.call(request).err_into())
    }
}

fn is_write(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// A confirmation never moves the fence back: renewals confirmed out of order keep the latest.
fn confirmed(state: State, sent_at: Instant) -> State {
    State { confirmed: Some(state.confirmed.map_or(sent_at, |c| c.max(sent_at))), ..state }
}

fn time_left(state: State, deadline: Duration, now: Instant) -> Option<Duration> {
    if state.revoked {
        return Some(Duration::ZERO);
    }
    Some(deadline.saturating_sub(now.saturating_duration_since(state.confirmed?)))
}

fn check(state: State, deadline: Duration, now: Instant) -> Result<(), Fenced> {
    if state.revoked {
        return Err(Fenced::Revoked);
    }
    let confirmed = state.confirmed.ok_or(Fenced::NeverConfirmed)?;
    let since = now.saturating_duration_since(confirmed);
    if since < deadline { Ok(()) } else { Err(Fenced::Expired { since, deadline }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn open_only_within_the_renew_deadline_of_the_last_confirmed_renewal() {
        let t0 = Instant::now();
        let renewed = |ms| State { confirmed: Some(at(t0, ms)), revoked: false };
        let expired = |since_ms| Err(Fenced::Expired { since: Duration::from_millis(since_ms), deadline: DEADLINE });
        let cases: [(&str, State, u64, Result<(), Fenced>); 7] = [
            ("never renewed", State { confirmed: None, revoked: false }, 0, Err(Fenced::NeverConfirmed)),
            ("just renewed", renewed(0), 0, Ok(())),
            ("within the deadline", renewed(0), 9_999, Ok(())),
            ("at the deadline", renewed(0), 10_000, expired(10_000)),
            // A SIGSTOP of 25 s: the monotonic clock ran on, so the resumed process is fenced.
            ("after a pause past the Lease", renewed(0), 25_000, expired(25_000)),
            ("renewed again after a while", renewed(20_000), 25_000, Ok(())),
            ("revoked while renewed", State { confirmed: Some(t0), revoked: true }, 1, Err(Fenced::Revoked)),
        ];
        for (name, state, now_ms, want) in cases {
            assert_eq!(check(state, DEADLINE, at(t0, now_ms)), want, "{name}");
        }
    }

    #[test]
    fn time_left_counts_down_from_the_last_confirmed_renewal() {
        let t0 = Instant::now();
        let renewed = |ms| State { confirmed: Some(at(t0, ms)), revoked: false };
        let ms = Duration::from_millis;
        let cases = [
            ("never renewed", State { confirmed: None, revoked: false }, 0, None),
            ("just renewed", renewed(0), 0, Some(DEADLINE)),
            ("within the deadline", renewed(0), 9_000, Some(ms(1_000))),
            ("past the deadline", renewed(0), 25_000, Some(Duration::ZERO)),
            ("revoked", State { confirmed: Some(t0), revoked: true }, 1, Some(Duration::ZERO)),
        ];
        for (name, state, now_ms, want) in cases {
            assert_eq!(time_left(state, DEADLINE, at(t0, now_ms)), want, "{name}");
        }
        assert_eq!(Fence::open().time_left(), None);
    }

    #[test]
    fn a_confirmation_never_moves_the_fence_back() {
        let t0 = Instant::now();
        let state = State { confirmed: None, revoked: false };
        let state = confirmed(state, at(t0, 5_000));
        let state = confirmed(state, at(t0, 1_000));
        assert_eq!(state.confirmed, Some(at(t0, 5_000)));
        assert_eq!(check(state, DEADLINE, at(t0, 14_000)), Ok(()));
        // A renewal confirmed after a revocation does not reopen it.
        let revoked = confirmed(State { revoked: true, ..state }, at(t0, 20_000));
        assert_eq!(check(revoked, DEADLINE, at(t0, 20_001)), Err(Fenced::Revoked));
    }

    mod layer {
        use super::*;
        use axum::http::Response;
        use k8s_openapi::api::core::v1::ConfigMap;
        use kube::api::{Api, Patch, PatchParams};
        use kube::client::Body;
        use tower::ServiceExt;

        /// What reached the API server, and a gate that holds every GET until opened.
        #[derive(Clone)]
        struct Server {
            sent: Arc<Mutex<Vec<Method>>>,
            gate: Arc<tokio::sync::Semaphore>,
        }

        impl Server {
            fn new() -> Server {
                Server { sent: Arc::default(), gate: Arc::new(tokio::sync::Semaphore::new(0)) }
            }

            fn service(
                &self,
            ) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future: Send> + Send + Clone + use<>
            {
                let server = self.clone();
                tower::service_fn(move |request: Request<Body>| {
                    let server = server.clone();
                    async move {
                        server.sent.lock().unwrap().push(request.method().clone());
                        if request.method() == Method::GET {
                            let _ = server.gate.acquire().await;
                        }
                        let body = serde_json::to_vec(&ConfigMap::default()).unwrap();
                        Ok::<_, BoxError>(Response::new(Body::from(body)))
                    }
                })
            }

            fn sent(&self) -> Vec<Method> {
                self.sent.lock().unwrap().clone()
            }

            async fn wait_sent(&self, n: usize) {
                while self.sent().len() < n {
                    tokio::task::yield_now().await;
                }
            }
        }

        fn request(method: Method) -> Request<Body> {
            Request::builder().method(method).uri("/api/v1/namespaces/ns/configmaps/c").body(Body::empty()).unwrap()
        }

        #[tokio::test]
        async fn a_write_that_waited_for_a_permit_is_refused_if_the_fence_closed_meanwhile() {
            let fence = Fence::new(DEADLINE);
            fence.confirm(Instant::now());
            let server = Server::new();
            let client = kube::Client::new(limited(1, fence.clone()).service(server.service()), "ns");
            let api: Api<ConfigMap> = Api::namespaced(client, "ns");
            // A read holds the only permit.
            let read = tokio::spawn({
                let api = api.clone();
                async move { api.get("c").await }
            });
            server.wait_sent(1).await;
            // A write, checked by its caller while the fence was open, waits for the permit...
            assert_eq!(fence.check(), Ok(()));
            let write = tokio::spawn({
                let api = api.clone();
                async move { api.patch("c", &PatchParams::default(), &Patch::Merge(serde_json::json!({}))).await }
            });
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert_eq!(server.sent(), [Method::GET], "the write waits for the permit");
            // ...leadership is lost meanwhile, then the permit is freed.
            fence.revoke();
            server.gate.add_permits(1);
            read.await.unwrap().expect("the read");
            let refused = write.await.unwrap().expect_err("the write is refused");
            assert_eq!(Fenced::in_kube_error(&refused), Some(&Fenced::Revoked), "{refused:?}");
            assert_eq!(server.sent(), [Method::GET], "the write was never sent");
        }

        #[tokio::test]
        async fn only_writes_are_fenced_and_only_while_the_fence_is_closed() {
            let server = Server::new();
            server.gate.add_permits(100);
            let fence = Fence::new(DEADLINE);
            fence.confirm(Instant::now());
            let mut svc = limited(4, fence.clone()).service(server.service());
            let writes = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
            for method in writes.iter().chain(&[Method::GET]) {
                svc.ready().await.unwrap().call(request(method.clone())).await.expect("open: sent");
            }
            assert_eq!(server.sent().len(), 5);
            fence.revoke();
            for method in &writes {
                let err = svc.ready().await.unwrap().call(request(method.clone())).await.expect_err("closed");
                assert_eq!(err.downcast_ref::<Fenced>(), Some(&Fenced::Revoked), "{method}");
            }
            // Reads go on: the controller's watches end when it is dropped, not by refusal.
            for method in [Method::GET, Method::HEAD] {
                svc.ready().await.unwrap().call(request(method)).await.expect("a read");
            }
            assert_eq!(server.sent().len(), 7);
            // Without leader election nothing is refused.
            let mut open = limited(4, Fence::open()).service(server.service());
            open.ready().await.unwrap().call(request(Method::PATCH)).await.expect("no election: sent");
            // Other errors of the client are not refusals.
            assert_eq!(Fenced::in_kube_error(&kube::Error::Service("connection reset".into())), None);
            assert_eq!(Fenced::in_kube_error(&kube::Error::LinesCodecMaxLineLengthExceeded), None);
        }
    }

    #[test]
    fn without_leader_election_every_write_passes() {
        assert_eq!(Fence::open().check(), Ok(()));
        let fence = Fence::new(DEADLINE);
        assert_eq!(fence.check(), Err(Fenced::NeverConfirmed));
        fence.confirm(Instant::now());
        assert_eq!(fence.check(), Ok(()));
        fence.revoke();
        assert_eq!(fence.check(), Err(Fenced::Revoked));
    }
}
