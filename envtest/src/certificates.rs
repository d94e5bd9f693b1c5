//! The throw-away PKI: a serving CA and certificate for kube-apiserver, a client CA with an admin
//! certificate in `system:masters` (and more users on request), and the service-account signing key
//! pair.

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

pub(crate) struct Pki {
    pub(crate) ca: String,
    pub(crate) serving_cert: String,
    pub(crate) serving_key: String,
    pub(crate) client_ca: String,
    pub(crate) admin_cert: String,
    pub(crate) admin_key: String,
    pub(crate) sa_public: String,
    pub(crate) sa_private: String,
    /// Kept to sign further client certificates ([`Pki::client_certificate`]).
    client_ca_issuer: Issuer<'static, KeyPair>,
}

fn new_ca(common_name: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

impl Pki {
    /// `extra_sans`: more names or addresses the API server's serving certificate covers (a node's
    /// address and the `kubernetes` Service's ClusterIP, see [`crate::Cluster`]).
    pub(crate) fn generate(extra_sans: &[String]) -> Result<Pki> {
        let (ca, ca_issuer) = new_ca("scim-envtest-ca")?;
        let (client_ca, client_ca_issuer) = new_ca("scim-envtest-client-ca")?;

        let mut serving = CertificateParams::new(
            [
                "127.0.0.1",
                "localhost",
                "::1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.0.0.1",
            ]
            .map(String::from)
            .into_iter()
            .chain(extra_sans.iter().cloned())
            .collect::<Vec<_>>(),
        )?;
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.use_authority_key_identifier_extension = true;
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &ca_issuer)?;

        let (admin_cert, admin_key) = client_certificate(&client_ca_issuer, "admin", Some("system:masters"))?;

        // ECDSA P-256: the service-account token issuer signs ES256 tokens.
        let sa = KeyPair::generate()?;

        Ok(Pki {
            ca,
            serving_cert: serving_cert.pem(),
            serving_key: serving_key.serialize_pem(),
            client_ca,
            admin_cert,
            admin_key,
            sa_public: sa.public_key_pem(),
            sa_private: sa.serialize_pem(),
            client_ca_issuer,
        })
    }

    /// A client certificate and key (PEM) for `user` (in `group`), signed by the client CA.
    pub(crate) fn client_certificate(&self, user: &str, group: Option<&str>) -> Result<(String, String)> {
        client_certificate(&self.client_ca_issuer, user, group)
    }

    /// An admin kubeconfig for `server_url`.
    pub(crate) fn kubeconfig(&self, server_url: &str) -> String {
        crate::kubeconfig::render(server_url, &self.ca, &self.admin_cert, &self.admin_key)
    }
}

/// kube-apiserver maps the common name to the user name and the organization to a group (rcgen's
/// distinguished names hold one value per attribute, hence one group).
fn client_certificate(issuer: &Issuer<'static, KeyPair>, user: &str, group: Option<&str>) -> Result<(String, String)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, user);
    if let Some(group) = group {
        params.distinguished_name.push(DnType::OrganizationName, group);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}
