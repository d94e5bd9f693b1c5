//! One control plane per test binary, torn down at process exit.
#![allow(unsafe_code)] // libc (atexit) has no safe wrapper here: each call carries its SAFETY note

use std::sync::OnceLock;

use anyhow::{Context, Result};

use super::ControlPlane;

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

extern "C" fn teardown_shared() {
    // Never unwind out of an extern "C" function.
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(cp)) = SHARED.get() {
            cp.shutdown();
        }
    });
}

impl ControlPlane {
    /// One control plane per test binary, started on first use and torn down at process exit.
    ///
    /// Blocks the caller while the plane starts (it runs on a dedicated thread with its own tokio
    /// runtime, so calling this from inside a `#[tokio::test]` is fine). Panics with the full
    /// error if the plane cannot be started; later calls panic with the same error.
    pub fn shared() -> &'static ControlPlane {
        let result = SHARED.get_or_init(|| {
            let started = std::thread::Builder::new()
                .name("scim-envtest-start".into())
                .spawn(|| -> Result<ControlPlane> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building a tokio runtime")?;
                    runtime.block_on(ControlPlane::start())
                })
                .map_err(|e| format!("spawning the start thread: {e}"))
                .and_then(|handle| handle.join().map_err(|panic| format!("ControlPlane::start panicked: {panic:?}")));
            match started {
                Ok(Ok(cp)) => {
                    // SAFETY: registering a plain extern "C" fn; it only touches SHARED.
                    unsafe { libc::atexit(teardown_shared) };
                    eprintln!(
                        "scim-envtest: control plane up at {} (etcd ready in {:.1?}, kube-apiserver ready in {:.1?}, \
                         kube-controller-manager ready in {:.1?}, total {:.1?})",
                        cp.server_url,
                        cp.timings.etcd_ready,
                        cp.timings.apiserver_ready,
                        cp.timings.controller_manager_ready,
                        cp.timings.total
                    );
                    Ok(cp)
                }
                Ok(Err(e)) => Err(format!("{e:?}")),
                Err(e) => Err(e),
            }
        });
        match result {
            Ok(cp) => cp,
            Err(e) => panic!("scim-envtest: could not start the shared control plane: {e}"),
        }
    }
}
