//! The deployment intake loop: the latest retained message per source (the device's topic and
//! each group's) → [`intake`](crate::intake::intake) → [`select()`](super::select::select) →
//! [`AgentHandle::offer`].
//!
//! Redelivery is harmless: a message whose bytes were already handled is skipped, and a
//! deployment already in force (same source and digest in the reported state, e.g. after the
//! agent restarted) is not offered again. Refusals — by intake here, or by the reconciler's
//! answer to `offer` (policy, version rule) — go to the state's `lastRejected`.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::select::{Candidate, select};
use super::unix_now;
use crate::control::AgentHandle;
use crate::intake::{self, Accepted, hex_sha256};
use crate::manifest::Issue;
use crate::signing::{self, Envelope, TrustedKeys};
use crate::state::{DeploymentReport, DeploymentStatus, Source};

/// One source's latest message, numbered so the loop sees each arrival once.
#[derive(Debug, Clone)]
struct Slot {
    source: Source,
    seq: u64,
    payload: Arc<Vec<u8>>,
}

/// The latest deployment message per source. The event loop writes without waiting (it only
/// replaces a slot), and the intake loop reads the newest: on a retained topic only the newest
/// message matters, so nothing is queued. Bounded by the number of subscribed sources.
#[derive(Debug, Clone)]
pub struct Inbox {
    tx: Arc<watch::Sender<(u64, Vec<Slot>)>>,
}

impl Default for Inbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Inbox {
    pub fn new() -> Inbox {
        Inbox {
            tx: Arc::new(watch::channel((0, Vec::new())).0),
        }
    }

    /// Records the newest message of `source` (an empty payload means the retained deployment
    /// was cleared).
    pub fn put(&self, source: Source, payload: Vec<u8>) {
        self.tx.send_modify(|(seq, slots)| {
            *seq += 1;
            let slot = Slot {
                source: source.clone(),
                seq: *seq,
                payload: Arc::new(payload),
            };
            match slots.iter_mut().find(|s| s.source == source) {
                Some(existing) => *existing = slot,
                None => slots.push(slot),
            }
        });
    }

    fn subscribe(&self) -> watch::Receiver<(u64, Vec<Slot>)> {
        self.tx.subscribe()
    }
}

pub struct Context {
    pub inbox: Inbox,
    pub handle: AgentHandle,
    pub trusted: TrustedKeys,
    /// The device's groups, in precedence order for ties.
    pub groups: Vec<String>,
    /// This device's id (what a withdrawal must name).
    pub device: String,
    /// The hub link's own last refusal, merged into the reported state.
    pub rejected: watch::Sender<Option<DeploymentReport>>,
}

