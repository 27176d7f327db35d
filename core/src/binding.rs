//! What binds a signed deployment (or withdrawal, or command) to its device and its time, as
//! Uptane and TUF bind metadata: the signed payload names its **target** and an **expiry**, so
//! an envelope signed for one device cannot be replayed on another's topic, and an old envelope
//! cannot be held back and delivered later (a freeze).
//!
//! Time on a device may lie (see the agent's `clock`), so expiry is judged against a *trusted
//! now*: the wall clock, but never earlier than the latest time the device has known to be
//! good (stored), nor than this build's own date. A device booting at 1970 therefore still
//! refuses an envelope that expired before it last knew the time; one whose expiry lies ahead
//! of that is accepted, and the version floor (in the reconciler) still refuses anything older
//! than what it runs.

use crate::manifest::{Deployment, Issue, Target};
use crate::state::Source;
use crate::time::{PLAUSIBLE_AFTER_MS, format_rfc3339, parse_rfc3339};

/// Clock error tolerated on expiry: a device a few minutes behind or ahead of the operator.
pub const EXPIRY_TOLERANCE_MS: u64 = 5 * 60 * 1000;

/// What a device knows when it judges a binding.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub device: &'a str,
    /// The device trusts signing keys: target and expiry are required.
    pub require: bool,
    /// Unix ms the device may trust as "now" ([`trusted_now`]).
    pub now_ms: u64,
}

/// The time to judge expiry by: the wall clock, never earlier than what the device last knew
/// to be true (`floor_ms`) or than this build's date.
pub fn trusted_now(wall_ms: u64, floor_ms: u64) -> u64 {
    wall_ms.max(floor_ms).max(PLAUSIBLE_AFTER_MS)
}

/// Every way `d` is not for this device, this source, or this time.
pub fn check(d: &Deployment, source: &Source, rules: &Rules<'_>) -> Vec<Issue> {
    let mut issues = Vec::new();
    match &d.target {
        None if rules.require => issues.push(Issue::new(
            "/target",
            "is required on this device (it trusts signing keys): sign the deployment for its device or group (`outpost-ctl deploy --device ID --sign-key KEY` does)",
        )),
        None => {}
        Some(target) => {
            if let Some(issue) = target_issue(target, source, rules.device) {
                issues.push(issue);
            }
        }
    }
    if let Some(issue) = expiry_issue(d.expires_at.as_deref(), rules) {
        issues.push(issue);
    }
    issues
}

/// Whether a payload for `target` may be taken from `source` on `device`.
pub fn target_issue(target: &Target, source: &Source, device: &str) -> Option<Issue> {
    match (target, source) {
        (Target::Device(d), Source::Device | Source::Local) if d == device => None,
        (Target::Device(d), Source::Device | Source::Local) => Some(Issue::new(
            "/target/device",
            format!("signed for device `{d}`; this device is `{device}`"),
        )),
        (Target::Device(d), Source::Group { name }) => Some(Issue::new(
            "/target/device",
            format!("signed for device `{d}`, but it arrived on group `{name}`'s topic"),
        )),
        (Target::Group(g), Source::Group { name }) if g == name => None,
        (Target::Group(g), Source::Group { name }) => Some(Issue::new(
            "/target/group",
            format!("signed for group `{g}`, but it arrived on group `{name}`'s topic"),
        )),
        (Target::Group(g), Source::Device | Source::Local) => Some(Issue::new(
            "/target/group",
            format!(
                "signed for group `{g}`, but it arrived as {}: a deployment for one device targets the device",
                match source {
                    Source::Local => "a local deployment",
                    _ => "this device's own deployment",
                }
            ),
        )),
    }
}

/// Whether an expiry has passed (or is missing where required).
pub fn expiry_issue(expires_at: Option<&str>, rules: &Rules<'_>) -> Option<Issue> {
    let Some(text) = expires_at else {
        return rules.require.then(|| {
            Issue::new(
                "/expiresAt",
                "is required on this device (it trusts signing keys): sign with an expiry (`outpost-ctl deploy` sets one; `outpost-ctl manifest sign --expires-in 30d`)",
            )
        });
    };
    let Some(at) = parse_rfc3339(text) else {
        return Some(Issue::new(
            "/expiresAt",
            format!("`{text}` is not an RFC 3339 time"),
        ));
    };
    let at_ms = at.saturating_mul(1000);
    (rules.now_ms > at_ms.saturating_add(EXPIRY_TOLERANCE_MS)).then(|| {
        Issue::new(
            "/expiresAt",
            format!(
                "expired at {text} (this device's time is {}): publish a newly signed one",
                format_rfc3339(rules.now_ms / 1000)
            ),
        )
    })
}

/// A signed withdrawal (tombstone) of one source's deployment, published retained on that
/// source's deployment topic in place of the deployment. On a device that trusts keys, a
/// source's deployment can only be withdrawn this way (an empty retained message is refused),
/// and `version` must be at least the version it withdraws, so an old withdrawal cannot be
/// replayed over a newer deployment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Withdrawal {
    /// The source whose deployment is withdrawn: `{"device": ID}` or `{"group": NAME}`.
    pub withdraw: Target,
    /// The newest version of that source's deployment this withdraws.
    pub version: u64,
    /// When this withdrawal stops being accepted (RFC 3339).
    pub expires_at: String,
}

