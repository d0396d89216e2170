//! TLS for the public listener (step 1): TLS 1.2 and 1.3 only, rustls' safe
//! default cipher suites, ALPN h2 and http/1.1, certificate chain and key
//! from PEM. Reloaded on SIGHUP by building a new server config; a bad file
//! leaves the old one in place. The handshake and the TLS stream are
//! `server/tls_stream.rs`.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsPaths;
use crate::config_error::ConfigError;

/// A ready server config plus what operators want to know about its
/// certificate.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub subject: String,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Tls {
    pub fn load(paths: &TlsPaths) -> Result<Self, ConfigError> {
        let chain = load_chain(&paths.cert)?;
        let key = PrivateKeyDer::from_pem_file(&paths.key)
            .map_err(|e| ConfigError::new(format!("TLS key {}: {e}", paths.key.display())))?;
        let (subject, not_after) = describe(&chain[0]).map_err(|e| {
            ConfigError::new(format!("TLS certificate {}: {e}", paths.cert.display()))
        })?;
        if let Some(ca) = is_ca(&chain[0]) {
            return Err(ConfigError::new(format!(
                "TLS certificate {}: the first certificate ({ca}) is a CA certificate \
                 (basicConstraints CA:TRUE); clients refuse it as a server certificate \
                 (CaUsedAsEndEntity). Put the server's own certificate first, followed by \
                 its intermediates",
                paths.cert.display()
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError::new(format!("TLS: {e}")))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    ConfigError::new(format!(
                        "TLS key {} does not belong to the certificate {} (their public keys \
                     differ); point --tls-key at the key the certificate was issued for",
                        paths.key.display(),
                        paths.cert.display()
                    ))
                }
                e => ConfigError::new(format!(
                    "TLS certificate {} / key {}: {e}",
                    paths.cert.display(),
                    paths.key.display()
                )),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            subject,
            not_after,
        })
    }
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| ConfigError::new(format!("TLS certificate {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(format!("TLS certificate {}: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(ConfigError::new(format!(
            "TLS certificate {}: no CERTIFICATE block",
            path.display()
        )));
    }
    Ok(chain)
}

/// The subject of `cert` if its basicConstraints say CA:TRUE: rustls
/// accepts such a chain, but every client fails the handshake on it.
fn is_ca(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let constraints = parsed.basic_constraints().ok()??;
    constraints.value.ca.then(|| parsed.subject().to_string())
}

fn describe(cert: &CertificateDer<'_>) -> Result<(String, i64), String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    Ok((
        parsed.subject().to_string(),
        parsed.validity().not_after.timestamp(),
    ))
}
