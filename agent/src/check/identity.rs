//! Who the device is to the hub: its client certificate and key (readable, and going
//! together) or its login, and how long its certificate has left.

use std::path::Path;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Finding;
use super::x509::{self, Standing, Validity};
use crate::config::Config;

/// What the identity check found, and the device certificate's validity for the clock check.
pub struct Identity {
    pub findings: Vec<Finding>,
    pub certificate: Option<Validity>,
}

pub fn check(config: &Config) -> Identity {
    let Some(hub) = &config.hub else {
        return Identity {
            findings: vec![Finding::ok(
                "identity",
                "no [hub]: the device takes local deployments only and needs no identity",
            )],
            certificate: None,
        };
    };
    // provisioning: when `[provisioning]` is configured and hub.cert_file is not set, the
    // identity is `<state_dir>/identity/identity.json` + `<state_dir>/identity/device.pem`
    // (key and chain in one PEM): check it with `certificate(pem, pem)` below, say
    // "provisioned, device id X" (ok) from identity.json, or, with no identity there yet,
    // "provisioning configured, not yet provisioned" (warning, fix: let the agent reach the
    // hub and the responder; its log says why it was refused).
    let login = hub
        .credentials
        .as_ref()
        .map(|(user, file)| login(user, file));
    if let Some((cert, key)) = &hub.client_auth {
        let (finding, certificate) = certificate(cert, key);
        let mut findings = vec![finding];
        // A certificate and a login may both be configured: both must work.
        findings.extend(login);
        if let Some(v) = &certificate {
            findings.push(expiry(cert, v, outpost_core::time::unix_now()));
        }
        return Identity {
            findings,
            certificate,
        };
    }
    let finding = login.unwrap_or_else(|| {
        Finding::warning(
            "identity",
            "no client certificate and no login: the device connects anonymously",
            "give the device its own identity: hub.cert_file and hub.key_file (or hub.username and hub.password_file)",
        )
    });
    Identity {
        findings: vec![finding],
        certificate: None,
    }
}

/// The login's password file: readable, and not empty.
fn login(user: &str, file: &Path) -> Finding {
    match outpost_mqtt::Password::read(file) {
        Ok(_) => Finding::ok(
            "identity",
            format!(
                "logs in as `{user}` (password file {} readable)",
                file.display()
            ),
        ),
        Err(e) => Finding::error(
            "identity",
            e.to_string(),
            "make hub.password_file readable by the agent's user and hold the password (one line)",
        ),
    }
}

/// The client certificate chain and key: readable, parseable, and the key the certificate's.
fn certificate(cert: &Path, key: &Path) -> (Finding, Option<Validity>) {
    let fix = "hub.cert_file must hold the device's certificate (PEM, leaf first) and hub.key_file its private key, both readable by the agent's user";
    let chain: Vec<CertificateDer<'static>> = match std::fs::read(cert)
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))
        .and_then(|bytes| {
            CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{} is not PEM: {e}", cert.display()))
        }) {
        Ok(chain) if !chain.is_empty() => chain,
        Ok(_) => {
            return (
                Finding::error(
                    "identity",
                    format!("{} holds no certificate", cert.display()),
                    fix,
                ),
                None,
            );
        }
        Err(e) => return (Finding::error("identity", e, fix), None),
    };
    let validity = x509::validity(&chain[0]);
    let key_der = match std::fs::read(key)
        .map_err(|e| format!("cannot read {}: {e}", key.display()))
        .and_then(|bytes| {
            PrivateKeyDer::from_pem_slice(&bytes)
                .map_err(|_| format!("{} holds no private key (PEM)", key.display()))
        }) {
        Ok(k) => k,
        Err(e) => return (Finding::error("identity", e, fix), validity),
    };
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain, key_der, &provider) {
        Ok(_) => {
            let subject = validity
                .as_ref()
                .and_then(|v| v.subject.clone())
                .unwrap_or_else(|| "?".into());
            (
                Finding::ok(
                    "identity",
                    format!(
                        "client certificate `{subject}` ({}) and its key go together",
                        cert.display()
                    ),
                ),
                validity,
            )
        }
        Err(e) => (
            Finding::error(
                "identity",
                format!(
                    "{} and {} do not go together: {e}",
                    cert.display(),
                    key.display()
                ),
                "put the key that was generated with this certificate in hub.key_file (or the certificate issued for this key in hub.cert_file)",
            ),
            validity,
        ),
    }
}

/// The device certificate's standing at `now`.
pub fn expiry(cert: &Path, v: &Validity, now: u64) -> Finding {
    let until = outpost_core::time::format_rfc3339(v.not_after);
    let renew = format!(
        "issue the device a new certificate and replace {} (and its key)",
        cert.display()
    );
    match v.standing(now) {
        Standing::Valid { days_left } => Finding::ok(
            "cert-expiry",
            format!("device certificate valid until {until} ({days_left} days)"),
        ),
        Standing::Renew { days_left } => Finding::warning(
            "cert-expiry",
            format!(
                "device certificate expires {until} ({days_left} days left; under 30 days or past 2/3 of its lifetime)"
            ),
            renew,
        ),
        Standing::Expired => Finding::error(
            "cert-expiry",
            format!("device certificate expired {until}"),
            format!("{renew}; if the certificate is recent, the clock is wrong"),
        ),
        Standing::NotYetValid => Finding::error(
            "cert-expiry",
            format!(
                "device certificate is not valid before {}",
                outpost_core::time::format_rfc3339(v.not_before)
            ),
            "the clock is probably behind: set the time (NTP); otherwise the certificate was issued for the future",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    /// Provisioning keeps the key and the chain in one PEM (`identity/device.pem`): the same
    /// check reads it when given that file twice.
    #[test]
    fn one_pem_with_key_and_chain_is_an_identity() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cam-7");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.path().join("device.pem");
        std::fs::write(&pem, format!("{}{}", key.serialize_pem(), cert.pem())).unwrap();
        let (finding, validity) = certificate(&pem, &pem);
        assert_eq!(finding.level, Level::Ok, "{finding:?}");
        assert!(finding.message.contains("cam-7"));
        assert!(validity.is_some());
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&pem, format!("{}{}", other.serialize_pem(), cert.pem())).unwrap();
        assert_eq!(certificate(&pem, &pem).0.level, Level::Error);
    }
}