/// Runs until `stop` is cancelled or the agent goes away.
pub async fn run(ctx: Context, stop: CancellationToken) {
    let mut rx = ctx.inbox.subscribe();
    // Slots already handled, by source: the sequence number and the bytes' digest.
    let mut seen: Vec<(Source, u64, String)> = Vec::new();
    let mut candidates: Vec<(Candidate, Accepted)> = Vec::new();
    let mut last_offered: Option<(Source, String)> = None;
    // A source whose deployment was just withdrawn: the next offer hands control back.
    let mut withdrawn: Option<Source> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        let slots = rx.borrow_and_update().1.clone();
        for slot in slots {
            if seen
                .iter()
                .any(|(s, seq, _)| *s == slot.source && *seq == slot.seq)
            {
                continue;
            }
            let digest = hex_sha256(&slot.payload);
            match seen.iter_mut().find(|(s, _, _)| *s == slot.source) {
                Some((_, seq, d)) if *d == digest => {
                    // The same bytes again (a reconnect redelivers retained messages).
                    *seq = slot.seq;
                    continue;
                }
                Some(entry) => *entry = (slot.source.clone(), slot.seq, digest),
                None => seen.push((slot.source.clone(), slot.seq, digest)),
            }
            if slot.payload.is_empty() || is_withdrawal(&slot.payload) {
                let current = candidates
                    .iter()
                    .find(|(c, _)| c.source == slot.source)
                    .map(|(_, a)| a.deployment.version);
                match withdrawal(&slot.payload, &slot.source, current, &ctx) {
                    Ok(()) => {
                        candidates.retain(|(c, _)| c.source != slot.source);
                        tracing::info!(source = ?slot.source, "deployment withdrawn");
                        withdrawn = Some(slot.source.clone());
                    }
                    Err(reasons) => {
                        tracing::warn!(source = ?slot.source, reasons = ?reasons, "withdrawal refused");
                        ctx.rejected.send_replace(Some(DeploymentReport {
                            id: String::new(),
                            version: 0,
                            status: DeploymentStatus::Rejected,
                            source: slot.source.clone(),
                            reasons,
                            digest: Some(hex_sha256(&slot.payload)),
                            updated_at: unix_now(),
                            waiting: None,
                        }));
                    }
                }
                continue;
            }
            match intake::intake(&slot.payload, &ctx.trusted) {
                Ok(accepted) => {
                    tracing::info!(
                        source = ?slot.source,
                        id = %accepted.deployment.id,
                        version = accepted.deployment.version,
                        "deployment passed intake"
                    );
                    candidates.retain(|(c, _)| c.source != slot.source);
                    candidates.push((
                        Candidate {
                            source: slot.source.clone(),
                            priority: accepted.deployment.priority,
                        },
                        accepted,
                    ));
                }
                Err(e) => {
                    let report = rejection(&slot.payload, slot.source.clone(), e.issues());
                    tracing::warn!(
                        source = ?slot.source,
                        id = %report.id,
                        version = report.version,
                        error = %e,
                        "deployment refused by intake"
                    );
                    // A refused message changes nothing: the source's earlier accepted
                    // deployment (if any) stays its candidate.
                    ctx.rejected.send_replace(Some(report));
                }
            }
        }

        let list: Vec<Candidate> = candidates.iter().map(|(c, _)| c.clone()).collect();
        let Some(chosen) = select(&list, &ctx.groups) else {
            continue;
        };
        // `select` returns an index into `list`, which mirrors `candidates` one to one.
        let (candidate, accepted) = &candidates[chosen];
        let key = (candidate.source.clone(), accepted.digest.clone());
        if last_offered.as_ref() == Some(&key) || in_force(&ctx.handle, &key) {
            continue;
        }
        last_offered = Some(key);
        let (id, version) = (accepted.deployment.id.clone(), accepted.deployment.version);
        let offer = ctx.handle.offer_with(
            accepted.clone(),
            candidate.source.clone(),
            withdrawn.take().is_some(),
        );
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            answer = offer => answer,
        };
        match answer {
            Ok(Ok(())) => {
                tracing::info!(%id, version, source = ?candidate.source, "deployment handed to the reconciler")
            }
            Ok(Err(reasons)) => {
                tracing::warn!(%id, version, reasons = reasons.len(), "deployment refused by the reconciler");
                ctx.rejected.send_replace(Some(DeploymentReport {
                    id,
                    version,
                    status: DeploymentStatus::Rejected,
                    source: candidate.source.clone(),
                    reasons,
                    digest: Some(accepted.digest.clone()),
                    updated_at: unix_now(),
                    waiting: None,
                }));
            }
            Err(e) => {
                tracing::info!(error = %e, "the agent is gone; intake loop stops");
                return;
            }
        }
    }
}

/// Whether a message is a (signed) withdrawal rather than a deployment.
fn is_withdrawal(payload: &[u8]) -> bool {
    serde_json::from_slice::<Envelope>(payload)
        .is_ok_and(|e| e.payload_type == signing::WITHDRAWAL_TYPE)
}

/// Checks a withdrawal of `source`'s deployment (now at `current`, if the link has one).
///
/// Without trusted keys, an empty retained message withdraws (a lab). With keys, only a
/// withdrawal signed by a trusted key, for this source, not expired, and at least as new as the
/// deployment it withdraws.
fn withdrawal(
    payload: &[u8],
    source: &Source,
    current: Option<u64>,
    ctx: &Context,
) -> Result<(), Vec<Issue>> {
    let keys = !ctx.trusted.is_empty();
    if payload.is_empty() {
        return if keys {
            Err(vec![Issue::new(
                "",
                "an unsigned withdrawal (an empty retained message) is refused: this device trusts signing keys; publish a signed one with `outpost-ctl withdraw --sign-key KEY`",
            )])
        } else {
            Ok(())
        };
    }
    let envelope: Envelope = serde_json::from_slice(payload)
        .map_err(|e| vec![Issue::new("", format!("not a withdrawal envelope: {e}"))])?;
    let body = if keys {
        ctx.trusted
            .verify_as(signing::WITHDRAWAL_TYPE, &envelope)
            .map(|(body, _)| body)
    } else {
        signing::open_as(signing::WITHDRAWAL_TYPE, &envelope)
    }
    .map_err(|e| vec![Issue::new(e.path(), e.to_string())])?;
    let w: crate::binding::Withdrawal = serde_json::from_slice(&body)
        .map_err(|e| vec![Issue::new("", format!("the withdrawal is not valid: {e}"))])?;
    let mut issues = Vec::new();
    let rules = crate::binding::Rules {
        device: &ctx.device,
        require: keys,
        now_ms: crate::binding::trusted_now(unix_now().saturating_mul(1000), 0),
    };
    if let Some(mut issue) = crate::binding::target_issue(&w.withdraw, source, &ctx.device) {
        issue.path = issue.path.replace("/target", "/withdraw");
        issues.push(issue);
    }
    if let Some(issue) = crate::binding::expiry_issue(Some(&w.expires_at), &rules) {
        issues.push(issue);
    }
    if let Some(current) = current
        && w.version < current
    {
        issues.push(Issue::new(
            "/version",
            format!(
                "withdraws version {}, but this source's deployment is version {current}: an old withdrawal cannot remove a newer deployment",
                w.version
            ),
        ));
    }
    if issues.is_empty() {
        Ok(())
    } else {
        Err(issues)
    }
}

