//! Test PKI, generated in Rust for every run: nothing is read from or left in the checkout.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate authority that signs leaf certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone)]
pub struct CertPair {
    pub cert: String,
    pub key: String,
}

fn name(cn: &str, orgs: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    for org in orgs {
        dn.push(DnType::OrganizationName, *org);
    }
    dn
}

impl Ca {
    pub fn new(cn: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(cn, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)
            .with_context(|| format!("self-signing CA {cn}"))?;
        Ok(Ca { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(
        &self,
        cn: &str,
        orgs: &[&str],
        sans: &[&str],
        eku: ExtendedKeyUsagePurpose,
    ) -> Result<CertPair> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(cn, orgs);
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*san).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![eku];
        let key = KeyPair::generate()?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing certificate for {cn}"))?;
        Ok(CertPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// A TLS serving certificate for the given DNS names and IP addresses.
    pub fn serving(&self, cn: &str, sans: &[&str]) -> Result<CertPair> {
        self.issue(cn, &[], sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate: the CN is the user name, the organizations its groups.
    pub fn client(&self, cn: &str, groups: &[&str]) -> Result<CertPair> {
        self.issue(cn, groups, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The service-account signing key pair (ECDSA P-256): (private PKCS#8 PEM, public PEM).
pub fn service_account_keys() -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}
