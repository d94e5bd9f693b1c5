//! etcd and kube-apiserver as commands that can be run again in place: same binaries, ports, data
//! directory and certificates, so a restart is what a node reboot or a static-pod restart does.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) const ETCD: &str = "etcd";
pub(crate) const APISERVER: &str = "kube-apiserver";

/// Everything needed to (re)start etcd and kube-apiserver.
pub(crate) struct Components {
    pub(crate) etcd_bin: PathBuf,
    pub(crate) apiserver_bin: PathBuf,
    /// The temporary directory: working directory, etcd data, logs.
    pub(crate) root: PathBuf,
    pub(crate) pki_dir: PathBuf,
    pub(crate) etcd_client_port: u16,
    pub(crate) etcd_peer_port: u16,
    pub(crate) apiserver_port: u16,
    /// The audit policy file, when auditing is on (events go to [`Components::audit_log`]).
    pub(crate) audit_policy: Option<PathBuf>,
    pub(crate) extra_apiserver_args: Vec<String>,
    /// A real cluster's control plane rather than the test harness's ([`crate::Cluster`]).
    pub(crate) cluster: Option<crate::Cluster>,
}

impl Components {
    pub(crate) fn etcd_log(&self) -> PathBuf {
        self.root.join("etcd.log")
    }

    pub(crate) fn apiserver_log(&self) -> PathBuf {
        self.root.join("kube-apiserver.log")
    }

    pub(crate) fn audit_log(&self) -> Option<PathBuf> {
        self.audit_policy.as_ref().map(|_| self.root.join("audit.log"))
    }

    fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_client_port)
    }

    pub(crate) fn etcd(&self) -> Command {
        let etcd_url = self.etcd_url();
        let etcd_peer_url = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let mut etcd = Command::new(&self.etcd_bin);
        etcd.arg(format!("--data-dir={}", self.root.join("etcd-data").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-cluster=default={etcd_peer_url}"))
            // Test data: no need to survive power loss, and fsync dominates on slow disks.
            .arg("--unsafe-no-fsync=true")
            .arg("--quota-backend-bytes=2147483648")
            .current_dir(&self.root);
        etcd
    }

    pub(crate) fn apiserver(&self) -> Command {
        let pki = |name: &str| self.pki_dir.join(name).display().to_string();
        let mut apiserver = Command::new(&self.apiserver_bin);
        let address = self.cluster.as_ref().map_or("127.0.0.1".to_string(), |c| c.address.to_string());
        apiserver
            .arg(format!("--etcd-servers={}", self.etcd_url()))
            .arg(format!("--secure-port={}", self.apiserver_port))
            .arg(format!("--bind-address={address}"))
            .arg(format!("--advertise-address={address}"))
            .arg(format!("--cert-dir={}", self.root.join("apiserver-certs").display()))
            .arg(format!("--tls-cert-file={}", pki("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", pki("apiserver.key")))
            .arg(format!("--client-ca-file={}", pki("client-ca.crt")))
            .arg("--allow-privileged=true");
        match &self.cluster {
            None => {
                apiserver
                    .arg("--authorization-mode=RBAC")
                    .arg("--service-cluster-ip-range=10.0.0.0/24")
                    // The controller-manager runs only the garbage collector, so nothing would create
                    // the token the ServiceAccount admission plugin waits for.
                    .arg("--disable-admission-plugins=ServiceAccount")
                    // As on OpenShift and other hardened clusters: setting blockOwnerDeletion on an
                    // ownerReference requires permission to update the owner's finalizers, so RBAC
                    // tests prove that rule is needed rather than assume it.
                    .arg("--enable-admission-plugins=OwnerReferencesPermissionEnforcement")
                    // 127.0.0.1 is not a valid Endpoints address, so the default lease reconciler
                    // would log an error every 10 s; nothing here consumes the `kubernetes` Endpoints.
                    .arg("--endpoint-reconciler-type=none");
            }
            Some(cluster) => {
                apiserver
                    // The kubelet authenticates as system:node:<name> (group system:nodes).
                    .arg("--authorization-mode=Node,RBAC")
                    .arg(format!("--service-cluster-ip-range={}", cluster.service_cidr))
                    .arg("--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement")
                    // logs, exec and port-forward: kube-apiserver calls the kubelet as the admin,
                    // whose client CA the kubelet trusts.
                    .arg(format!("--kubelet-client-certificate={}", pki("admin.crt")))
                    .arg(format!("--kubelet-client-key={}", pki("admin.key")))
                    .arg("--kubelet-preferred-address-types=InternalIP");
            }
        }
        apiserver
            .arg(format!("--service-account-key-file={}", pki("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", pki("sa.key")))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false")
            .current_dir(&self.root);
        if let (Some(policy), Some(log)) = (&self.audit_policy, self.audit_log()) {
            apiserver
                .arg(format!("--audit-policy-file={}", policy.display()))
                .arg(format!("--audit-log-path={}", log.display()))
                .arg("--audit-log-format=json")
                // One file for the whole run: lumberjack would rotate at 100 MB by default.
                .arg("--audit-log-maxsize=100000");
        }
        apiserver.args(&self.extra_apiserver_args);
        apiserver
    }

    pub(crate) async fn etcd_healthy(&self) -> Result<bool> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.etcd_client_port)).await?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response);
        Ok(response.contains("\"health\":\"true\""))
    }
}

/// Whether kube-apiserver's `/readyz` answers `ok` (etcd reachable, every post-start hook done).
pub(crate) async fn apiserver_ready(probe: &kube::Client) -> Result<bool> {
    let req = http::Request::get("/readyz").body(Vec::new())?;
    Ok(probe.request_text(req).await.map(|body| body.trim() == "ok")?)
}
