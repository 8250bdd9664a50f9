//! The listener's TLS: certificate and key from PEM files, ALPN h2 and http/1.1, and
//! their reload. The acceptor asks [`Certificates`] for the pair at each handshake, so
//! a reload ([`Certificates::reload`]) serves new handshakes with the new pair while
//! open connections keep the one they were made with. A pair that does not load (a
//! file half-written, a key that is not the certificate's) is refused whole and the
//! current one stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCert { path: String },
    #[error("{path} holds no PEM private key")]
    NoKey { path: String },
    #[error("the certificate and key do not make a TLS config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The listener's certificate and key, as last loaded from their files.
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// SHA-256 of the two files' bytes as last read, so an unchanged pair is not parsed.
    digest: Mutex<[u8; 32]>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl Certificates {
    /// Loads the pair, refusing a certificate and key that do not match.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (pair, digest) = read_pair(cert, key, &provider)?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee(pair),
            digest: Mutex::new(digest),
        }))
    }

    /// Reads the files again: `Ok(true)` when they changed and the new pair now serves
    /// new handshakes, `Ok(false)` when they are as they were (or as they were when
    /// they last failed), an error (and the current pair kept) when changed files do
    /// not load.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let mut last = self.digest.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = match read_both(&self.cert, &self.key) {
            Ok(bytes) => bytes,
            Err(e) => {
                // A file that cannot be read is reported once too, until that changes.
                let digest = sha(&(e.to_string().into_bytes(), Vec::new()));
                if *last == digest {
                    return Ok(false);
                }
                *last = digest;
                return Err(e);
            }
        };
        let digest = sha(&bytes);
        if *last == digest {
            return Ok(false);
        }
        // Remembered either way: files that failed are not parsed (nor reported) again
        // until they change.
        *last = digest;
        let pair = parse_pair(&self.cert, &self.key, &bytes, &self.provider)?;
        self.current.store(Arc::new(pair));
        Ok(true)
    }
}

fn read_both(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    Ok((read(cert)?, read(key)?))
}

fn sha((cert, key): &(Vec<u8>, Vec<u8>)) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_le_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

fn read_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, [u8; 32]), TlsError> {
    let bytes = read_both(cert, key)?;
    let pair = parse_pair(cert, key, &bytes, provider)?;
    Ok((pair, sha(&bytes)))
}

fn parse_pair(
    cert: &Path,
    key: &Path,
    (cert_pem, key_pem): &(Vec<u8>, Vec<u8>),
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: cert.display().to_string(),
        });
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey {
            path: key.display().to_string(),
        })?;
    Ok(CertifiedKey::from_der(certs, key, provider)?)
}

/// A TLS acceptor offering h2 and http/1.1 by ALPN, serving `certs`' current pair.
pub fn acceptor(certs: Arc<Certificates>) -> Result<TlsAcceptor, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(certs.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
