//! The checks that need nothing but this device: the configuration, the state directory and
//! its free space, the trusted keys, the clock.

use std::path::Path;

use super::Finding;
use super::x509::Validity;
use crate::config::{Config, ConfigError};

pub fn config_error(path: &Path, e: &ConfigError) -> Finding {
    Finding::error(
        "config",
        e.to_string(),
        format!(
            "edit {} (or the OUTPOST__* variables); `outpost config check` lists every issue",
            path.display()
        ),
    )
}

pub fn config_ok(config: &Config) -> Finding {
    Finding::ok(
        "config",
        format!(
            "{} is valid (device {})",
            config.source.display(),
            config.device_id
        ),
    )
}

/// The state directory exists, is writable (a file is created and removed), and its
/// filesystem has room by the `[disk]` settings.
pub fn state_dir(config: &Config) -> Vec<Finding> {
    let dir = &config.state_dir;
    if !dir.exists() {
        // `outpost run` creates it; the parent must let it.
        let parent = dir.parent().unwrap_or(Path::new("/"));
        return vec![if writable(parent).is_ok() {
            Finding::warning(
                "state-dir",
                format!("{} does not exist yet", dir.display()),
                format!(
                    "`outpost run` creates it at start; or create it now: install -d -m 700 {}",
                    dir.display()
                ),
            )
        } else {
            Finding::error(
                "state-dir",
                format!(
                    "{} does not exist and {} is not writable, so the agent cannot create it",
                    dir.display(),
                    parent.display()
                ),
                format!(
                    "create it for the agent's user: install -d -m 700 {} (or change state_dir)",
                    dir.display()
                ),
            )
        }];
    }
    let mut out = vec![match writable(dir) {
        Ok(()) => Finding::ok("state-dir", format!("{} is writable", dir.display())),
        Err(e) => Finding::error(
            "state-dir",
            format!("{} is not writable: {e}", dir.display()),
            format!(
                "give the agent's user the directory (chown it, mode 700), or point state_dir elsewhere; \
                 a read-only filesystem needs a writable one for {}",
                dir.display()
            ),
        ),
    }];
    out.push(disk_space(config));
    out
}

fn writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".outpost-check-{}", std::process::id()));
    std::fs::write(&probe, b"check")?;
    std::fs::remove_file(&probe)
}

/// Free space on the state directory's filesystem against `[disk]`.
fn disk_space(config: &Config) -> Finding {
    let Some(usage) = crate::disk::usage(&config.state_dir) else {
        return Finding::warning(
            "disk-space",
            format!(
                "cannot measure the filesystem of {}",
                config.state_dir.display()
            ),
            format!("check it by hand: df -h {}", config.state_dir.display()),
        );
    };
    let used = usage.used_percent();
    let free_mb = usage.available_bytes / (1 << 20);
    let watermark = config.disk.high_watermark_percent;
    let message = format!(
        "{:.0}% used, {free_mb} MiB free (disk.high_watermark_percent = {watermark})",
        used
    );
    if usage.available_bytes < config.disk.store_reserve_bytes.max(1 << 20) {
        Finding::error(
            "disk-space",
            message,
            "free space on the state directory's filesystem: the store cannot commit deployments",
        )
    } else if used >= watermark as f64 {
        Finding::warning(
            "disk-space",
            message,
            "free space (old images: docker image prune; logs), or raise disk.high_watermark_percent: \
             above it the outbox sheds telemetry and pulls are refused",
        )
    } else {
        Finding::ok("disk-space", message)
    }
}

/// Keys are loaded and parsed with the configuration (a bad one is a configuration error);
/// what is left to say is whether there are any.
pub fn trusted_keys(config: &Config) -> Finding {
    let n = config.policy.trusted_keys.len();
    if n == 0 {
        Finding::warning(
            "trusted-keys",
            "none: this device accepts unsigned deployments and commands from anyone who can publish to its topics",
            "list the operators' public keys in policy.trusted_keys (`outpost-ctl keys generate` makes them; copy only the .pub file)",
        )
    } else {
        Finding::ok(
            "trusted-keys",
            format!("{n} key(s) loaded; only signed deployments and commands are accepted"),
        )
    }
}

