//! TLS for `wss://` gateways: rustls (ring provider) with the system's trusted roots, plus any
//! CA certificates the application adds ([`TlsConfig::with_ca_file`], e.g. a self-signed
//! gateway's certificate or a private CA).

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::error::{Error, Result};

/// Which certificates a `wss://` gateway may present; see the module doc.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    roots: RootCertStore,
}

impl TlsConfig {
    /// The system's trusted roots (the default for `wss://`).
    pub fn system() -> TlsConfig {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "a system root certificate could not be loaded");
        }
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system root certificates");
        TlsConfig { roots }
    }

    /// Only the certificates in `path` (PEM), not the system's.
    pub fn only_ca_file(path: impl AsRef<Path>) -> Result<TlsConfig> {
        TlsConfig {
            roots: RootCertStore::empty(),
        }
        .with_ca_file(path)
    }

    /// Also trusts the certificates in `path` (PEM): a private CA, or a self-signed gateway's
    /// own certificate.
    pub fn with_ca_file(mut self, path: impl AsRef<Path>) -> Result<TlsConfig> {
        let path = path.as_ref();
        let bad = |reason: String| Error::Tls(format!("{}: {reason}", path.display()));
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in the file".into()));
        }
        for cert in certs {
            self.roots
                .add(cert)
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        }
        Ok(self)
    }

    /// The rustls configuration a connection uses (ring provider); other TLS clients of the
    /// same gateway, such as a REST client, can share it.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        Arc::new(config)
    }
}
