//! The pause image every pod sandbox starts from, built here: a static binary from a few lines of C
//! (`gcc -static`), one layer, assembled by crane as `cargo xtask image` assembles the operator's.
//! Cached in `${XDG_CACHE_HOME:-~/.cache}/scim-token-operator/pause/`, keyed by the source.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, ensure};

use super::host::PAUSE_IMAGE;
use crate::image::{Registry, output, run_quiet};

/// What Kubernetes' pause does: sleep until SIGINT or SIGTERM, reap orphans (the sandbox may be the
/// pod's PID 1 when the process namespace is shared).
const SOURCE: &str = r#"#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
  struct sigaction sa = {0};
  sa.sa_handler = stop;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  sa.sa_handler = reap;
  sa.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &sa, NULL);
  for (;;) pause();
}
"#;

/// The archive (`ctr images import` reads it), built on first use.
pub(crate) fn archive() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?;
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (SOURCE, PAUSE_IMAGE).hash(&mut h);
        format!("{:016x}", h.finish())
    };
    let dir = cache.join("scim-token-operator/pause").join(key);
    let archive = dir.join("pause.tar");
    if archive.is_file() {
        return Ok(archive);
    }
    let work = dir.join("work");
    std::fs::create_dir_all(work.join("rootfs"))?;
    std::fs::write(work.join("pause.c"), SOURCE)?;
    run_quiet(
        Command::new("gcc")
            .args(["-static", "-Os", "-s", "-o"])
            .arg(work.join("rootfs/pause"))
            .arg(work.join("pause.c")),
    )
    .context("gcc -static (apt-get install gcc libc6-dev)")?;
    run_quiet(
        Command::new("tar")
            .args(["--sort=name", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@0", "-C"])
            .arg(work.join("rootfs"))
            .arg("-cf")
            .arg(work.join("layer.tar"))
            .arg("pause"),
    )?;
    let root = envtest::workspace_root();
    let crane = PathBuf::from(output(Command::new("bash").arg(root.join("hack/go-tool.sh")).arg("crane"))?.trim());
    let registry = Registry::start(&crane)?;
    let staged = format!("{}/pause:layer", registry.address);
    run_quiet(
        Command::new(&crane)
            .args(["append", "--oci-empty-base", "-f"])
            .arg(work.join("layer.tar"))
            .args(["-t", &staged]),
    )?;
    let tmp = dir.join("pause.tar.tmp");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();
    run_quiet(
        Command::new(&crane)
            .args(["mutate", &staged, "--entrypoint=/pause", "--user=65535:65535"])
            .args(["--set-platform", &format!("linux/{arch}"), "-t", PAUSE_IMAGE, "-o"])
            .arg(&tmp),
    )?;
    drop(registry);
    ensure!(tmp.is_file(), "crane mutate wrote no {}", tmp.display());
    std::fs::rename(&tmp, &archive)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(archive)
}
