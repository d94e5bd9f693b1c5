//! Two operator replicas with leader election, supervised as a kubelet would: a process that exits
//! (killed, lost its Lease, or could not reach the API server at start) is started again with the same
//! identity. Each process (incarnation) gets its own client certificate, so the API server's audit
//! log tells apart the writes of every process that ever ran.
#![allow(unsafe_code)] // libc (kill, prctl in pre_exec) has no safe wrapper here: each call carries its SAFETY note

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use envtest::ControlPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Prefix of every replica's user name in the audit log: `chaos-op-<slot>-<incarnation>`.
pub(crate) const USER_PREFIX: &str = "chaos-op-";
/// A replica that exits by itself within this long after starting is crash-looping: its next
/// restart waits longer (doubling up to [`MAX_BACKOFF`]), as a kubelet backs off.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One process of a replica.
#[derive(Clone, Debug)]
pub(crate) struct Incarnation {
    pub(crate) pid: u32,
    pub(crate) metrics_port: u16,
    pub(crate) user: String,
    pub(crate) log: PathBuf,
}

#[derive(Default)]
struct SlotState {
    running: Option<Incarnation>,
    paused: bool,
    /// The restart delay the fault schedule chose for the next exit (else the crash-loop backoff).
    next_delay: Option<Duration>,
    exits: Vec<String>,
}

/// A replica slot ("a" or "b") and its supervisor task.
pub(crate) struct Replica {
    slot: char,
    state: Mutex<SlotState>,
}

/// Everything the supervisors need to start a process.
#[derive(Clone)]
pub(crate) struct Launch {
    pub(crate) cp: &'static ControlPlane,
    pub(crate) bin: PathBuf,
    pub(crate) namespace: String,
    pub(crate) logs: PathBuf,
    pub(crate) extra_args: Vec<String>,
}

pub(crate) struct Replicas {
    pub(crate) slots: Vec<Arc<Replica>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Every process started, in order.
    pub(crate) history: Arc<Mutex<Vec<Incarnation>>>,
}

impl Replicas {
    pub(crate) fn start(launch: Launch) -> Replicas {
        let (stop, _) = watch::channel(false);
        let history = Arc::new(Mutex::new(Vec::new()));
        let mut slots = Vec::new();
        let mut tasks = Vec::new();
        for slot in ['a', 'b'] {
            let replica = Arc::new(Replica { slot, state: Mutex::new(SlotState::default()) });
            tasks.push(tokio::spawn(supervise(replica.clone(), launch.clone(), stop.subscribe(), history.clone())));
            slots.push(replica);
        }
        Replicas { slots, stop, tasks, history }
    }

