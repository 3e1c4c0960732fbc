//! TLS for the connections skiff opens (to PostgreSQL and Redis servers) and
//! accepts (from PostgreSQL clients): certificate files, rustls settings,
//! readable handshake errors, and a stream that is plain TCP or TLS.

mod stream;

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

pub use stream::{ReadHalf, Stream, WriteHalf};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Failure to load certificates or keys, or to build TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} {path} contains no PEM {kind}")]
    Empty {
        what: &'static str,
        path: String,
        kind: &'static str,
    },
    #[error("{0}")]
    Settings(String),
}

/// Checks a TLS client makes on a server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verify {
    /// Nothing: the connection is encrypted, but the server is not
    /// authenticated.
    Nothing,
    /// The certificate chains to a trusted CA; any host name is accepted.
    Chain,
    /// The chain, and that the certificate names the host (or IP address)
    /// connected to.
    ChainAndName,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn settings_error(err: rustls::Error) -> TlsError {
    TlsError::Settings(err.to_string())
}

/// Trusted CA certificates: those in the PEM bundle `ca_file`, or the
/// Mozilla root set that webpki-roots ships when no file is given.
pub fn load_roots(ca_file: Option<&Path>) -> Result<Arc<RootCertStore>, TlsError> {
    let Some(path) = ca_file else {
        let roots = webpki_roots::TLS_SERVER_ROOTS.to_vec();
        return Ok(Arc::new(RootCertStore { roots }));
    };
    let certs = read_certs(path, "CA file")?;
    let mut store = RootCertStore::empty();
    for cert in certs {
        store.add(cert).map_err(|err| TlsError::File {
            what: "CA file",
            path: path.display().to_string(),
            reason: format!("invalid CA certificate: {err}"),
        })?;
    }
    Ok(Arc::new(store))
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| file_error(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| file_error(err.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.display().to_string(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// Builds client settings that check the server's certificate as `verify`
/// selects, against `roots`.
pub fn client_config(
    verify: Verify,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(settings_error)?;
    let config = match verify {
        Verify::ChainAndName => builder.with_root_certificates(roots).with_no_client_auth(),
        Verify::Chain => {
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|err| TlsError::Settings(err.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { webpki }))
                .with_no_client_auth()
        }
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCheck {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Builds server settings for accepting clients with the certificate chain
/// in `cert_file` and the private key in `key_file`, both PEM.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert_file, "certificate file")?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|err| match err {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "key file",
            path: key_file.display().to_string(),
            kind: "private key",
        },
        other => TlsError::File {
            what: "key file",
            path: key_file.display().to_string(),
            reason: other.to_string(),
        },
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(settings_error)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| {
            TlsError::Settings(format!(
                "certificate {} and key {} do not make a usable pair: {err}",
                cert_file.display(),
                key_file.display()
            ))
        })?;
    Ok(Arc::new(config))
}

/// Converts a `host` setting (a DNS name or an IP address, IPv6 possibly
/// in brackets) into the name a server's certificate is checked against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(bare.to_string()).map_err(|_| {
        TlsError::Settings(format!(
            "{host:?} is neither a DNS name nor an IP address, so a certificate cannot be checked against it"
        ))
    })
}

/// Explains a failed TLS handshake in a user's terms: the rustls error
/// carried in `err` when there is one, the I/O error otherwise.
pub fn describe_handshake_error(err: &std::io::Error, name: &ServerName<'_>) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return err.to_string();
    };
    let host = name.to_str();
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "the server's certificate is not signed by a \
                 trusted CA (give the CA that signed it as the CA file)"
                .to_string(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server's certificate does not name the host {host:?}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet".to_string()
            }
            CertificateError::Revoked => "the server's certificate is revoked".to_string(),
            other => format!("the server's certificate is invalid: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => {
            format!("the server ended the handshake with the alert {alert:?}")
        }
        other => other.to_string(),
    }
}

/// Checks a server's certificate chain but not the name in it, as libpq's
/// `verify-ca` does.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The verifier checks the chain first and the name last, so a name
        // error means the chain passed.
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Accepts any server certificate (libpq's `require` without a root
/// certificate), while still checking that the server has the certificate's
/// private key.
#[derive(Debug)]
struct NoCheck {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_hosts() {
        assert!(matches!(
            server_name("db.example.com").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(matches!(
            server_name("10.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        let err = server_name("not a host").unwrap_err().to_string();
        assert!(
            err.contains("neither a DNS name nor an IP address"),
            "{err}"
        );
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = load_roots(Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let err = load_roots(Some(&empty)).unwrap_err().to_string();
        assert!(err.contains("contains no PEM certificate"), "{err}");

        let roots = load_roots(None).unwrap();
        assert!(!roots.is_empty(), "the built-in roots are loaded");
    }

    #[test]
    fn key_file_without_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "").unwrap();
        std::fs::write(&key, "").unwrap();
        let err = server_config(&cert, &key).unwrap_err().to_string();
        assert!(
            err.contains("cert.pem contains no PEM certificate"),
            "{err}"
        );
    }
}
