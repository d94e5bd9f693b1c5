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
use std::time::{Duration, Instant};

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

    /// Whether a write may be sent now.
    pub fn check(&self) -> Result<(), Fenced> {
        let Some(deadline) = self.renew_deadline else { return Ok(()) };
        check(*self.state.lock().expect("poisoned"), deadline, Instant::now())
    }
}

/// A confirmation never moves the fence back: renewals confirmed out of order keep the latest.
fn confirmed(state: State, sent_at: Instant) -> State {
    State { confirmed: Some(state.confirmed.map_or(sent_at, |c| c.max(sent_at))), ..state }
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
