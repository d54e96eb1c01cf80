//! Certificates: a local CA and a server certificate for `starling init`, and loading PEM files
//! into rustls types (through `quinn::rustls`, ring provider).
//!
//! The CA made here is for local use and tests: a production deployment brings its own
//! certificate and key (any CA the clients' `ca_pem` trusts).

use quinn::rustls::pki_types::pem::PemObject;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};
use std::path::{Path, PathBuf};

/// Why certificates could not be made or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM certificate or key.
    #[error("{what}: {detail}")]
    Pem {
        /// Which file or input.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the certificate or key.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] quinn::rustls::Error),
}

/// A CA and a server certificate it signed, all PEM.
#[derive(Clone, Debug)]
pub struct LocalPki {
    /// The CA certificate (what clients trust).
    pub ca_cert_pem: String,
    /// The CA's private key (keep offline; needed only to sign more certificates).
    pub ca_key_pem: String,
    /// The server certificate.
    pub server_cert_pem: String,
    /// The server's private key (PKCS#8).
    pub server_key_pem: String,
}

impl LocalPki {
    /// A new CA ("Starling local CA") and a server certificate for `names` (DNS names or IP
    /// addresses), valid from last year to ten years ahead.
    pub fn generate(names: &[&str]) -> Result<Self, TlsError> {
        let year = current_year();
        let (not_before, not_after) = (date_time_ymd(year - 1, 1, 1), date_time_ymd(year + 10, 1, 1));

        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name.push(DnType::CommonName, "Starling local CA");
        ca.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca, ca_key);

        let mut server = CertificateParams::new(Vec::<String>::new())?;
        for name in names {
            server.subject_alt_names.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into()?),
            });
        }
        server.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("starling"));
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.use_authority_key_identifier_extension = true;
        server.not_before = not_before;
        server.not_after = not_after;
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &issuer)?;
        Ok(Self {
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem,
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
        })
    }
}

fn current_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

/// Every certificate in `pem`, in order.
pub fn certs_from_pem(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what: what.into(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what: what.into(), detail: "no certificate in PEM".into() });
    }
    Ok(certs)
}

/// The private key in `pem`.
pub fn key_from_pem(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem { what: what.into(), detail: e.to_string() })
}

/// Reads a certificate chain and key from PEM files.
pub fn load_cert_and_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.to_path_buf(), source });
    let certs = certs_from_pem(&cert.display().to_string(), &read(cert)?)?;
    let key = key_from_pem(&key.display().to_string(), &read(key)?)?;
    Ok((certs, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pki_parses() {
        let pki = LocalPki::generate(&["localhost", "127.0.0.1"]).unwrap();
        assert_eq!(certs_from_pem("ca", pki.ca_cert_pem.as_bytes()).unwrap().len(), 1);
        assert_eq!(certs_from_pem("server", pki.server_cert_pem.as_bytes()).unwrap().len(), 1);
        key_from_pem("key", pki.server_key_pem.as_bytes()).unwrap();
        assert!(certs_from_pem("junk", b"not pem").is_err());
    }
}