/// The clock against what this build knows and against the certificates: a device clock at
/// 1970 (no RTC, no NTP yet) fails every TLS handshake and every expiry judgement.
pub fn clock(now: u64, device: Option<&Validity>, server: Option<&Validity>) -> Finding {
    let fix = "set the time: enable NTP (timedatectl set-ntp true) or fit an RTC; TLS fails until the clock is right";
    let plausible = outpost_core::time::PLAUSIBLE_AFTER_MS / 1000;
    let stamp = outpost_core::time::format_rfc3339(now);
    if now < plausible {
        return Finding::error(
            "clock",
            format!(
                "{stamp} is before this build was made ({}): the clock is not set",
                outpost_core::time::format_rfc3339(plausible)
            ),
            fix,
        );
    }
    for (what, v) in [("the hub's server", server), ("the device", device)] {
        let Some(v) = v else { continue };
        if now < v.not_before || now > v.not_after {
            return Finding::error(
                "clock",
                format!(
                    "{stamp} is outside {what} certificate's validity ({} to {})",
                    outpost_core::time::format_rfc3339(v.not_before),
                    outpost_core::time::format_rfc3339(v.not_after)
                ),
                format!("{fix}; if the clock is right, the certificate is what to replace"),
            );
        }
    }
    let against = match (server.is_some(), device.is_some()) {
        (true, true) => "; within the hub's and the device's certificates",
        (true, false) => "; within the hub's certificate",
        (false, true) => "; within the device's certificate",
        (false, false) => "",
    };
    Finding::ok("clock", format!("{stamp}{against}"))
}

/// How process modules' limits will hold, when process modules may run: in cgroups v2, or by
/// `setrlimit` (memory only) and why. Reads only.
pub fn process_limits(config: &Config) -> Option<Finding> {
    use crate::runtime::process::cgroup;
    if !config.runs_process_modules() {
        return None;
    }
    if config.runtime.process_cgroup == cgroup::Setting::Off {
        return Some(Finding::ok(
            "process-limits",
            "process modules' limits: setrlimit (memory only), as runtime.process_cgroup = \"off\" asks",
        ));
    }
    Some(match cgroup::probe(&config.runtime.process_cgroup) {
        Ok(placement) => Finding::ok(
            "process-limits",
            format!("process modules' limits: {}", placement.describe()),
        ),
        Err(why) => Finding::warning(
            "process-limits",
            format!(
                "process modules get their memory limit by setrlimit and no CPU or pids limit: {why}"
            ),
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) and let the agent write it (docs/reconciler.md#process-modules); or accept it",
        ),
    })
}

/// Who process modules will run as (`runtime.process_user`), where they may run: an unknown
/// user stops the agent at start-up, and root is worth a warning.
pub fn process_user(config: &Config) -> Option<Finding> {
    use crate::runtime::process::user;
    if !config.runs_process_modules() {
        return None;
    }
    Some(match user::resolve_here(&config.runtime.process_user) {
        Ok(Some(who)) => Finding::ok(
            "process-user",
            format!("process modules run as uid {}, gid {}", who.uid, who.gid),
        ),
        Ok(None) if user::agent_uid() == 0 => Finding::warning(
            "process-user",
            "process modules run as root (runtime.process_user): outside a container, they can read the device's keys and lift their own limits",
            "leave runtime.process_user out (nobody) or name an unprivileged user",
        ),
        Ok(None) => Finding::ok(
            "process-user",
            format!(
                "process modules run as the agent's user (uid {})",
                user::agent_uid()
            ),
        ),
        Err(why) => Finding::error(
            "process-user",
            format!("runtime.process_user: {why}; the agent will not start"),
            "name a user of /etc/passwd, or a uid[:gid]",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    #[test]
    fn a_clock_at_1970_or_outside_a_certificate_is_an_error() {
        assert_eq!(clock(0, None, None).level, Level::Error);
        let now = outpost_core::time::PLAUSIBLE_AFTER_MS / 1000 + 1000;
        assert_eq!(clock(now, None, None).level, Level::Ok);
        let v = Validity {
            not_before: now + 10,
            not_after: now + 100,
            subject: None,
        };
        let f = clock(now, Some(&v), None);
        assert_eq!(f.level, Level::Error);
        assert!(f.message.contains("device"), "{f:?}");
        assert!(f.fix.unwrap().contains("NTP"));
    }
}
