//! First boot: with no identity in the state directory, the device makes its key, connects
//! with the batch's claim identity, sends a signing request with its serial, and stores what
//! the responder issues. Retries with backoff while the hub or the responder is away; a refusal
//! is logged, kept for `outpost check`, and asked again only slowly.

use std::time::Duration;

use outpost_core::backoff::Backoff;
use outpost_core::wire::provisioning::{Kind, Request, Response, claim_client_id};
use outpost_mqtt::Settings;
use outpost_mqtt::tls::TlsFiles;
use tokio_util::sync::CancellationToken;

use super::exchange::{self, ANSWER_TIMEOUT, ExchangeError};
use super::identity::{self, Identity, IdentityFiles, Refusal};
use super::{ProvisionError, serial};
use crate::config::{HubConfig, ProvisioningConfig};

/// The shortest wait between attempts.
const RETRY_MIN: Duration = Duration::from_secs(1);

/// The claim connection's settings for `serial`.
pub fn settings(p: &ProvisioningConfig, hub: &HubConfig, serial: &str) -> Settings {
    Settings {
        client_id: claim_client_id(serial),
        host: p.host.clone(),
        port: p.port,
        failover: p.failover.clone(),
        tls: Some(TlsFiles {
            ca_file: p.ca_file.clone(),
            client_auth: Some((p.claim_cert.clone(), p.claim_key.clone())),
            ca_setting: "provisioning.ca_file",
        }),
        credentials: None,
        keep_alive: hub.keep_alive,
        reconnect_min: RETRY_MIN,
        reconnect_max: p.retry_max,
    }
}

