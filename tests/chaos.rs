//! Crash safety under faults, the small instance the test command runs: `cargo xtask chaos` (the same
//! code, included from xtask/src/chaos/) with 100 directories, 40 rotations, leader kills, a standby
//! kill, a kube-apiserver and an etcd restart and a paused leader. It asserts the invariants of
//! docs/reliability.md, never timings. A random seed each run, printed; `CHAOS_SEED=<seed>` repeats one.

#[path = "../xtask/src/chaos/mod.rs"]
// The command-line half (option parsing, usage) is only used by `cargo xtask chaos`.
#[allow(dead_code)]
mod chaos;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_under_crashes_restarts_and_a_paused_leader() {
    let seed = match std::env::var("CHAOS_SEED") {
        Ok(seed) => seed.parse().expect("CHAOS_SEED is a number"),
        Err(_) => chaos::random_seed(),
    };
    let options = chaos::Options {
        seed,
        n: 100,
        rotations: 40,
        counts: chaos::Counts {
            leader_kills: 4,
            standby_kills: 1,
            apiserver_restarts: 1,
            etcd_restarts: 1,
            leader_pauses: 1,
        },
        // Short restarts keep the run short; the standby's takeover is covered by the pause.
        max_restart_delay: Duration::from_secs(5),
        ..chaos::Options::default()
    };
    let report = chaos::run(&options, std::path::Path::new(env!("CARGO_BIN_EXE_scim-token-operator")))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: the chaos run failed: {e:#}"));
    report.print();
    let violations = report.violations();
    assert!(violations.is_empty(), "seed {seed} (rerun with CHAOS_SEED={seed}):\n- {}", violations.join("\n- "));
}
