//! Injecting one fault of the schedule and measuring what it cost: for a leader kill or pause, the
//! failover time (from the signal until another process reports leadership on its `/metrics`).

use std::time::{Duration, Instant};

use anyhow::Result;
use envtest::ControlPlane;

use super::replicas::Replicas;
use super::schedule::Fault;

/// How long a fault may wait for the replicas to be in the state it needs (a leader, a standby).
const WAIT_FOR_ROLES: Duration = Duration::from_secs(180);

#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    pub(crate) fault: Fault,
    /// When it was injected, since the fault phase began.
    pub(crate) at: Duration,
    /// For leader kills and pauses: signal to a new leader.
    pub(crate) failover: Option<Duration>,
    /// Whether the other replica took over (else the killed one, restarted, took its Lease back).
    pub(crate) by_standby: bool,
    pub(crate) note: String,
}

pub(crate) async fn inject(cp: &ControlPlane, replicas: &Replicas, fault: Fault, phase: Instant) -> Result<Outcome> {
    let mut outcome = Outcome { fault, at: Duration::ZERO, failover: None, by_standby: false, note: String::new() };
    match fault {
        Fault::KillLeader { restart_after } => {
            let (leader, inc) = wait_leader(replicas).await?;
            outcome.at = phase.elapsed();
            let killed = Instant::now();
            leader.kill(&inc, restart_after);
            let next = replicas.new_leader(inc.pid, WAIT_FOR_ROLES).await?;
            let failover = killed.elapsed();
            outcome.failover = Some(failover);
            outcome.by_standby = slot_of(&next.user) != slot_of(&inc.user);
            outcome.note = format!("{} killed; {} took over after {:.1}s", inc.user, next.user, failover.as_secs_f64());
        }
        Fault::KillStandby { restart_after } => {
            let ((leader, _), standby) = replicas.leader_and_standby(WAIT_FOR_ROLES).await?;
            outcome.at = phase.elapsed();
            let slot = replicas.slots.iter().find(|r| !std::sync::Arc::ptr_eq(r, &leader)).expect("two slots");
            slot.kill(&standby, restart_after);
            outcome.note = format!("{} killed", standby.user);
        }
        Fault::RestartApiserver { down_for } => {
            outcome.at = phase.elapsed();
            let ready = cp.restart_apiserver(down_for).await?;
            outcome.note = format!("ready {:.1}s after its restart", ready.as_secs_f64());
        }
        Fault::RestartEtcd { down_for } => {
            outcome.at = phase.elapsed();
            let ready = cp.restart_etcd(down_for).await?;
            outcome.note = format!("etcd and kube-apiserver ready {:.1}s after the restart", ready.as_secs_f64());
        }
        Fault::PauseLeader { paused_for } => {
            let ((leader, inc), _) = replicas.leader_and_standby(WAIT_FOR_ROLES).await?;
            outcome.at = phase.elapsed();
            let paused = Instant::now();
            leader.pause(&inc);
            let takeover = async {
                let next = replicas.new_leader(inc.pid, paused_for).await;
                (next, paused.elapsed())
            };
            let ((next, took), _) = tokio::join!(takeover, tokio::time::sleep(paused_for));
            outcome.failover = next.as_ref().ok().map(|_| took);
            leader.resume(&inc);
            // Having lost its Lease, the resumed process must stop (and write nothing: the audit log
            // is checked for that at the end).
            let resumed = Instant::now();
            let exited = loop {
                if leader.running().is_none_or(|now| now.pid != inc.pid) {
                    break Some(resumed.elapsed());
                }
                if resumed.elapsed() > Duration::from_secs(60) {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            outcome.note = match (next, exited) {
                (Ok(next), Some(after)) => format!(
                    "{} paused; {} took over; the paused process exited {:.1}s after SIGCONT",
                    inc.user,
                    next.user,
                    after.as_secs_f64()
                ),
                (Ok(next), None) => {
                    format!(
                        "{} paused; {} took over; the paused process still ran 60s after SIGCONT",
                        inc.user, next.user
                    )
                }
                (Err(_), _) => format!("{} paused; nobody took over while it was stopped", inc.user),
            };
        }
    }
    Ok(outcome)
}

async fn wait_leader(
    replicas: &Replicas,
) -> Result<(std::sync::Arc<super::replicas::Replica>, super::replicas::Incarnation)> {
    let deadline = Instant::now() + WAIT_FOR_ROLES;
    loop {
        if let Some(found) = replicas.leader().await {
            return Ok(found);
        }
        anyhow::ensure!(Instant::now() < deadline, "no leader within {WAIT_FOR_ROLES:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The replica ("a" or "b") of a process's user name (`chaos-op-<replica>-<n>`).
fn slot_of(user: &str) -> Option<char> {
    user.strip_prefix(super::replicas::USER_PREFIX)?.chars().next()
}
