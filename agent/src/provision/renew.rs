//! Renewal: when two thirds of the certificate's lifetime has passed, the device asks the
//! responder for a new certificate (for a new key), authenticated by its current one.
//!
//! **How the age is judged.** A device without a real-time clock boots at 1970, and its clock
//! jumps when NTP answers. So the age is the larger of two readings, neither of which a clock
//! can push into a loop:
//! - the responder's time as the device estimates it — its own clock plus the offset it saw
//!   between the two at issuance (`clock_offset_secs`) — minus the certificate's start;
//! - how long the agent has run since the certificate was installed (`run_secs`, counted on
//!   the monotonic clock and persisted now and then), a lower bound no clock can move.
//!
//! At 1970 with no jump, the first reading follows the real time as long as the device runs,
//! and the second after a reboot: the certificate is renewed in time. A jump forward makes the
//! first reading too large: one early renewal, after which the new offset is right — never a
//! loop, because right after a renewal both readings are near zero. A device that was off for
//! longer than the certificate lived finds the broker refusing it: it then asks through the
//! claim identity with the same key, which the responder recognises.

use std::time::{Duration, Instant};

use outpost_core::backoff::Backoff;
use outpost_core::wire::provisioning::{Kind, Request, Response};
use tokio_util::sync::CancellationToken;

use super::exchange::{self, ANSWER_TIMEOUT};
use super::identity::{self, Identity, IdentityFiles, Refusal};
use super::{ProvisionError, claim};
use crate::config::{HubConfig, ProvisioningConfig};

/// The certificate's age in seconds, as judged in the module's documentation.
pub fn age(identity: &Identity, wall_now: u64) -> u64 {
    let estimated = i128::from(wall_now) + i128::from(identity.clock_offset_secs)
        - i128::from(identity.not_before);
    let estimated = u64::try_from(estimated.max(0)).unwrap_or(u64::MAX);
    // The run time counts from installation; the certificate was already this old then.
    let ran = identity
        .run_secs
        .saturating_add(identity.issued_at.saturating_sub(identity.not_before));
    estimated.max(ran)
}

/// How long until the renewal is due (zero: now).
pub fn due_in(identity: &Identity, wall_now: u64) -> Duration {
    let due_at = identity.lifetime() / 3 * 2;
    Duration::from_secs(due_at.saturating_sub(age(identity, wall_now)))
}

/// How often the run time is written down: often enough that a reboot loses little of it,
/// rarely enough to spare the flash (at most every 10 minutes).
pub fn persist_every(identity: &Identity) -> Duration {
    Duration::from_secs((identity.lifetime() / 50).clamp(1, 600))
}

pub struct Context {
    pub provisioning: ProvisioningConfig,
    pub hub: HubConfig,
    pub files: IdentityFiles,
    pub identity: Identity,
}

