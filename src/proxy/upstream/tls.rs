//! TLS to a cluster's endpoints (`clusters.<name>.tls`): the upstream's certificate is
//! verified against the configured CA bundle, for the SNI name (the endpoint's host by
//! default); a client certificate makes it mutual; ALPN agrees on HTTP/2 or HTTP/1.1.
//!
//! The files are read again every `reload_ms`, as the listener's are: a changed set
//! that loads serves the connections opened from then on (pooled ones keep theirs); a
//! set that does not load is refused, logged once, and the current one stays. Each
//! reload counts in `acge_upstream_tls_reloads_total{cluster,result}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{ClusterTlsConfig, Protocol};
use crate::proxy::server::TlsError;
use crate::telemetry::UPSTREAM_TLS_RELOADS_TOTAL;

/// One cluster's client TLS settings, as last loaded.
pub struct UpstreamTls {
    cluster: String,
    files: Files,
    sni: Option<ServerName<'static>>,
    alpn: Vec<Vec<u8>>,
    /// The protocol the cluster speaks: ALPN must agree on it.
    protocol: Protocol,
    connector: ArcSwap<TlsConnector>,
    /// SHA-256 of the files as last read, so unchanged files are not parsed again.
    digest: Mutex<[u8; 32]>,
}

impl UpstreamTls {
    /// Loads the CA bundle (and the client pair); refuses files that do not load.
    pub fn load(
        cluster: &str,
        config: &ClusterTlsConfig,
        protocol: Protocol,
    ) -> Result<Arc<Self>, TlsError> {
        let alpn = match &config.alpn {
            Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
            None => match protocol {
                Protocol::Http2 => vec![b"h2".to_vec()],
                Protocol::Http1 => vec![b"http/1.1".to_vec()],
            },
        };
        let files = Files {
            ca: config.ca.clone(),
            pair: config.cert.clone().zip(config.key.clone()),
        };
        let bytes = files.read()?;
        let connector = files.build(&bytes, &alpn)?;
        Ok(Arc::new(Self {
            cluster: cluster.to_string(),
            files,
            sni: config
                .sni
                .as_deref()
                .and_then(|s| ServerName::try_from(s.to_string()).ok()),
            alpn,
            protocol,
            connector: ArcSwap::from_pointee(connector),
            digest: Mutex::new(sha(&bytes)),
        }))
    }

    /// Reads the files again: `Ok(true)` when they changed and now serve new
    /// connections, `Ok(false)` when they are as they were (or as they were when they
    /// last failed), an error (the current set kept) when changed files do not load.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let mut last = self.digest.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, digest) = match self.files.read() {
            Ok(bytes) => {
                let digest = sha(&bytes);
                (Ok(bytes), digest)
            }
            Err(e) => {
                let digest = sha(&[e.to_string().into_bytes()]);
                (Err(e), digest)
            }
        };
        if *last == digest {
            return Ok(false);
        }
        // Remembered either way: files that failed are not reported again until they
        // change.
        *last = digest;
        let connector = self.files.build(&bytes?, &self.alpn)?;
        self.connector.store(Arc::new(connector));
        Ok(true)
    }

    /// The TLS handshake over `tcp` with the endpoint `host`; fails when ALPN did not
    /// agree on the cluster's protocol.
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, String> {
        let name = match &self.sni {
            Some(name) => name.clone(),
            None => ServerName::try_from(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            )
            .map_err(|_| format!("`{host}` is not a name to verify; set tls.sni"))?,
        };
        let connector = self.connector.load_full();
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let agreed = stream.get_ref().1.alpn_protocol();
        let wanted: &[u8] = match self.protocol {
            Protocol::Http2 => b"h2",
            Protocol::Http1 => b"http/1.1",
        };
        // An upstream that ignores ALPN speaks HTTP/1.1 by default.
        let ok = match agreed {
            Some(p) => p == wanted,
            None => self.protocol == Protocol::Http1,
        };
        if !ok {
            return Err(format!(
                "ALPN agreed on {} but the cluster's protocol is {}",
                agreed.map_or("nothing".into(), |p| String::from_utf8_lossy(p)
                    .into_owned()),
                String::from_utf8_lossy(wanted)
            ));
        }
        Ok(stream)
    }
}

/// The files a cluster's TLS is read from.
struct Files {
    ca: PathBuf,
    pair: Option<(PathBuf, PathBuf)>,
}

impl Files {
    fn read(&self) -> Result<Vec<Vec<u8>>, TlsError> {
        let mut files = vec![read(&self.ca)?];
        if let Some((cert, key)) = &self.pair {
            files.push(read(cert)?);
            files.push(read(key)?);
        }
        Ok(files)
    }

    fn build(&self, files: &[Vec<u8>], alpn: &[Vec<u8>]) -> Result<TlsConnector, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut files[0].as_slice()).filter_map(Result::ok) {
            roots.add(cert)?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoCert {
                path: self.ca.display().to_string(),
            });
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match &self.pair {
            Some((cert_path, key_path)) => {
                let certs: Vec<_> = rustls_pemfile::certs(&mut files[1].as_slice())
                    .filter_map(Result::ok)
                    .collect();
                if certs.is_empty() {
                    return Err(TlsError::NoCert {
                        path: cert_path.display().to_string(),
                    });
                }
                let key = rustls_pemfile::private_key(&mut files[2].as_slice())
                    .ok()
                    .flatten()
                    .ok_or_else(|| TlsError::NoKey {
                        path: key_path.display().to_string(),
                    })?;
                builder.with_client_auth_cert(certs, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.to_vec();
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn sha(files: &[Vec<u8>]) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in files {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f);
    }
    h.finalize().into()
}

/// Reads the cluster's files again every `every`, until the cluster is dropped.
pub fn spawn_reload(tls: Weak<UpstreamTls>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(tls) = tls.upgrade() else { return };
            let cluster = tls.cluster.clone();
            let result = tokio::task::spawn_blocking(move || tls.reload()).await;
            let counted = |result: &'static str| {
                metrics::counter!(UPSTREAM_TLS_RELOADS_TOTAL, "cluster" => cluster.clone(), "result" => result)
                    .increment(1)
            };
            match result {
                Ok(Ok(true)) => {
                    counted("loaded");
                    tracing::info!(cluster = %cluster, "upstream TLS files reloaded");
                }
                Ok(Err(e)) => {
                    counted("refused");
                    tracing::warn!(cluster = %cluster, error = %e, "upstream TLS files not reloaded; the current ones stay");
                }
                _ => {}
            }
        }
    });
}
