//! The HTTPS client for Graph and the token endpoint: hyper-util's pooled client over hyper-rustls
//! (kube's own stack), https only, trusting the system's roots plus `--entra-ca-file`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::RETRY_AFTER;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Largest answer read: a job list or an error is a few KiB.
const MAX_BODY: usize = 1 << 20;

pub(super) struct Https {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

pub(super) struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

impl Https {
    pub fn new(ca_file: Option<&Path>) -> Result<Https, String> {
        let mut roots = rustls::RootCertStore::empty();
        // The system's roots (Microsoft's endpoints chain to public CAs); a missing or partly
        // unreadable store is no reason not to start: a call then fails naming TLS.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("--entra-ca-file {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--entra-ca-file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("--entra-ca-file {}: no certificate in it", path.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("--entra-ca-file {}: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build();
        Ok(Https { client: Client::builder(TokioExecutor::new()).build(connector) })
    }

    /// Sends one request and reads the whole answer, within `timeout`. The request and the answer
    /// are never logged (they carry tokens).
    pub async fn send(&self, request: hyper::Request<Full<Bytes>>, timeout: Duration) -> Result<Answer, String> {
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| chain(&e))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok(Answer { status, retry_after, body })
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
    }
}

/// An error and its causes on one line (hyper-util's own message is only "client error (Connect)").
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