/// Renews the certificate whenever it is due, until `shutdown`.
pub async fn run(ctx: Context, shutdown: CancellationToken) {
    let mut identity = ctx.identity.clone();
    let mut backoff = Backoff::new(Duration::from_secs(2), ctx.provisioning.retry_max);
    let mut counted = Instant::now();
    let mut carry = Duration::ZERO;
    let mut retry_at: Option<Instant> = None;
    loop {
        let due = due_in(&identity, outpost_core::time::unix_now());
        let retry_wait = retry_at.map(|t| t.saturating_duration_since(Instant::now()));
        if due.is_zero() && retry_wait.is_none_or(|w| w.is_zero()) {
            match renew_once(&ctx, &identity).await {
                Ok(renewed) => {
                    tracing::info!(device = %renewed.device_id, not_after = %outpost_core::time::format_rfc3339(renewed.not_after), "certificate renewed");
                    identity = renewed;
                    (counted, carry, retry_at) = (Instant::now(), Duration::ZERO, None);
                    backoff.reset();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "certificate renewal failed");
                    retry_at = Some(Instant::now() + delay);
                }
            }
            continue;
        }
        let wait = retry_wait
            .filter(|w| !w.is_zero())
            .unwrap_or(due)
            .min(persist_every(&identity));
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(wait) => false,
        };
        carry += counted.elapsed();
        counted = Instant::now();
        identity.run_secs += carry.as_secs();
        carry = Duration::from_nanos(carry.subsec_nanos().into());
        if let Err(e) = identity::save(&ctx.files, &identity) {
            tracing::warn!(error = %e, "cannot record the run time since the certificate was issued");
        }
        if stop {
            return;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RenewError {
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Exchange(#[from] exchange::ExchangeError),
    #[error("the responder refused the renewal: {0}")]
    Refused(String),
    #[error("the responder's certificate is unusable: {0}")]
    Unusable(String),
    #[error("the broker refuses the current certificate and the claim identity did not help")]
    ClaimFailed,
}

async fn renew_once(ctx: &Context, current: &Identity) -> Result<Identity, RenewError> {
    let key = identity::request_key(&ctx.files, true)?;
    let request = Request {
        request_id: exchange::request_id(),
        serial: current.serial.clone(),
        csr: identity::csr(&key, &current.device_id)?,
    };
    // The device's own connection settings (its certificate, the hub's CA and endpoints), as a
    // client of their own beside the link and the telemetry drain.
    let settings = crate::hub::link::settings(&ctx.hub, &format!("{}-renew", current.device_id))
        .map_err(exchange::ExchangeError::Hub)?;
    let response = match exchange::exchange(
        &settings,
        &ctx.provisioning.topic_prefix,
        Kind::Renew,
        &current.device_id,
        &request,
        ANSWER_TIMEOUT,
    )
    .await
    {
        Ok(r) => r,
        Err(e) if e.is_configuration() => {
            // Expired (the device was off too long) or revoked: ask as at first boot, with the
            // current key, which the responder recognises as this device's.
            tracing::warn!(error = %e, "the broker refuses the device certificate; asking through the claim identity");
            let _ = std::fs::remove_file(&ctx.files.pending_key);
            return match claim::reclaim(&ctx.provisioning, &ctx.hub, &ctx.files).await? {
                Some(identity) => Ok(identity),
                None => Err(RenewError::ClaimFailed),
            };
        }
        Err(e) => return Err(e.into()),
    };
    match response {
        Response::Issued {
            certificate_chain,
            issued_at,
            not_before,
            not_after,
            groups,
            device_id,
            ..
        } => {
            let renewed = Identity {
                device_id,
                groups,
                serial: current.serial.clone(),
                issued_at,
                not_before,
                not_after,
                clock_offset_secs: claim::offset(issued_at),
                run_secs: 0,
            };
            if renewed.device_id != current.device_id {
                return Err(RenewError::Unusable(format!(
                    "it names `{}`, not this device",
                    renewed.device_id
                )));
            }
            claim::check_issued(&key, &certificate_chain, &renewed)
                .map_err(RenewError::Unusable)?;
            identity::commit(&ctx.files, &key, &certificate_chain, &renewed)?;
            Ok(renewed)
        }
        Response::Refused { reason, .. } => {
            identity::record_refusal(
                &ctx.files,
                &Refusal {
                    serial: current.serial.clone(),
                    reason: reason.clone(),
                    at: outpost_core::time::unix_now(),
                },
            );
            Err(RenewError::Refused(reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for 90 days issued at `issued_at` by the responder, received when the
    /// device's clock read `device_clock`.
    fn issued(issued_at: u64, device_clock: u64) -> Identity {
        Identity {
            device_id: "cam-1".into(),
            groups: vec![],
            serial: "SN-1".into(),
            issued_at,
            not_before: issued_at - 300,
            not_after: issued_at - 300 + 90 * 86_400,
            clock_offset_secs: issued_at as i64 - device_clock as i64,
            run_secs: 0,
        }
    }

    const NOW: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    #[test]
    fn a_good_clock_renews_at_two_thirds() {
        let id = issued(NOW, NOW);
        assert_eq!(due_in(&id, NOW), Duration::from_secs(60 * DAY - 300));
        assert!(due_in(&id, NOW + 60 * DAY).is_zero());
        // Off for 70 days with a working clock: due at once.
        assert!(due_in(&id, NOW + 70 * DAY).is_zero());
    }

    #[test]
    fn a_clock_at_1970_follows_the_offset_then_the_run_time() {
        // Booted at 1970, provisioned 100 s after boot.
        let mut id = issued(NOW, 100);
        assert!(!due_in(&id, 100 + DAY).is_zero(), "not due a day later");
        assert!(due_in(&id, 100 + 60 * DAY).is_zero(), "due 60 days later");
        // Rebooted at 1970 after 59 days of running: the clock says 50 s, the run time 59 days.
        id.run_secs = 59 * DAY;
        assert_eq!(age(&id, 50), 59 * DAY + 300);
        assert_eq!(due_in(&id, 50), Duration::from_secs(DAY - 300));
        id.run_secs = 61 * DAY;
        assert!(due_in(&id, 50).is_zero(), "renewed on run time alone");
    }

    #[test]
    fn no_clock_makes_a_renewal_loop() {
        // Right after a renewal, whatever the clock says, the certificate is young.
        for device_clock in [0, 100, NOW - 40 * 365 * DAY, NOW, NOW + 400 * DAY] {
            let id = issued(NOW, device_clock);
            assert!(
                !due_in(&id, device_clock + 1).is_zero(),
                "clock {device_clock}: due right after issuance"
            );
        }
        // NTP jumps a 1970 clock to now: one renewal, which resets the offset.
        let id = issued(NOW, 100);
        assert!(
            due_in(&id, NOW + 200).is_zero(),
            "a jump forward renews once"
        );
        let renewed = issued(NOW + 201, NOW + 200);
        assert!(!due_in(&renewed, NOW + 201).is_zero(), "and not again");
    }

    #[test]
    fn run_time_is_written_down_rarely() {
        assert_eq!(persist_every(&issued(NOW, NOW)), Duration::from_secs(600));
        let mut short = issued(NOW, NOW);
        short.not_after = short.not_before + 60;
        assert_eq!(persist_every(&short), Duration::from_secs(1));
    }
}
