//! Crash safety under faults, the small instance the test command runs: `cargo xtask chaos` (the same
//! code, included from xtask/src/chaos/) with 100 directories, 40 rotations, leader kills, a standby
//! kill, a kube-apiserver and an etcd restart and a leader paused past its Lease; and a run of pauses
//! only. It asserts the invariants of docs/reliability.md,
//! never timings. A random seed each run, printed; `CHAOS_SEED=<seed>` repeats one.

#[path = "../xtask/src/chaos/mod.rs"]
// The command-line half (option parsing, usage) is only used by `cargo xtask chaos`.
#[allow(dead_code)]
mod chaos;

use std::time::Duration;

fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(seed) => seed.parse().expect("CHAOS_SEED is a number"),
        Err(_) => chaos::random_seed(),
    }
}

async fn assert_invariants(options: chaos::Options) {
    let seed = options.seed;
    let report = chaos::run(&options, std::path::Path::new(env!("CARGO_BIN_EXE_scim-token-operator")))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: the chaos run failed: {e:#}"));
    report.print();
    let violations = report.violations();
    assert!(violations.is_empty(), "seed {seed} (rerun with CHAOS_SEED={seed}):\n- {}", violations.join("\n- "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_under_crashes_and_control_plane_restarts() {
    assert_invariants(chaos::Options {
        seed: seed(),
        n: 100,
        rotations: 40,
        counts: chaos::Counts {
            leader_kills: 4,
            standby_kills: 1,
            apiserver_restarts: 1,
            etcd_restarts: 1,
            leader_pauses: 1,
        },
        // Short restarts keep the run short (the restarted replica takes its own Lease back).
        max_restart_delay: Duration::from_secs(5),
        ..chaos::Options::default()
    })
    .await;
}

/// A leader paused past its Lease must not write once the standby has taken over: resumed, it finds
/// its write fence closed (its last renewal is older than the renew deadline on the monotonic clock)
/// and drops its in-flight reconciliations (docs/reliability.md, "A deposed leader writes: fixed").
/// Before the fence, seed 617008 made it issue a token for a spec that no longer existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_writes_nothing_after_losing_its_lease() {
    assert_invariants(chaos::Options {
        seed: seed(),
        n: 200,
        rotations: 80,
        counts: chaos::Counts {
            leader_kills: 0,
            standby_kills: 0,
            apiserver_restarts: 0,
            etcd_restarts: 0,
            leader_pauses: 3,
        },
        ..chaos::Options::default()
    })
    .await;
}
