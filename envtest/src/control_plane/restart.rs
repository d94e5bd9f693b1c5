//! Crashing etcd and kube-apiserver and starting them again in place (same ports, data directory,
//! certificates, flags and audit log), for fault-injection runs. Clients keep their kubeconfig: the
//! server comes back at the same address with the same serving certificate.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::ControlPlane;
use super::components::{APISERVER, ETCD, apiserver_ready};
use super::start::{APISERVER_TIMEOUT, ETCD_TIMEOUT};
use crate::processes::wait_until;

impl ControlPlane {
    /// SIGKILL kube-apiserver (a crash: nothing is drained, in-flight requests are cut), wait
    /// `downtime`, start it again and wait until `/readyz` answers `ok`. Returns how long it took
    /// from the new start until ready.
    pub async fn restart_apiserver(&self, downtime: Duration) -> Result<Duration> {
        self.processes.kill(APISERVER);
        tokio::time::sleep(downtime).await;
        let started = Instant::now();
        self.processes.spawn(APISERVER, self.components.apiserver(), &self.components.apiserver_log())?;
        self.wait_apiserver_ready().await.context("after restarting kube-apiserver")?;
        Ok(started.elapsed())
    }

    /// SIGKILL etcd, wait `downtime`, start it again on the same data directory and wait until it is
    /// healthy and kube-apiserver (which stays up and reconnects) is ready again. Returns how long it
    /// took from the new start until both were ready.
    pub async fn restart_etcd(&self, downtime: Duration) -> Result<Duration> {
        self.processes.kill(ETCD);
        tokio::time::sleep(downtime).await;
        let started = Instant::now();
        self.processes.spawn(ETCD, self.components.etcd(), &self.components.etcd_log())?;
        wait_until("etcd to report healthy after a restart", ETCD_TIMEOUT, &self.processes, || {
            self.components.etcd_healthy()
        })
        .await?;
        self.wait_apiserver_ready().await.context("after restarting etcd")?;
        Ok(started.elapsed())
    }

    /// The pid of kube-apiserver (it changes on every restart).
    pub fn apiserver_pid(&self) -> Option<u32> {
        self.processes.pid(APISERVER)
    }

    /// The pid of etcd (it changes on every restart).
    pub fn etcd_pid(&self) -> Option<u32> {
        self.processes.pid(ETCD)
    }

    async fn wait_apiserver_ready(&self) -> Result<()> {
        let mut config = self.config.clone();
        config.connect_timeout = Some(Duration::from_secs(2));
        config.read_timeout = Some(Duration::from_secs(5));
        let probe = kube::Client::try_from(config).context("building a kube client")?;
        wait_until("kube-apiserver /readyz", APISERVER_TIMEOUT, &self.processes, || apiserver_ready(&probe)).await
    }
}
