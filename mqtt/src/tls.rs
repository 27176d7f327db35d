//! TLS for the hub link and the operator's CLI: one crypto provider (ring) for the whole
//! program, the client configuration (configured CA or system roots, optional client
//! certificate), and the translation of handshake failures into messages an operator can act on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::{AlertDescription, CertificateError, RootCertStore};

use crate::HubError;

/// Installs ring as the process-wide rustls crypto provider.
///
/// rustls 0.23 panics on the first handshake when more than one provider is compiled in and
/// none was chosen; the workspace builds only ring, and this makes the choice explicit anyway.
/// The binary calls it first thing and so do the tests. A second call does nothing.
pub fn install_crypto_provider() {
    // Err means a provider is installed already (an earlier call): nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where the TLS material comes from; the paths are kept for error messages.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The CA that signs the broker's certificate; `None` uses the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and private key (PEM) for mutual TLS.
    pub client_auth: Option<(PathBuf, PathBuf)>,
    /// How the CA setting is named to the user (`hub.ca_file` on a device, `--ca` for operators).
    pub ca_setting: &'static str,
}

impl TlsFiles {
    /// Says where trust comes from, for "not signed by …" messages.
    pub fn trust_description(&self) -> String {
        match &self.ca_file {
            Some(path) => format!("the CA in {} ({})", self.ca_setting, path.display()),
            None => "any of the system's root CAs".to_string(),
        }
    }
}

/// Builds the rustls client configuration.
///
/// Fails when a file cannot be read, holds no certificate or key, or the key does not match
/// the certificate.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, HubError> {
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            let certs = read_certs(path, "CA certificate")?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(HubError::NoCertificate {
                    what: "CA certificate",
                    path: path.clone(),
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(HubError::NoSystemRoots);
            }
        }
    }
    // The provider is passed explicitly so this works even if nobody installed a default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| HubError::TlsSetup(e.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HubError::TlsSetup(e.to_string()))?
        // The standard WebPKI checks, with one change: the time they are judged at is never
        // before this build could run (see `FlooredTime`).
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FlooredTime {
            inner: verifier,
            floor: UnixTime::since_unix_epoch(std::time::Duration::from_millis(
                outpost_core::time::PLAUSIBLE_AFTER_MS,
            )),
        }));
    match &files.client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = read_certs(cert, "client certificate")?;
            if chain.is_empty() {
                return Err(HubError::NoCertificate {
                    what: "client certificate",
                    path: cert.clone(),
                });
            }
            let key_der = read_key(key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                HubError::TlsSetup(format!(
                    "client certificate {} and key {} do not go together: {e}",
                    cert.display(),
                    key.display()
                ))
            })
        }
    }
}

/// The broker's certificate judged at the device's time, or at the earliest time this build
/// can run if the clock reads earlier.
///
/// A device without a real-time clock boots at 1970: every certificate is "not valid yet"
/// then, and the device could never reach the hub that would let it learn the time (through
/// NTP or a deployment). A clock that reads earlier than the build cannot be right, so the
/// floor takes its place — as systemd sets the clock to its build time at boot. Nothing else
/// changes: the chain, names and signatures are checked as before, and an expired certificate
/// is still refused when the clock is set.
#[derive(Debug)]
struct FlooredTime {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    floor: UnixTime,
}

impl rustls::client::danger::ServerCertVerifier for FlooredTime {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let now = if now.as_secs() < self.floor.as_secs() {
            self.floor
        } else {
            now
        };
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, HubError> {
    let bytes = std::fs::read(path).map_err(|source| HubError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| HubError::NoCertificate {
            what,
            path: path.to_path_buf(),
        })?;
    if certs.is_empty() {
        return Err(HubError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, HubError> {
    let bytes = std::fs::read(path).map_err(|source| HubError::ReadFile {
        what: "private key",
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| HubError::NoKey {
        path: path.to_path_buf(),
    })
}

/// Finds the rustls error inside what rumqttc returns, wherever it is wrapped: a failed
/// handshake comes back as `Tls(Io(..))`, a refusal after the handshake (TLS 1.3 client
/// certificates are checked then) as an I/O error on the first read.
pub(super) fn rustls_error(err: &rumqttc::ConnectionError) -> Option<&rustls::Error> {
    use rumqttc::ConnectionError as C;
    use rumqttc::StateError as S;
    let io = match err {
        C::Tls(rumqttc::TlsError::TLS(e)) => return Some(e),
        C::Tls(rumqttc::TlsError::Io(io))
        | C::Io(io)
        | C::MqttState(S::Io(io))
        // TLS 1.3: the broker's verdict on the client certificate arrives as an alert on the
        // first read, which rumqttc reports as a failure to read the CONNACK.
        | C::MqttState(S::Deserialization(rumqttc::Error::Io(io))) => io,
        _ => return None,
    };
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Turns a TLS failure into the message the operator needs.
pub(super) fn explain(err: &rustls::Error, files: &TlsFiles, host: &str) -> HubError {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            HubError::UntrustedServer {
                trust: files.trust_description(),
                detail: err.to_string(),
            }
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => HubError::ServerName {
            host: host.to_string(),
            detail: err.to_string(),
        },
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => HubError::ServerCertificateTime {
            detail: err.to_string(),
        },
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError,
        ) => HubError::ClientCertificateRefused {
            detail: err.to_string(),
            had_certificate: files.client_auth.is_some(),
        },
        other => HubError::Tls(other.to_string()),
    }
}