    /// Stops supervising and SIGKILLs what runs (the run is over; a paused process is resumed first).
    pub(crate) async fn shutdown(self) {
        for r in &self.slots {
            if let Some(inc) = r.running() {
                signal(inc.pid, libc::SIGCONT);
            }
        }
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// The running, unpaused incarnation that reports leadership, if exactly one does.
    pub(crate) async fn leader(&self) -> Option<(Arc<Replica>, Incarnation)> {
        let mut leaders = Vec::new();
        for r in &self.slots {
            let Some(inc) = r.running() else { continue };
            if r.is_paused() {
                continue;
            }
            if is_leader(inc.metrics_port).await == Some(true) {
                leaders.push((r.clone(), inc));
            }
        }
        if leaders.len() == 1 { leaders.pop() } else { None }
    }

    /// Waits until one replica leads and the other runs as a standby; returns (leader, standby).
    pub(crate) async fn leader_and_standby(
        &self,
        timeout: Duration,
    ) -> Result<((Arc<Replica>, Incarnation), Incarnation)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((leader, inc)) = self.leader().await {
                let other = self.slots.iter().find(|r| r.slot != leader.slot).expect("two slots");
                if let Some(standby) = other.running()
                    && !other.is_paused()
                    && is_leader(standby.metrics_port).await == Some(false)
                {
                    return Ok(((leader, inc), standby));
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no leader with a running standby within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a running, unpaused process other than `old_pid` reports leadership; returns it.
    pub(crate) async fn new_leader(&self, old_pid: u32, timeout: Duration) -> Result<Incarnation> {
        let deadline = Instant::now() + timeout;
        loop {
            for r in &self.slots {
                if let Some(inc) = r.running()
                    && inc.pid != old_pid
                    && !r.is_paused()
                    && is_leader(inc.metrics_port).await == Some(true)
                {
                    return Ok(inc);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no new leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn exits(&self) -> Vec<String> {
        self.slots.iter().flat_map(|r| r.state.lock().expect("poisoned").exits.clone()).collect()
    }
}

impl Replica {
    pub(crate) fn running(&self) -> Option<Incarnation> {
        self.state.lock().expect("poisoned").running.clone()
    }

    fn is_paused(&self) -> bool {
        self.state.lock().expect("poisoned").paused
    }

    /// SIGKILL `inc` (if it still runs) and have it restarted after `restart_after`.
    pub(crate) fn kill(&self, inc: &Incarnation, restart_after: Duration) {
        let mut state = self.state.lock().expect("poisoned");
        if state.running.as_ref().is_some_and(|r| r.pid == inc.pid) {
            state.next_delay = Some(restart_after);
            signal(inc.pid, libc::SIGKILL);
        }
    }

    pub(crate) fn pause(&self, inc: &Incarnation) {
        self.state.lock().expect("poisoned").paused = true;
        signal(inc.pid, libc::SIGSTOP);
    }

    pub(crate) fn resume(&self, inc: &Incarnation) {
        signal(inc.pid, libc::SIGCONT);
        self.state.lock().expect("poisoned").paused = false;
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) of a child we started and have not reaped yet (the supervisor reaps it only
    // after clearing `running` under the same lock the callers hold or check).
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

async fn supervise(
    replica: Arc<Replica>,
    launch: Launch,
    mut stop: watch::Receiver<bool>,
    history: Arc<Mutex<Vec<Incarnation>>>,
) {
    let mut number = 0;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let stopping = *stop.borrow();
        if stopping {
            break;
        }
        number += 1;
        let (mut child, inc) = match spawn(&launch, replica.slot, number) {
            Ok(started) => started,
            Err(e) => {
                eprintln!("chaos: could not start replica {}: {e:#}", replica.slot);
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
        };
        history.lock().expect("poisoned").push(inc.clone());
        replica.state.lock().expect("poisoned").running = Some(inc.clone());
        let started = Instant::now();
        let status = tokio::select! {
            status = child.wait() => status.ok(),
            _ = stopped(&mut stop) => {
                signal(inc.pid, libc::SIGKILL);
                let _ = child.wait().await;
                None
            }
        };
        let delay = {
            let mut state = replica.state.lock().expect("poisoned");
            state.running = None;
            state.paused = false;
            let scheduled = state.next_delay.take();
            if let Some(status) = status {
                state.exits.push(format!(
                    "{USER_PREFIX}{}-{number} exited after {:.1}s: {status}",
                    replica.slot,
                    started.elapsed().as_secs_f64()
                ));
            }
            scheduled.unwrap_or_else(|| {
                backoff =
                    if started.elapsed() > HEALTHY_AFTER { FIRST_BACKOFF } else { (backoff * 2).min(MAX_BACKOFF) };
                backoff
            })
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => {}
        }
    }
}

/// Resolves once the run is over (the `Ref` that `wait_for` yields must not live across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn spawn(launch: &Launch, slot: char, number: u32) -> Result<(tokio::process::Child, Incarnation)> {
    let user = format!("{USER_PREFIX}{slot}-{number}");
    let kubeconfig = launch.cp.user_kubeconfig(&user, Some("system:masters"))?;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = launch.logs.join(format!("{user}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(&launch.bin);
    cmd.args(["run", "--namespace", &launch.namespace, "--lease-namespace", &launch.namespace])
        .args(["--identity", &format!("{USER_PREFIX}{slot}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(&launch.extra_args)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; nothing is allocated in the child.
    unsafe {
        cmd.pre_exec(|| {
            // The replica dies with the harness, even if the harness is killed.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", launch.bin.display()))?;
    let pid = child.id().context("a just-spawned child has a pid")?;
    Ok((child, Incarnation { pid, metrics_port, user, log }))
}

/// What the replica's `/metrics` says about leadership; `None` when it does not answer (starting,
/// paused, gone).
pub(crate) async fn is_leader(port: u16) -> Option<bool> {
    let metrics = tokio::time::timeout(Duration::from_millis(500), http_get(port, "/metrics")).await.ok()??;
    metrics.lines().find_map(|l| l.strip_prefix("scim_token_operator_leader ")).map(|v| v.trim() == "1")
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// The log files of every process that ran.
pub(crate) fn logs(history: &[Incarnation]) -> Vec<&Path> {
    history.iter().map(|i| i.log.as_path()).collect()
}
