//! HTTPS for the ingest's listener (rustls), reloaded without a restart.
//!
//! The certificate, its key and the device CAs (mTLS) are read at start, and again on SIGHUP
//! (`systemctl reload`) or when one of the files changes (checked every
//! [`CHECK_INTERVAL`]): a renewed certificate is served to new connections, connections
//! already open keep theirs. A reload that fails (a half-written file, a key that does not go
//! with the certificate) keeps the previous certificate and logs why; it never stops the
//! ingest.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// How often the files are checked for changes.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The TLS acceptor of the listener, and the files it was built from.
pub struct Reloadable {
    files: TlsFiles,
    current: RwLock<(TlsAcceptor, Stamp)>,
}

/// A TLS file that cannot be used: the message names the config key, the file and what is
/// wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// What the files looked like when they were read: (modified time, length) of each.
type Stamp = Vec<Option<(SystemTime, u64)>>;

impl Reloadable {
    /// Reads `files`; the error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Reloadable, TlsError> {
        let stamp = stamp(&files);
        let acceptor = acceptor(&files)?;
        Ok(Reloadable {
            files,
            current: RwLock::new((acceptor, stamp)),
        })
    }

    /// The acceptor for a new connection.
    pub fn current(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Reads the files again if `forced` or if they changed since the last read; on failure
    /// the current certificate stays (and the same files are not retried until they change
    /// again or another SIGHUP comes). Returns whether a new certificate is now served.
    pub fn reload(&self, forced: bool) -> bool {
        let now = stamp(&self.files);
        {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            if !forced && current.1 == now {
                return false;
            }
        }
        let result = acceptor(&self.files);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        current.1 = now;
        match result {
            Ok(acceptor) => {
                current.0 = acceptor;
                tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed: still serving the previous certificate");
                false
            }
        }
    }
}

fn stamp(files: &TlsFiles) -> Stamp {
    [
        Some(files.cert_file.as_path()),
        Some(files.key_file.as_path()),
        files.client_ca_file.as_deref(),
    ]
    .into_iter()
    .flatten()
    .map(|p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
    .collect()
}

/// The TLS acceptor for `tls`: certificate and key (and the device CAs, for mTLS) read now.
fn acceptor(tls: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("tls.cert_file: {}: {e}", tls.cert_file.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "tls.cert_file: {}: no PEM certificate in it",
            tls.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| TlsError(format!("tls.key_file: {}: {e}", tls.key_file.display())))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let named = |e: &dyn std::fmt::Display| {
                TlsError(format!("tls.client_ca_file: {}: {e}", ca_file.display()))
            };
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(ca_file).map_err(|e| named(&e))? {
                roots
                    .add(ca.map_err(|e| named(&e))?)
                    .map_err(|e| named(&e))?;
            }
            // Devices without a certificate still log in with their token.
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|e| named(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError(format!(
            "tls: the certificate and key do not go together: {e}"
        ))
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The device id a verified client certificate names: its subject's Common Name.
pub fn certificate_device(
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Option<String> {
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}
