//! The throw-away PKI: a serving CA and certificate for kube-apiserver, a client CA with an admin
//! certificate in `system:masters`, and the service-account signing key pair.

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
    pub(crate) fn generate() -> Result<Pki> {
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
            .to_vec(),
        )?;
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.use_authority_key_identifier_extension = true;
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &ca_issuer)?;

        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
        admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        admin.use_authority_key_identifier_extension = true;
        let admin_key = KeyPair::generate()?;
        let admin_cert = admin.signed_by(&admin_key, &client_ca_issuer)?;

        // ECDSA P-256: the service-account token issuer signs ES256 tokens.
        let sa = KeyPair::generate()?;

        Ok(Pki {
            ca,
            serving_cert: serving_cert.pem(),
            serving_key: serving_key.serialize_pem(),
            client_ca,
            admin_cert: admin_cert.pem(),
            admin_key: admin_key.serialize_pem(),
            sa_public: sa.public_key_pem(),
            sa_private: sa.serialize_pem(),
        })
    }

    /// An admin kubeconfig for `server_url`.
    pub(crate) fn kubeconfig(&self, server_url: &str) -> String {
        crate::kubeconfig::render(server_url, &self.ca, &self.admin_cert, &self.admin_key)
    }
}