/// Returns the stored identity, or provisions the device first (waiting as long as it takes).
/// `None` when `shutdown` came first.
///
/// Fails only when a stored identity is damaged or the state directory cannot be written:
/// both need a person, and making a new identity over an old one could lose a good one.
pub async fn ensure(
    p: &ProvisioningConfig,
    hub: &HubConfig,
    files: &IdentityFiles,
    shutdown: &CancellationToken,
) -> Result<Option<Identity>, ProvisionError> {
    if let Some(found) = identity::load(files)? {
        return Ok(Some(found));
    }
    tracing::info!(hub = %p.host, prefix = %p.topic_prefix, "no identity yet: provisioning with the claim certificate");
    let mut backoff = Backoff::new(RETRY_MIN, p.retry_max);
    let mut endpoint = 0usize;
    loop {
        let delay = match attempt(p, hub, files, endpoint).await {
            Ok(Attempt::Issued(identity)) => {
                tracing::info!(device = %identity.device_id, groups = ?identity.groups, "provisioned: the device has its own certificate");
                return Ok(Some(identity));
            }
            Ok(Attempt::Refused { retry_after }) => retry_after.unwrap_or(p.retry_max),
            Ok(Attempt::Retry) => {
                endpoint += 1;
                backoff.next_delay()
            }
            Err(e @ ProvisionError::Store { .. }) => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, "provisioning failed; retrying");
                backoff.next_delay()
            }
        };
        tracing::debug!(
            retry_in_ms = delay.as_millis() as u64,
            "provisioning: next attempt"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

enum Attempt {
    Issued(Identity),
    Refused {
        retry_after: Option<Duration>,
    },
    /// The hub or the responder did not answer: try again (the next endpoint, if any).
    Retry,
}

async fn attempt(
    p: &ProvisioningConfig,
    hub: &HubConfig,
    files: &IdentityFiles,
    endpoint: usize,
) -> Result<Attempt, ProvisionError> {
    let serial = match serial::read(&p.serial).await {
        Ok(s) => s,
        Err(e) => {
            // Perhaps not there yet at boot (a command needing a service): logged, retried.
            tracing::error!(error = %e, "cannot read the device's serial");
            return Ok(Attempt::Retry);
        }
    };
    let key = identity::request_key(files, false)?;
    let request = Request {
        request_id: exchange::request_id(),
        serial: serial.clone(),
        csr: identity::csr(&key, &serial)?,
    };
    let mut settings = settings(p, hub, &serial);
    for _ in 0..endpoint % (settings.failover.len() + 1) {
        settings = settings.next_endpoint();
    }
    let who = settings.client_id.clone();
    match exchange::exchange(
        &settings,
        &p.topic_prefix,
        Kind::Claim,
        &who,
        &request,
        ANSWER_TIMEOUT,
    )
    .await
    {
        Ok(response) => accept(files, &key, &serial, response),
        Err(e) if e.is_configuration() => {
            tracing::error!(error = %e, host = %settings.host, "the hub refuses the claim identity");
            identity::record_refusal(
                files,
                &Refusal {
                    serial,
                    reason: e.to_string(),
                    at: outpost_core::time::unix_now(),
                },
            );
            Ok(Attempt::Retry)
        }
        Err(
            e @ (ExchangeError::Hub(_) | ExchangeError::NoAnswer { .. } | ExchangeError::Send(_)),
        ) => {
            tracing::warn!(error = %e, host = %settings.host, "provisioning: no identity yet");
            Ok(Attempt::Retry)
        }
    }
}

/// Checks and stores what the responder issued; a refusal is logged and kept.
fn accept(
    files: &IdentityFiles,
    key: &rcgen::KeyPair,
    serial: &str,
    response: Response,
) -> Result<Attempt, ProvisionError> {
    match response {
        Response::Issued {
            device_id,
            groups,
            certificate_chain,
            issued_at,
            not_before,
            not_after,
            ..
        } => {
            let identity = Identity {
                clock_offset_secs: offset(issued_at),
                device_id,
                groups,
                serial: serial.to_string(),
                issued_at,
                not_before,
                not_after,
                run_secs: 0,
            };
            if let Err(reason) = check_issued(key, &certificate_chain, &identity) {
                tracing::error!(%reason, "the responder's certificate is unusable; asking again");
                return Ok(Attempt::Retry);
            }
            identity::commit(files, key, &certificate_chain, &identity)?;
            Ok(Attempt::Issued(identity))
        }
        Response::Refused {
            reason,
            retry_after_secs,
            ..
        } => {
            tracing::error!(%serial, %reason, "the provisioning responder refused this device");
            identity::record_refusal(
                files,
                &Refusal {
                    serial: serial.to_string(),
                    reason,
                    at: outpost_core::time::unix_now(),
                },
            );
            Ok(Attempt::Refused {
                retry_after: retry_after_secs.map(Duration::from_secs),
            })
        }
    }
}

/// The responder's clock minus this device's.
pub fn offset(issued_at: u64) -> i64 {
    let now = outpost_core::time::unix_now();
    i64::try_from(issued_at).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(i64::MAX)
}

/// The chain is PEM, its first certificate is for `key`, the name is a usable device id.
pub fn check_issued(
    key: &rcgen::KeyPair,
    chain_pem: &str,
    identity: &Identity,
) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    if !outpost_core::wire::topics::is_level(&identity.device_id)
        || outpost_core::wire::provisioning::is_reserved_name(&identity.device_id)
    {
        return Err(format!("`{}` cannot name a device", identity.device_id));
    }
    if identity.not_after <= identity.not_before {
        return Err("the certificate's validity is empty".into());
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate chain is not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("the certificate chain is empty".into());
    }
    let key_der = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
    rustls::sign::CertifiedKey::from_der(chain, key_der, &rustls::crypto::ring::default_provider())
        .map(|_| ())
        .map_err(|e| format!("the certificate is not for this device's key: {e}"))
}

/// One claim attempt with the device's current key, for a device whose certificate the broker
/// no longer accepts (expired while it was off). `None` when it did not succeed.
pub(super) async fn reclaim(
    p: &ProvisioningConfig,
    hub: &HubConfig,
    files: &IdentityFiles,
) -> Result<Option<Identity>, ProvisionError> {
    match attempt(p, hub, files, 0).await? {
        Attempt::Issued(identity) => Ok(Some(identity)),
        Attempt::Refused { .. } | Attempt::Retry => Ok(None),
    }
}
