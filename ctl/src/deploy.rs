//! `deploy` and `withdraw`: publish a deployment (signed and bound to its target, or as
//! given) retained on the device's or group's topic, and follow the devices' reports until it
//! is applied, refused or the time is up.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use outpost_core::intake::hex_sha256;
use outpost_core::present::{issue_lines, read_input};
use outpost_core::wire::topics;
use outpost_core::{manifest, signing};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::hub::{DeviceView, Operator, Progress, Target, fold, group_summary, progress};
use crate::{EXIT_REFUSED, EXIT_TIMEOUT};

/// Reads the file to publish; an invalid manifest comes back as its issues.
/// `--device` or `--group` (clap requires one of the two).
pub(crate) fn target_of(device: Option<String>, group: Option<String>) -> Result<Target> {
    match (device, group) {
        (Some(d), _) => Ok(Target::Device(d)),
        (None, Some(g)) => Ok(Target::Group(g)),
        (None, None) => bail!("--device or --group is required"),
    }
}

fn manifest_target(target: &Target) -> manifest::Target {
    match target {
        Target::Device(d) => manifest::Target::Device(d.clone()),
        Target::Group(g) => manifest::Target::Group(g.clone()),
    }
}

/// `--expires-in`: `30d`, `12h`, `90m`, `45s`.
pub fn parse_expiry(text: &str) -> Result<Duration, String> {
    outpost_core::binding::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a duration such as 30d, 12h, 90m or 45s"))
}

pub(crate) fn wall_ms() -> u64 {
    outpost_core::time::unix_now().saturating_mul(1000)
}

/// Publishes a withdrawal of `target`'s deployment: signed (with the version it withdraws), or
/// an empty retained message without a key.
pub(crate) async fn withdraw(
    mut op: Operator,
    target: Target,
    sign_key: Option<&Path>,
    version: Option<u64>,
    expires_in: Duration,
) -> Result<u8> {
    if !target.is_valid() {
        bail!("{target:?} is not a valid name: 1 to 128 letters, digits, `.`, `_` or `-`");
    }
    let topic = target.topic(op.prefix());
    let Some(key) = sign_key else {
        op.publish(&topic, true, Vec::new()).await?;
        op.fence(Duration::from_secs(10)).await?;
        eprintln!(
            "withdrew the deployment on {topic} (unsigned: devices that trust keys refuse this; use --sign-key)"
        );
        return Ok(0);
    };
    let version = match version {
        Some(v) => v,
        None => {
            let retained = op
                .snapshot(std::slice::from_ref(&topic), Duration::from_secs(10))
                .await?;
            let Some(m) = retained
                .iter()
                .rev()
                .find(|m| m.topic == topic && !m.payload.is_empty())
            else {
                eprintln!(
                    "nothing is retained on {topic}: nothing to withdraw (pass --version to withdraw anyway)"
                );
                return Ok(EXIT_REFUSED);
            };
            let manifest = serde_json::from_slice::<signing::Envelope>(&m.payload)
                .ok()
                .and_then(|e| signing::open(&e).ok())
                .unwrap_or_else(|| m.payload.clone());
            match manifest::parse(&manifest) {
                Ok(d) => d.version,
                Err(_) => {
                    bail!("the message retained on {topic} is not a deployment; pass --version")
                }
            }
        }
    };
    let withdrawal = outpost_core::binding::Withdrawal {
        withdraw: manifest_target(&target),
        version,
        expires_at: outpost_core::binding::expiry_after(wall_ms(), expires_in),
    };
    let key = signing::load_signing_key(key)?;
    let envelope = signing::sign_as(
        signing::WITHDRAWAL_TYPE,
        &serde_json::to_vec(&withdrawal)?,
        &key,
    );
    op.publish(&topic, true, serde_json::to_vec(&envelope)?)
        .await?;
    op.fence(Duration::from_secs(10)).await?;
    eprintln!(
        "withdrew version {version} on {topic} (signed, key {})",
        envelope.signatures[0].keyid
    );
    Ok(0)
}

/// What `deploy` publishes: the bytes on the wire, the manifest inside, its id and version.
type Prepared = (Vec<u8>, Vec<u8>, String, u64);

