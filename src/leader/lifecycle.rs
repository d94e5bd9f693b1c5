//! A replica's leadership from start to stop: wait for the Lease (ready meanwhile: a standby must not
//! be restarted), keep renewing it while the controller runs, and end either way: released after a
//! graceful stop, or lost, which aborts the controller's in-flight work at once.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::{Elector, Lost};

/// Waits until `elector` holds the Lease, reporting ready meanwhile. `false` if a stop was requested
/// first (the replica then stops without ever having led).
pub async fn acquire(elector: &mut Elector, ready: &AtomicBool, mut stop: watch::Receiver<bool>) -> bool {
    // A standby replica is healthy and ready: it serves nothing but must not be restarted.
    ready.store(true, Ordering::SeqCst);
    let acquired = tokio::select! {
        _ = elector.acquire() => true,
        _ = stop.wait_for(|s| *s) => false,
    };
    ready.store(false, Ordering::SeqCst);
    acquired
}

/// The Lease kept while the controller runs. Made with [`Leadership::keep`]; ended with
/// [`Leadership::end`].
pub struct Leadership {
    keeper: Option<JoinHandle<()>>,
    release: oneshot::Sender<()>,
    lost: Arc<AtomicBool>,
}

impl Leadership {
    /// Renews the Lease of `elector` (none without leader election) in the background. The future
    /// returned beside resolves once the Lease is lost: the controller is dropped then, in-flight
    /// reconciliations included, so that two replicas never write at once. It never resolves when the
    /// Lease is released after a graceful stop, or without an elector.
    pub fn keep(elector: Option<Elector>) -> (Leadership, impl Future<Output = ()> + Send + 'static) {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let (lost_tx, lost_rx) = oneshot::channel::<Lost>();
        let keeper = elector.map(|mut elector| {
            tokio::spawn(async move {
                tokio::select! {
                    lost = elector.keep() => {
                        error!(reason = %lost, "lost leadership; aborting in-flight reconciliations so that two replicas never write at once");
                        let _ = lost_tx.send(lost);
                    }
                    _ = release_rx => {
                        // `release` closes the fence before the Lease is given up: a standby may write right after.
                        if let Err(e) = elector.release().await {
                            warn!(error = %e, "could not release the lease");
                        }
                    }
                }
            })
        });
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let abort = async move {
            match lost_rx.await {
                Ok(_) => flag.store(true, Ordering::SeqCst),
                // The keeper ended without losing (it released the Lease) or there is none.
                Err(_) => std::future::pending::<()>().await,
            }
        };
        (Leadership { keeper, release: release_tx, lost }, abort)
    }

    /// Releases the Lease (if it was not lost) and waits for that. An error if it was lost: the
    /// process must exit non-zero so that its supervisor restarts it as a standby.
    pub async fn end(self) -> anyhow::Result<()> {
        let _ = self.release.send(());
        if let Some(keeper) = self.keeper
            && let Err(e) = keeper.await
        {
            warn!(error = %e, "the lease task panicked");
        }
        if self.lost.load(Ordering::SeqCst) {
            anyhow::bail!("lost leadership");
        }
        info!("stopped");
        Ok(())
    }
}
