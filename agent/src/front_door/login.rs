//! Who a client is: the TLS acceptor of `mqtt.tls` (with the client CAs, for mTLS), the user a
//! verified client certificate names, and the CONNECT's user name and password checked
//! against the users file.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::Ctx;
use crate::access::Access;
use crate::mqtt;

/// The TLS acceptor for `mqtt.tls`: the certificate chain and key (and the client CAs, for
/// mTLS) read now (start-up I/O); the error names the key and the file.
pub fn tls_acceptor(tls: &crate::config::TlsConfig) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::server::WebPkiClientVerifier;
    let (cert_file, key_file) = (&tls.cert_file, &tls.key_file);
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("mqtt.tls.cert_file: {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "mqtt.tls.cert_file: {}: no PEM certificate in it",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("mqtt.tls.key_file: {}: {e}", key_file.display()))?;
    let builder = tokio_rustls::rustls::ServerConfig::builder();
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let named = |e: &dyn std::fmt::Display| {
                format!("mqtt.tls.client_ca_file: {}: {e}", ca_file.display())
            };
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(ca_file).map_err(|e| named(&e))? {
                roots
                    .add(ca.map_err(|e| named(&e))?)
                    .map_err(|e| named(&e))?;
            }
            if roots.is_empty() {
                return Err(named(&"no PEM certificate in it"));
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = if tls.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| named(&e))?)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("mqtt.tls: the certificate and key do not go together: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The user a verified client certificate names (its subject's Common Name), if the client
/// presented one. `Err`: it did, but it names none (such a client is refused).
pub(super) fn certificate_identity(
    tls: &tokio_rustls::server::TlsStream<TcpStream>,
) -> Option<Result<String, ()>> {
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    let name = x509_parser::parse_x509_certificate(cert)
        .ok()
        .and_then(|(_, cert)| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        })
        .filter(|n| !n.is_empty());
    Some(name.ok_or(()))
}

/// The user a CONNECT authenticates as (`None`: anonymous), or the CONNACK codes refusing it
/// (MQTT 3.1.1, MQTT 5) and why. A verified client certificate (`identity`) is the user its
/// Common Name names, whatever the password; a CONNECT naming another user is refused.
pub(super) async fn authenticate(
    ctx: &Ctx,
    access: &Arc<Access>,
    connect: &mqtt::Connect,
    identity: Option<Result<String, ()>>,
) -> Result<Option<String>, (u8, u8, &'static str)> {
    const BAD_CREDENTIALS: (u8, u8) = (4, 0x86);
    const NOT_AUTHORIZED: (u8, u8) = (5, 0x87);
    match identity {
        Some(Ok(user)) if connect.username.as_ref().is_none_or(|u| *u == user) => {
            return Ok(Some(user));
        }
        Some(Ok(_)) => {
            return Err((
                BAD_CREDENTIALS.0,
                BAD_CREDENTIALS.1,
                "the user name is not the one the client certificate names",
            ));
        }
        Some(Err(())) => {
            return Err((
                NOT_AUTHORIZED.0,
                NOT_AUTHORIZED.1,
                "the client certificate has no Common Name to use as the user",
            ));
        }
        None => {}
    }
    match (&connect.username, &connect.password) {
        (Some(user), Some(password)) => {
            let _turn = ctx.verifying.acquire().await;
            let (access, u, p) = (access.clone(), user.clone(), password.clone());
            let ok = tokio::task::spawn_blocking(move || access.users.verify(&u, &p))
                .await
                .unwrap_or(false);
            if ok {
                Ok(Some(user.clone()))
            } else {
                Err((
                    BAD_CREDENTIALS.0,
                    BAD_CREDENTIALS.1,
                    "unknown user or wrong password",
                ))
            }
        }
        (Some(_), None) => Err((
            BAD_CREDENTIALS.0,
            BAD_CREDENTIALS.1,
            "a user name without a password",
        )),
        (None, _) if access.allow_anonymous => Ok(None),
        (None, _) => Err((
            NOT_AUTHORIZED.0,
            NOT_AUTHORIZED.1,
            "anonymous, and mqtt.auth.allow_anonymous is off",
        )),
    }
}
