//! The fault schedule: which faults, in which order, how far apart and for how long, all drawn from
//! one seed, so that a run can be repeated and its schedule printed before it starts.

use std::fmt;
use std::time::Duration;

/// SplitMix64. Hand-rolled rather than `rand`: a seed must give the same schedule on every machine
/// and after dependency upgrades, and `rand` does not promise stable output across versions.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant at these sizes).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`, with millisecond steps.
    pub(crate) fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let (lo_ms, hi_ms) = (lo.as_millis() as u64, hi.as_millis().max(lo.as_millis()) as u64);
        Duration::from_millis(lo_ms + self.below(hi_ms - lo_ms + 1))
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A generator for a sub-task (e.g. one wave of the workload), independent of how many numbers
    /// the parent has drawn since.
    pub(crate) fn fork(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
        r.next_u64();
        r
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// SIGKILL the replica holding the Lease; it is started again after `restart_after`, as a
    /// kubelet restarts a crashed container (same identity, a new process).
    KillLeader { restart_after: Duration },
    /// SIGKILL the replica waiting for the Lease; started again after `restart_after`.
    KillStandby { restart_after: Duration },
    /// SIGKILL kube-apiserver, start it again (same port, flags, certificates) after `down_for`.
    RestartApiserver { down_for: Duration },
    /// SIGKILL etcd, start it again on the same data directory after `down_for`.
    RestartEtcd { down_for: Duration },
    /// SIGSTOP the leader for `paused_for` (longer than its Lease), then SIGCONT: it must not write
    /// once the standby has taken over.
    PauseLeader { paused_for: Duration },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |d: &Duration| format!("{:.1}s", d.as_secs_f64());
        match self {
            Fault::KillLeader { restart_after } => {
                write!(f, "SIGKILL the leader, restart it after {}", s(restart_after))
            }
            Fault::KillStandby { restart_after } => {
                write!(f, "SIGKILL the standby, restart it after {}", s(restart_after))
            }
            Fault::RestartApiserver { down_for } => write!(f, "SIGKILL kube-apiserver, down for {}", s(down_for)),
            Fault::RestartEtcd { down_for } => write!(f, "SIGKILL etcd, down for {}", s(down_for)),
            Fault::PauseLeader { paused_for } => write!(f, "SIGSTOP the leader for {}, then SIGCONT", s(paused_for)),
        }
    }
}

/// One step: start a wave of work, wait `wait` (so the fault lands while the wave is in flight),
/// inject `fault`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) wait: Duration,
    pub(crate) fault: Fault,
}

/// How many faults of each kind.
#[derive(Clone, Copy, Debug, clap::Args)]
pub(crate) struct Counts {
    /// SIGKILLs of the leader
    #[arg(long, default_value_t = 20)]
    pub(crate) leader_kills: usize,
    /// SIGKILLs of the standby
    #[arg(long, default_value_t = 2)]
    pub(crate) standby_kills: usize,
    /// kube-apiserver restarts in place
    #[arg(long, default_value_t = 2)]
    pub(crate) apiserver_restarts: usize,
    /// etcd restarts in place
    #[arg(long, default_value_t = 1)]
    pub(crate) etcd_restarts: usize,
    /// Leader pauses (SIGSTOP) past its Lease
    #[arg(long = "pauses", default_value_t = 1)]
    pub(crate) leader_pauses: usize,
}

impl Counts {
    pub(crate) fn total(&self) -> usize {
        self.leader_kills + self.standby_kills + self.apiserver_restarts + self.etcd_restarts + self.leader_pauses
    }
}

/// Draws the schedule. `max_restart_delay` bounds the kubelet-like restart delay of a killed
/// replica: below the Lease the restarted replica usually takes its own Lease back, above it the
/// standby takes over, so a wide range exercises both. A pause lasts the Lease plus 5 to 10 s.
pub(crate) fn schedule(seed: u64, counts: Counts, max_restart_delay: Duration, lease: Duration) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut kinds: Vec<u8> = [
        (0u8, counts.leader_kills),
        (1, counts.standby_kills),
        (2, counts.apiserver_restarts),
        (3, counts.etcd_restarts),
        (4, counts.leader_pauses),
    ]
    .iter()
    .flat_map(|&(kind, n)| std::iter::repeat_n(kind, n))
    .collect();
    // Fisher-Yates.
    for i in (1..kinds.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        kinds.swap(i, j);
    }
    let ms = Duration::from_millis;
    kinds
        .into_iter()
        .map(|kind| {
            let wait = rng.between(ms(500), ms(4_000));
            let fault = match kind {
                0 => Fault::KillLeader { restart_after: rng.between(ms(200), max_restart_delay) },
                1 => Fault::KillStandby { restart_after: rng.between(ms(200), max_restart_delay) },
                2 => Fault::RestartApiserver { down_for: rng.between(ms(500), ms(5_000)) },
                3 => Fault::RestartEtcd { down_for: rng.between(ms(500), ms(5_000)) },
                _ => Fault::PauseLeader { paused_for: lease + rng.between(ms(5_000), ms(10_000)) },
            };
            Step { wait, fault }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const COUNTS: Counts =
        Counts { leader_kills: 20, standby_kills: 2, apiserver_restarts: 2, etcd_restarts: 1, leader_pauses: 1 };
    const LEASE: Duration = Duration::from_secs(15);

    #[test]
    fn a_seed_gives_one_schedule() {
        let a = schedule(42, COUNTS, Duration::from_secs(20), LEASE);
        assert_eq!(a, schedule(42, COUNTS, Duration::from_secs(20), LEASE));
        assert_ne!(a, schedule(43, COUNTS, Duration::from_secs(20), LEASE));
    }

    #[test]
    fn the_schedule_holds_every_fault_asked_for() {
        let steps = schedule(7, COUNTS, Duration::from_secs(20), LEASE);
        assert_eq!(steps.len(), COUNTS.total());
        let count = |f: fn(&Fault) -> bool| steps.iter().filter(|s| f(&s.fault)).count();
        assert_eq!(count(|f| matches!(f, Fault::KillLeader { .. })), 20);
        assert_eq!(count(|f| matches!(f, Fault::KillStandby { .. })), 2);
        assert_eq!(count(|f| matches!(f, Fault::RestartApiserver { .. })), 2);
        assert_eq!(count(|f| matches!(f, Fault::RestartEtcd { .. })), 1);
        for step in &steps {
            if let Fault::PauseLeader { paused_for } = step.fault {
                assert!(paused_for > LEASE, "a pause must outlast the Lease: {paused_for:?}");
            }
            if let Fault::KillLeader { restart_after } = step.fault {
                assert!(restart_after <= Duration::from_secs(20));
            }
        }
    }

    #[test]
    fn between_stays_in_range() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let d = rng.between(Duration::from_millis(200), Duration::from_millis(300));
            assert!((200..=300).contains(&(d.as_millis() as u64)));
        }
    }
}
