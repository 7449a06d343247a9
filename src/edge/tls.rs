//! TLS for the edge: certificates from a folder, chosen by SNI, reloaded when they change.
//!
//! The folder holds pairs `<name>.crt` (PEM chain) + `<name>.key` (PEM private key), where
//! `<name>` is the hostname they serve (`hello.example.com`), or `_.example.com` for the
//! wildcard `*.example.com`. A hello's server name picks the exact name first, then the
//! wildcard one label up. The folder is checked every 2 s; a pair that fails to load is
//! logged (naming the file) and the previous certificates stay in use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// Certificates by server name (wildcards stored as `*.example.com`).
#[derive(Debug, Default)]
pub struct CertStore {
    certs: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let certs = self.certs.load();
        if let Some(c) = certs.get(&name) {
            return Some(c.clone());
        }
        let (_, parent) = name.split_once('.')?;
        certs.get(&format!("*.{parent}")).cloned()
    }
}

/// Loads every pair in `dir`. Errors name the file.
pub fn load_dir(dir: &Path) -> Result<HashMap<String, Arc<CertifiedKey>>, String> {
    let provider = rustls::crypto::ring::default_provider();
    let mut out = HashMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("crt") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let key_path = path.with_extension("key");
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in the file", path.display()));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| format!("{}: {e}", key_path.display()))?;
        let certified = CertifiedKey::from_der(certs, key, &provider)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let name = match stem.strip_prefix("_.") {
            Some(rest) => format!("*.{rest}"),
            None => stem.to_string(),
        };
        out.insert(name.to_ascii_lowercase(), Arc::new(certified));
    }
    Ok(out)
}

/// The newest modification time in the folder, to notice replaced files cheaply.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut files: Vec<(PathBuf, Option<SystemTime>)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| (e.path(), e.metadata().and_then(|m| m.modified()).ok()))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A TLS acceptor (h2 and http/1.1 by ALPN) over the folder's certificates, with a task
/// reloading them when the folder changes.
pub fn acceptor(
    dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let store = Arc::new(CertStore::default());
    let initial = load_dir(dir).map_err(|e| anyhow::anyhow!("loading certificates: {e}"))?;
    tracing::info!(certificates = initial.len(), dir = %dir.display(), "edge certificates loaded");
    store.certs.store(Arc::new(initial));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(store.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        let mut seen = fingerprint(&dir);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            let now = fingerprint(&dir);
            if now == seen {
                continue;
            }
            seen = now;
            match load_dir(&dir) {
                Ok(certs) => {
                    tracing::info!(certificates = certs.len(), "edge certificates reloaded");
                    store.certs.store(Arc::new(certs));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "certificates not reloaded; the previous ones stay")
                }
            }
        }
    });
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
