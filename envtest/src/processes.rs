//! Child processes that never outlive the test process, their logs, and readiness waits.
#![allow(unsafe_code)] // libc (kill, prctl in pre_exec) has no safe wrapper here: each call carries its SAFETY note

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::TMP_PREFIX;

/// Polling interval of every readiness wait.
const POLL: Duration = Duration::from_millis(100);
/// SIGTERM grace period before SIGKILL at teardown.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Remove temporary directories left by test processes that were killed before `atexit` ran.
pub(crate) fn remove_stale_tmpdirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(TMP_PREFIX));
        if !is_ours {
            continue;
        }
        let Some(pid) =
            std::fs::read_to_string(path.join("owner.pid")).ok().and_then(|s| s.trim().parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Distinct free loopback ports (kept bound together so they differ; the race after closing is
/// accepted, as in envtest).
pub(crate) fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()
        .context("binding a free loopback port")?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

#[derive(Default)]
pub(crate) struct Processes(Mutex<Vec<Proc>>);

type SpawnRequest = (Command, mpsc::SyncSender<io::Result<Child>>);

/// Spawn `cmd` from a thread that lives as long as the process: `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked the child exits, and test or tokio worker threads come and go.
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("scim-envtest-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the scim-envtest spawner thread");
        tx
    });
    let (reply, result) = mpsc::sync_channel(1);
    spawner.send((cmd, reply)).map_err(|_| io::Error::other("the spawner thread is gone"))?;
    result.recv().map_err(|_| io::Error::other("the spawner thread is gone"))?
}

impl Processes {
    pub(crate) fn spawn(&self, name: &'static str, mut cmd: Command, log: &Path) -> Result<()> {
        // Appended to: a process restarted in place keeps one log across its lives.
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Own process group: teardown signals the whole group.
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid) and no allocation in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                ) == -1
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent died between fork and prctl: nobody would ever kill us.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_owned();
        let child = spawn_from_long_lived_thread(cmd)
            .with_context(|| format!("starting {name} ({})", program.to_string_lossy()))?;
        lock(&self.0).push(Proc { name, child, log: log.to_path_buf() });
        Ok(())
    }

    /// Fail (with the tail of its log) if any process has exited.
    pub(crate) fn check_running(&self) -> Result<()> {
        let mut procs = lock(&self.0);
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited early ({status}); last lines of {}:\n{}", p.name, p.log.display(), log_tail(&p.log));
            }
        }
        Ok(())
    }

    /// SIGKILL the process group of the process named `name` and reap it (a crash, not a shutdown).
    /// Returns whether one was running.
    pub(crate) fn kill(&self, name: &str) -> bool {
        let mut procs = lock(&self.0);
        let Some(i) = procs.iter().position(|p| p.name == name) else { return false };
        let mut p = procs.remove(i);
        drop(procs);
        // SAFETY: plain kill(2) of the child's own process group.
        unsafe { libc::kill(-(p.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = p.child.kill();
        let _ = p.child.wait();
        true
    }

    /// SIGTERM the process group of the process named `name`, SIGKILL after [`STOP_GRACE`], reap it.
    /// Returns whether one was running.
    pub(crate) fn stop(&self, name: &str) -> bool {
        let mut procs = lock(&self.0);
        let Some(i) = procs.iter().position(|p| p.name == name) else { return false };
        let mut p = procs.remove(i);
        drop(procs);
        stop(&mut p.child);
        true
    }

    /// The pid of the process named `name`, if it runs.
    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        lock(&self.0).iter().find(|p| p.name == name).map(|p| p.child.id())
    }

    /// SIGTERM each process group (newest first), SIGKILL after [`STOP_GRACE`], reap.
    pub(crate) fn stop_all(&self) {
        let mut procs = lock(&self.0);
        while let Some(mut p) = procs.pop() {
            stop(&mut p.child);
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pgid = child.id() as libc::pid_t;
    // SAFETY: plain kill(2) of the child's own process group.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            _ => return,
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
}

fn log_tail(path: &Path) -> String {
    const MAX_BYTES: usize = 8 * 1024;
    const MAX_LINES: usize = 40;
    let Ok(bytes) = std::fs::read(path) else {
        return "(log unreadable)".into();
    };
    let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(MAX_BYTES)..]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(MAX_LINES)..].join("\n")
}

/// Poll `check` every [`POLL`] until it returns `Ok(true)`, failing after `timeout` or as soon as
/// one of `processes` exits.
pub(crate) async fn wait_until<F, Fut>(what: &str, timeout: Duration, processes: &Processes, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        processes.check_running().with_context(|| format!("waiting for {what}"))?;
        let last = match tokio::time::timeout(Duration::from_secs(10), check()).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => "not ready".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "check timed out".to_string(),
        };
        if Instant::now() >= deadline {
            let logs = lock(&processes.0)
                .iter()
                .map(|p| format!("--- last lines of {} ---\n{}", p.log.display(), log_tail(&p.log)))
                .collect::<Vec<_>>()
                .join("\n");
            bail!("timed out after {timeout:?} waiting for {what} (last result: {last})\n{logs}");
        }
        tokio::time::sleep(POLL).await;
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
