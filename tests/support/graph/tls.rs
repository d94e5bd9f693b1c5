//! The double's test CA (generated at start), its serving certificates, and a small HTTPS client that
//! trusts only that CA: the double uses it to call the SCIM endpoint as Entra does, the tests to call
//! the double.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::support::HttpResponse;

/// ring only: the tree has no other rustls provider, and naming it keeps the choice explicit.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub struct TestCa {
    pub pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn generate() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "graph-double-test-ca");
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { pem: cert.pem(), der: cert.der().clone(), issuer: Issuer::new(params, key) }
    }

    /// A server certificate for 127.0.0.1 and localhost signed by this CA: (cert PEM, key PEM, cert DER, key DER).
    pub fn server_cert(&self) -> (String, String, CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.pem(), key.serialize_pem(), cert.der().clone(), key_der)
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        let (_, _, cert, key) = self.server_cert();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        client_config(std::slice::from_ref(&self.der))
    }
}

fn client_config(roots: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    Arc::new(config)
}

/// A client configuration trusting the certificates in a PEM file (e.g. [`super::GraphDouble::ca_file`]).
pub fn client_config_from_pem(pem: &str) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().expect("PEM certificates");
    client_config(&roots)
}

/// A request to send over HTTPS. The body and the headers are the caller's: this client logs nothing.
pub struct Request<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: Option<(&'a str, Vec<u8>)>,
}

/// One HTTP/1.1 request over TLS; `Err` says what failed (connect, TLS, timeout) without the URL's
/// query or any header.
pub async fn send(config: Arc<ClientConfig>, request: Request<'_>, timeout: Duration) -> Result<HttpResponse, String> {
    tokio::time::timeout(timeout, send_inner(config, request)).await.map_err(|_| "timed out".to_owned())?
}

async fn send_inner(config: Arc<ClientConfig>, request: Request<'_>) -> Result<HttpResponse, String> {
    let uri: hyper::Uri = request.url.parse().map_err(|_| "not a URL".to_owned())?;
    if uri.scheme_str() != Some("https") {
        return Err("not an https URL".to_owned());
    }
    let host = uri.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect: {e}"))?;
    let name = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone()).map_err(|_| "bad host name".to_owned())?,
    };
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or(host);
    let mut builder = hyper::Request::builder().method(request.method).uri(path).header("host", authority);
    for (k, v) in request.headers {
        builder = builder.header(*k, *v);
    }
    let body = match request.body {
        Some((content_type, bytes)) => {
            builder = builder.header("content-type", content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let response =
        sender.send_request(builder.body(Full::new(body)).unwrap()).await.map_err(|e| format!("HTTP request: {e}"))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = response.into_body().collect().await.map_err(|e| format!("HTTP body: {e}"))?.to_bytes();
    Ok(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}
