//! TLS on the proxy listener (`listen.proxy_tls`): the certificate it
//! presents, read from PEM files and read again whenever they change.
//!
//! rustls asks a [`ResolvesServerCert`] for the certificate on every new
//! handshake; [`Certs`] answers with whatever it holds now, so swapping it
//! changes what new connections see while connections already made keep
//! theirs: nothing is dropped. A pair that fails to load (half written,
//! mismatched) is reported and the one in use stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::gateway::Gateway;

/// How often the files are looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Why a certificate and key cannot be used, and which of the two fields
/// (`cert` or `key`) to blame.
#[derive(Debug)]
pub struct PairError {
    pub field: &'static str,
    pub message: String,
}

/// Reads a PEM certificate chain and its private key, and checks that the
/// key is the certificate's.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, PairError> {
    let read = |field: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| PairError {
            field,
            message: format!("cannot read {}: {e}", path.display()),
        })
    };
    let (cert_path, key_path) = (cert, key);
    let cert_pem = read("cert", cert)?;
    let key_pem = read("key", key)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PairError {
            field: "cert",
            message: format!("{}: not PEM certificates: {e}", cert_path.display()),
        })?;
    if chain.is_empty() {
        return Err(PairError {
            field: "cert",
            message: format!("{}: holds no PEM certificate", cert_path.display()),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .ok()
        .ok_or_else(|| PairError {
            field: "key",
            message: format!("{}: holds no PEM private key", key_path.display()),
        })?;
    pingora::tls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default().ok_or_else(|| PairError {
        field: "key",
        message: "no TLS crypto provider".into(),
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| PairError {
        field: "key",
        message: format!(
            "{} does not go with {}: {e}",
            key_path.display(),
            cert_path.display()
        ),
    })
}

/// The certificate new handshakes get.
#[derive(Debug)]
pub struct Certs {
    current: ArcSwap<CertifiedKey>,
}

impl Certs {
    pub fn new(first: CertifiedKey) -> Arc<Certs> {
        Arc::new(Certs {
            current: ArcSwap::from_pointee(first),
        })
    }

    fn replace(&self, next: CertifiedKey) {
        self.current.store(Arc::new(next));
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What the files looked like when last read: a renewal (written in place,
/// renamed over, or a symlink swapped) changes one of these.
type Stamp = Option<(PathBuf, PathBuf, SystemTime, u64, SystemTime, u64)>;

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((
        cert.to_path_buf(),
        key.to_path_buf(),
        c.modified().ok()?,
        c.len(),
        k.modified().ok()?,
        k.len(),
    ))
}

/// Background service: reads the pair again when the files change (or a
/// reloaded config names other files), every [`CHECK_EVERY`].
pub struct Reloader {
    pub gateway: Arc<Gateway>,
    pub certs: Arc<Certs>,
}

impl Reloader {
    /// Looks at the files once; swaps in the pair if they changed and load.
    fn check(&self, last: &mut Stamp) {
        let config = self.gateway.config();
        let Some(tls) = &config.listen.proxy_tls else {
            return;
        };
        let now = stamp(&tls.cert, &tls.key);
        if now.is_none() || now == *last {
            return;
        }
        match load_pair(&tls.cert, &tls.key) {
            Ok(pair) => {
                self.certs.replace(pair);
                if last.is_some() {
                    tracing::info!(cert = %tls.cert.display(), "TLS certificate reloaded");
                }
                *last = now;
            }
            // Tried again at the next change (a renewal half written now
            // is whole at its next write).
            Err(e) => {
                tracing::error!(
                    "listen.proxy_tls.{}: {}; the certificate in use stays",
                    e.field,
                    e.message
                );
                *last = now;
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut last = {
            let config = self.gateway.config();
            config
                .listen
                .proxy_tls
                .as_ref()
                .and_then(|t| stamp(&t.cert, &t.key))
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => self.check(&mut last),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        (c, k)
    }

    #[test]
    fn a_pair_must_load_and_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pair(dir.path(), "a");
        assert!(load_pair(&cert, &key).is_ok());
        let (_, other_key) = pair(dir.path(), "b");
        let e = load_pair(&cert, &other_key).expect_err("mismatched");
        assert_eq!(e.field, "key");
        assert!(e.message.contains("does not go with"), "{}", e.message);
        let e = load_pair(&dir.path().join("none.crt"), &key).expect_err("missing");
        assert_eq!(e.field, "cert");
        std::fs::write(dir.path().join("junk.crt"), "not pem").expect("write");
        let e = load_pair(&dir.path().join("junk.crt"), &key).expect_err("junk");
        assert!(e.message.contains("no PEM certificate"), "{}", e.message);
        let e = load_pair(&cert, &cert).expect_err("a cert as key");
        assert!(e.message.contains("no PEM private key"), "{}", e.message);
    }
}
