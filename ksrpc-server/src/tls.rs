//! `[server.tls]`: HTTPS and WSS on the server's one port, with rustls (ring
//! provider) and a PEM certificate chain and key read at start-up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// `[server.tls]`: both keys are required.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file with the certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the TLS settings could not be used; each names the config key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or parsed as PEM.
    #[error("server.tls.{key}: {path}: {reason}")]
    File {
        /// `cert` or `key`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the certificate and key (e.g. a key that does not
    /// match the certificate).
    #[error("server.tls: the certificate and key cannot be used together: {0}")]
    Rejected(#[from] rustls::Error),
}

fn file_error(key: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { key, path: path.to_owned(), reason: reason.to_string() }
}

impl TlsSection {
    /// The rustls server configuration: TLS 1.2 and 1.3 with ring, no
    /// client certificates.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| file_error("cert", &self.cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error("cert", &self.cert, e))?;
        if certs.is_empty() {
            return Err(file_error("cert", &self.cert, "no CERTIFICATE block in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| file_error("key", &self.key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?)
    }
}