fn prepare(
    file: &Path,
    sign: Option<(&Path, Duration)>,
    target: &Target,
) -> Result<Result<Prepared, Vec<manifest::Issue>>> {
    let bytes = read_input(file).map_err(anyhow::Error::msg)?;
    let is_envelope = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .is_some_and(|v| v.get("payloadType").is_some());
    let (wire, manifest_bytes) = if is_envelope {
        if sign.is_some() {
            bail!(
                "{} is already a signed envelope; --sign-key signs bare manifests",
                file.display()
            );
        }
        let envelope: signing::Envelope = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid envelope", file.display()))?;
        let payload = signing::open(&envelope)?;
        (bytes, payload)
    } else if let Some((key, expires_in)) = sign {
        let key = signing::load_signing_key(key)?;
        // What is signed names where it goes and until when (see `binding`).
        let bytes = outpost_core::binding::bind(
            &bytes,
            Some(&manifest_target(target)),
            &outpost_core::binding::expiry_after(wall_ms(), expires_in),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let envelope = signing::sign(&bytes, &key);
        (serde_json::to_vec(&envelope)?, bytes)
    } else {
        (bytes.clone(), bytes)
    };
    // Check before publishing: an invalid manifest would only be refused by every device.
    match manifest::parse(&manifest_bytes) {
        Ok(d) => Ok(Ok((wire, manifest_bytes, d.id, d.version))),
        Err(e) => Ok(Err(e.issues())),
    }
}

/// The manifest in `retained` (the deployment already on the topic, signed) when it is the
/// one in `ours` apart from its expiry, and that expiry is still an hour or more away.
fn unchanged_binding(retained: &[u8], ours: &[u8], now_ms: u64) -> Option<Vec<u8>> {
    let envelope: signing::Envelope = serde_json::from_slice(retained).ok()?;
    let payload = signing::open(&envelope).ok()?;
    let unbound = |bytes: &[u8]| {
        let mut v: Value = serde_json::from_slice(bytes).ok()?;
        let expires = v.as_object_mut()?.remove("expiresAt");
        Some((v, expires))
    };
    let (theirs, expires) = unbound(&payload)?;
    let (mine, _) = unbound(ours)?;
    let expires_ms = outpost_core::time::parse_rfc3339(expires?.as_str()?)?.checked_mul(1000)?;
    (theirs == mine && expires_ms > now_ms.saturating_add(3_600_000)).then_some(payload)
}

pub(crate) async fn deploy(
    mut op: Operator,
    target: Target,
    file: &Path,
    sign: Option<(&Path, Duration)>,
    timeout: Duration,
    no_wait: bool,
    json_out: bool,
) -> Result<u8> {
    if !target.is_valid() {
        bail!("{target:?} is not a valid name: 1 to 128 letters, digits, `.`, `_` or `-`");
    }
    let (wire, manifest_bytes, id, version) = match prepare(file, sign, &target)? {
        Ok(p) => p,
        Err(issues) => {
            println!("{}: not published, the manifest is invalid", file.display());
            print!("{}", issue_lines(&issues));
            return Ok(EXIT_REFUSED);
        }
    };
    let prefix = op.prefix().to_string();
    let fence_timeout = Duration::from_secs(10);
    let deployment_topic = target.topic(&prefix);
    // Subscribe first, so no report between publishing and waiting is missed.
    let mut filters = match &target {
        Target::Device(d) => vec![
            topics::device_topic(&prefix, d, "state"),
            topics::device_topic(&prefix, d, "presence"),
        ],
        Target::Group(_) => vec![format!("{prefix}/+/state"), format!("{prefix}/+/presence")],
    };
    filters.push(deployment_topic.clone());
    let mut seen = op.snapshot(&filters, fence_timeout).await?;
    // Signing binds an expiry that moves with the clock, so the same manifest signed twice
    // is two different deployments, and devices refuse the second (its version is not
    // newer). Deploying an unchanged manifest again therefore keeps the one published.
    let republished = sign.is_some().then(|| {
        seen.iter()
            .find(|m| m.topic == deployment_topic && m.retain)
            .and_then(|m| unchanged_binding(&m.payload, &manifest_bytes, wall_ms()))
    });
    let published_at = Instant::now();
    let manifest_bytes = match republished.flatten() {
        Some(existing) => {
            eprintln!(
                "{id} v{version} is already published to {deployment_topic}, unchanged; waiting for it"
            );
            existing
        }
        None => {
            op.publish(&deployment_topic, true, wire).await?;
            seen.extend(op.fence(fence_timeout).await?);
            eprintln!("published {id} v{version} to {deployment_topic}");
            manifest_bytes
        }
    };
    seen.retain(|m| m.topic != deployment_topic);
    let digest = hex_sha256(&manifest_bytes);
    if no_wait {
        return Ok(0);
    }
    let deadline = published_at + timeout;
    let mut views = BTreeMap::new();
    if let Target::Group(g) = &target {
        fold(&prefix, &seen, &mut views);
        if group_summary(g, None, &views).members.is_empty() {
            // Nothing to wait for; the retained message reaches members when they connect.
            // A mistyped group name looks the same, hence the explicit note.
            eprintln!(
                "no device currently follows group {g}; devices of the group get it when they connect"
            );
            if json_out {
                println!(
                    "{}",
                    json!({"target": target.topic(&prefix), "id": id, "version": version, "digest": digest, "exitCode": 0, "devices": []})
                );
            }
            return Ok(0);
        }
    }
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let mut offline_noted = false;
    loop {
        fold(&prefix, &seen, &mut views);
        seen.clear();
        let members: Vec<(String, Option<bool>, Progress)> = match &target {
            Target::Device(d) => {
                let view = views.get(d);
                let p = view
                    .and_then(|v| v.state.as_ref())
                    .map(|s| progress(s, &digest, None))
                    .unwrap_or(Progress::Waiting);
                let online = view.and_then(DeviceView::online);
                if online != Some(true) && !offline_noted && !p.is_final() {
                    // Keep waiting (it may connect), but say why nothing happens.
                    eprintln!(
                        "{d} is {}; it gets the deployment when it connects",
                        if online == Some(false) {
                            "offline"
                        } else {
                            "not known to this hub (no presence)"
                        }
                    );
                    offline_noted = true;
                }
                // A single device is waited for even while offline, until the timeout.
                vec![(d.clone(), Some(true), p)]
            }
            Target::Group(g) => {
                group_summary(g, Some((id.clone(), version, digest.clone())), &views).members
            }
        };
        for (device, _, p) in &members {
            let label = p.label();
            if shown.get(device) != Some(&label) {
                eprintln!(
                    "{device}: {label} ({:.1} s)",
                    published_at.elapsed().as_secs_f64()
                );
                if let Progress::Failed(_, reasons) | Progress::Rejected(reasons) = p {
                    for r in reasons {
                        eprintln!(
                            "  {}: {}",
                            if r.path.is_empty() {
                                "(document)"
                            } else {
                                &r.path
                            },
                            r.message
                        );
                    }
                }
                shown.insert(device.clone(), label);
            }
        }
        let settled = members
            .iter()
            .all(|(_, online, p)| p.is_final() || *online != Some(true));
        let timed_out = Instant::now() >= deadline;
        if (settled && !members.is_empty()) || timed_out {
            let ok = members
                .iter()
                .all(|(_, _, p)| matches!(p, Progress::Applied | Progress::Overridden(_)));
            let code = if !settled || members.is_empty() {
                EXIT_TIMEOUT
            } else if ok {
                0
            } else {
                EXIT_REFUSED
            };
            let elapsed_ms = published_at.elapsed().as_millis() as u64;
            if json_out {
                let devices: Vec<Value> = members
                    .iter()
                    .map(|(d, online, p)| json!({"device": d, "online": online, "progress": p.label(), "reasons": reasons(p)}))
                    .collect();
                println!(
                    "{}",
                    json!({"target": target.topic(&prefix), "id": id, "version": version, "digest": digest, "exitCode": code, "elapsedMs": elapsed_ms, "devices": devices})
                );
            } else if code == EXIT_TIMEOUT {
                println!(
                    "{id} v{version}: no final answer within {timeout:?}{}",
                    if members.is_empty() {
                        " (no device follows this group)"
                    } else {
                        ""
                    }
                );
            } else {
                println!(
                    "{id} v{version}: {} after {elapsed_ms} ms",
                    if ok { "applied" } else { "not applied" }
                );
            }
            return Ok(code);
        }
        match op.recv_until(deadline).await? {
            Some(m) => seen.push(m),
            None => continue,
        }
    }
}

pub(crate) fn reasons(p: &Progress) -> Vec<manifest::Issue> {
    match p {
        Progress::Failed(_, r) | Progress::Rejected(r) => r.clone(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_900_000_000_000;

    fn bound(expires_in: Duration, manifest: &[u8]) -> Vec<u8> {
        let target = Target::Device("cam-1".into());
        outpost_core::binding::bind(
            manifest,
            Some(&manifest_target(&target)),
            &outpost_core::binding::expiry_after(NOW_MS, expires_in),
        )
        .unwrap()
    }

    #[test]
    fn an_unchanged_manifest_keeps_the_published_deployment() {
        let key = signing::generate_key().unwrap();
        let manifest = br#"{"id":"vision","version":3,"modules":{}}"#;
        let published = bound(Duration::from_secs(30 * 86_400), manifest);
        let retained = serde_json::to_vec(&signing::sign(&published, &key)).unwrap();
        // Signed again a minute later: a different expiry, the same deployment.
        let ours = bound(Duration::from_secs(30 * 86_400 + 60), manifest);
        assert_ne!(ours, published);
        assert_eq!(
            unchanged_binding(&retained, &ours, NOW_MS),
            Some(published.clone())
        );
        // Anything else changed: published anew.
        let changed = bound(
            Duration::from_secs(30 * 86_400),
            br#"{"id":"vision","version":4,"modules":{}}"#,
        );
        assert_eq!(unchanged_binding(&retained, &changed, NOW_MS), None);
        // The published one about to expire: signed anew rather than left to lapse.
        let soon = NOW_MS + 30 * 86_400 * 1000 - 60_000;
        assert_eq!(unchanged_binding(&retained, &ours, soon), None);
        // Not an envelope (say, a bare manifest someone published by hand): published anew.
        assert_eq!(unchanged_binding(&published, &ours, NOW_MS), None);
    }
}