/// How long an operator's signature stays acceptable when `--expires-in` is not given.
pub const DEFAULT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// Adds `target` and `expiresAt` to a manifest before it is signed, keeping it byte for byte
/// when it already says both. Fails when the manifest names another target than the one it is
/// published to, or is not a JSON object.
pub fn bind(manifest: &[u8], target: Option<&Target>, expires_at: &str) -> Result<Vec<u8>, String> {
    let mut value: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("not JSON: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| "the manifest is not a JSON object".to_string())?;
    let mut changed = false;
    if let Some(target) = target {
        let wanted = serde_json::to_value(target).map_err(|e| e.to_string())?;
        match object.get("target") {
            Some(existing) if *existing != wanted => {
                return Err(format!(
                    "the manifest's target is {existing}, but it is being published for {target}"
                ));
            }
            Some(_) => {}
            None => {
                object.insert("target".into(), wanted);
                changed = true;
            }
        }
    }
    if !object.contains_key("expiresAt") {
        object.insert("expiresAt".into(), expires_at.into());
        changed = true;
    }
    if !changed {
        return Ok(manifest.to_vec());
    }
    let mut out = serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())?;
    out.push(b'\n');
    Ok(out)
}

/// `wall_ms + duration`, as RFC 3339.
pub fn expiry_after(wall_ms: u64, duration: std::time::Duration) -> String {
    format_rfc3339(wall_ms / 1000 + duration.as_secs())
}

/// Parses a duration such as `30d`, `12h`, `90m`, `45s` (for `--expires-in`).
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn deployment(target: Option<Target>, expires: Option<&str>) -> Deployment {
        let mut d: Deployment =
            serde_json::from_str(r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{}}"#)
                .unwrap();
        d.target = target;
        d.expires_at = expires.map(String::from);
        d
    }

    fn rules(require: bool) -> Rules<'static> {
        Rules {
            device: "cam-1",
            require,
            now_ms: NOW,
        }
    }

    #[test]
    fn a_deployment_applies_only_to_its_target_and_source() {
        let later = format_rfc3339(NOW / 1000 + 3600);
        let group = Source::Group {
            name: "line-3".into(),
        };
        let ok = |t: Target, s: &Source| check(&deployment(Some(t), Some(&later)), s, &rules(true));
        assert!(ok(Target::Device("cam-1".into()), &Source::Device).is_empty());
        assert!(ok(Target::Device("cam-1".into()), &Source::Local).is_empty());
        assert!(ok(Target::Group("line-3".into()), &group).is_empty());
        // Replays: another device's envelope, a device's envelope on a group topic, another
        // group's, a group's as the device's own.
        for (t, s, path) in [
            (
                Target::Device("cam-2".into()),
                Source::Device,
                "/target/device",
            ),
            (
                Target::Device("cam-1".into()),
                group.clone(),
                "/target/device",
            ),
            (
                Target::Group("line-4".into()),
                group.clone(),
                "/target/group",
            ),
            (
                Target::Group("line-3".into()),
                Source::Device,
                "/target/group",
            ),
        ] {
            let issues = ok(t, &s);
            assert_eq!(issues.len(), 1, "{issues:?}");
            assert_eq!(issues[0].path, path);
        }
    }

    #[test]
    fn expiry_is_judged_with_a_tolerance_and_required_with_keys() {
        let past = format_rfc3339(NOW / 1000 - 3600);
        let just = format_rfc3339(NOW / 1000 - 60);
        let d = |e: Option<&str>| deployment(Some(Target::Device("cam-1".into())), e);
        let issues = check(&d(Some(&past)), &Source::Device, &rules(true));
        assert_eq!(issues[0].path, "/expiresAt");
        assert!(issues[0].message.contains("expired at"), "{issues:?}");
        assert!(check(&d(Some(&just)), &Source::Device, &rules(true)).is_empty());
        assert_eq!(
            check(&d(None), &Source::Device, &rules(true))[0].path,
            "/expiresAt"
        );
        assert!(check(&d(None), &Source::Device, &rules(false)).is_empty());
        let none = deployment(None, None);
        assert!(check(&none, &Source::Device, &rules(false)).is_empty());
        assert_eq!(check(&none, &Source::Device, &rules(true)).len(), 2);
    }

    #[test]
    fn a_clock_at_1970_judges_by_what_the_device_last_knew() {
        // The wall clock reads 1970; the device last knew a time two days ago.
        let known = NOW - 2 * 86_400_000;
        let now = trusted_now(0, known);
        assert_eq!(now, known);
        let r = Rules {
            device: "cam-1",
            require: true,
            now_ms: now,
        };
        let stale = format_rfc3339(known / 1000 - 86_400);
        let fresh = format_rfc3339(NOW / 1000 + 86_400);
        let d = |e: &str| deployment(Some(Target::Device("cam-1".into())), Some(e));
        assert_eq!(check(&d(&stale), &Source::Device, &r).len(), 1);
        assert!(check(&d(&fresh), &Source::Device, &r).is_empty());
        assert!(trusted_now(0, 0) >= PLAUSIBLE_AFTER_MS);
    }

    #[test]
    fn binding_adds_what_is_missing_and_refuses_a_different_target() {
        let bare = br#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{}}"#;
        let t = Target::Device("cam-1".into());
        let bound = bind(bare, Some(&t), "2026-12-31T00:00:00Z").unwrap();
        let d: Deployment = serde_json::from_slice(&bound).unwrap();
        assert_eq!(d.target, Some(t.clone()));
        assert_eq!(d.expires_at.as_deref(), Some("2026-12-31T00:00:00Z"));
        // Already bound: the bytes are kept exactly.
        assert_eq!(
            bind(&bound, Some(&t), "2030-01-01T00:00:00Z").unwrap(),
            bound
        );
        let err = bind(&bound, Some(&Target::Group("g".into())), "x").unwrap_err();
        assert!(err.contains("being published for group `g`"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap().as_secs(), 30 * 86_400);
        assert_eq!(parse_duration("90m").unwrap().as_secs(), 5_400);
        assert!(parse_duration("soon").is_none());
        assert!(parse_duration("5y").is_none());
        assert!(parse_duration("99999999999999999999d").is_none());
    }
}
