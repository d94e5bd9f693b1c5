//! Kubeconfig files with embedded credentials (what kubectl, helm and `kube::Config` read).

use std::fmt::Write as _;

/// A kubeconfig for `server_url` trusting `ca_pem`, authenticating with a client certificate.
pub(crate) fn render(server_url: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: {server_url}
    certificate-authority-data: {ca}
users:
- name: envtest-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: envtest
  context:
    cluster: envtest
    user: envtest-admin
    namespace: default
current-context: envtest
preferences: {{}}
",
        ca = base64(ca_pem.as_bytes()),
        cert = base64(cert_pem.as_bytes()),
        key = base64(key_pem.as_bytes()),
    );
    out
}

/// Standard base64 with padding (kubeconfig `*-data` fields).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use kube::config::Kubeconfig;

    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn kubeconfig_parses() {
        let pki = crate::certificates::Pki::generate(&[]).unwrap();
        let kc = Kubeconfig::from_yaml(&pki.kubeconfig("https://127.0.0.1:1234")).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("envtest"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:1234"));
    }
}
