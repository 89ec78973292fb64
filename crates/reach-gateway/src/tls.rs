//! TLS on the public listener: `server.tls_cert_path` and `server.tls_key_path` (PEM), served
//! with rustls, HTTP/1.1 only (ALPN `http/1.1`), TLS 1.2 and 1.3.
//!
//! The certificate sits behind a resolver that [`Tls::reload`] swaps (on SIGHUP): handshakes
//! after the swap present the new certificate, connections already open keep theirs. A file
//! that cannot be read, holds no certificate or key, or a key that does not match the
//! certificate is an error naming the key of the configuration, both at start and at a reload
//! (which then keeps the certificate it had).
//!
//! The crypto provider is rustls's `ring`: it builds with a C compiler alone (aws-lc-rs, the
//! default, also wants cmake and a longer build), and covers what a WebSocket gateway needs
//! (ECDHE with X25519 and P-256, AES-GCM and ChaCha20-Poly1305, RSA and ECDSA certificates).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Why a certificate or key could not be used; names the configuration key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls_cert_path: {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("server.tls_key_path: {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("server.tls_key_path: {path} is not the key of the certificate in {cert}")]
    Mismatch { path: PathBuf, cert: PathBuf },
}

/// The public listener's TLS: an acceptor and the certificate it presents.
pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    resolver: Arc<Reloadable>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate chain and the key; see the module doc.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Tls, TlsError> {
        let key = certified_key(cert_path, key_path)?;
        warn_if_others_can_read(key_path);
        let resolver = Arc::new(Reloadable(RwLock::new(Arc::new(key))));
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Cert {
                    path: cert_path.to_owned(),
                    reason: e.to_string(),
                })?
                .with_no_client_auth()
                .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the files again and presents the new certificate from the next handshake on.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = certified_key(&self.cert_path, &self.key_path)?;
        warn_if_others_can_read(&self.key_path);
        *self.resolver.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// The certificate every handshake gets, swapped whole by a reload.
#[derive(Debug)]
struct Reloadable(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

/// A private key that other users may read is worth a warning (not a refusal: the operator
/// may have reasons, e.g. a group shared with a renewal agent).
fn warn_if_others_can_read(key_path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(key_path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %key_path.display(),
                    mode = format!("{mode:o}"),
                    "server.tls_key_path can be read by other users than its owner (chmod 600 it)"
                );
            }
        }
    }
}

fn certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert_path.to_owned(),
        reason,
    };
    let key_err = |reason: String| TlsError::Key {
        path: key_path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            key_err("no PEM private key in the file".into())
        }
        other => key_err(other.to_string()),
    })?;
    let signing = provider::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        path: key_path.to_owned(),
        cert: cert_path.to_owned(),
    })?;
    Ok(certified)
}