/// The deployment is already the one in force (e.g. the agent restarted and the retained
/// message came again): offering it again would only be refused as "not newer".
fn in_force(handle: &AgentHandle, (source, digest): &(Source, String)) -> bool {
    let state = handle.state.borrow();
    state
        .deployment
        .as_ref()
        .is_some_and(|d| d.source == *source && d.digest.as_deref() == Some(digest.as_str()))
}

/// A report for a message intake refused, naming the deployment as far as it can be read.
pub fn rejection(payload: &[u8], source: Source, reasons: Vec<Issue>) -> DeploymentReport {
    let (id, version, digest) = identify(payload);
    DeploymentReport {
        id,
        version,
        status: DeploymentStatus::Rejected,
        source,
        reasons,
        digest: Some(digest),
        updated_at: unix_now(),
        waiting: None,
    }
}

/// Best-effort id, version and manifest digest of a message that may be garbage: an envelope
/// is opened (without trusting it) to reach the manifest, so the operator's CLI can match the
/// refusal to what it published. Unknown id is `""`, unknown version `0`.
fn identify(payload: &[u8]) -> (String, u64, String) {
    #[derive(serde::Deserialize)]
    struct Probe {
        id: Option<serde_json::Value>,
        version: Option<serde_json::Value>,
    }
    if payload.len() > intake::MAX_MESSAGE_BYTES {
        return (String::new(), 0, hex_sha256(payload));
    }
    let manifest = serde_json::from_slice::<Envelope>(payload)
        .ok()
        .and_then(|e| signing::open(&e).ok())
        .unwrap_or_else(|| payload.to_vec());
    let probe = serde_json::from_slice::<Probe>(&manifest).ok();
    let id = probe
        .as_ref()
        .and_then(|p| {
            p.id.as_ref()?
                .as_str()
                .map(|s| s.chars().take(128).collect())
        })
        .unwrap_or_default();
    let version = probe
        .as_ref()
        .and_then(|p| p.version.as_ref()?.as_u64())
        .unwrap_or(0);
    (id, version, hex_sha256(&manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_what_it_can_of_bad_messages() {
        let (id, version, _) = identify(br#"{"id":"x","version":3,"bogus":true}"#);
        assert_eq!((id.as_str(), version), ("x", 3));
        let (id, version, digest) = identify(b"\x00garbage");
        assert_eq!((id.as_str(), version), ("", 0));
        assert_eq!(digest, hex_sha256(b"\x00garbage"));
    }

    #[test]
    fn an_envelope_is_identified_by_its_manifest() {
        let manifest = br#"{"id":"y","version":9}"#;
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let envelope = serde_json::to_vec(&signing::sign(manifest, &key)).unwrap();
        let (id, version, digest) = identify(&envelope);
        assert_eq!((id.as_str(), version), ("y", 9));
        assert_eq!(digest, hex_sha256(manifest));
    }

    proptest::proptest! {
        /// Whatever a broker delivers, naming it for the report does not panic.
        #[test]
        fn identify_takes_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let (id, _, digest) = identify(&bytes);
            proptest::prop_assert!(id.chars().count() <= 128);
            proptest::prop_assert_eq!(digest.len(), 64);
        }
    }

    #[test]
    fn the_inbox_keeps_the_latest_message_per_source() {
        let inbox = Inbox::new();
        inbox.put(Source::Device, b"1".to_vec());
        inbox.put(Source::Group { name: "g".into() }, b"2".to_vec());
        inbox.put(Source::Device, b"3".to_vec());
        let (seq, slots) = inbox.subscribe().borrow().clone();
        assert_eq!(seq, 3);
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].payload.as_slice(), b"3");
    }
}
