//! `outpost check`: is this device able to run? One finding per check — ok, warning or error,
//! and the fix when not ok — from the configuration down to the hub's access rules.
//!
//! Every check that waits on something outside the process has a timeout ([`STEP_TIMEOUT`]
//! and the shorter ones beside it), so `check` ends within seconds even when the hub is
//! black-holed or the engine hangs.
//!
//! # Layout
//!
//! - [`local`]: configuration, state directory and its free space, trusted keys, the clock;
//! - [`identity`]: the device's identity (client certificate and key, or login) and its
//!   certificate's expiry;
//! - [`hub`]: each hub endpoint reachable, the TLS handshake, an MQTT CONNECT and a probe
//!   published and read back on the device's own topics;
//! - [`engine`]: the container engine, its API version, its log rotation;
//! - [`bus`]: the local bus port, free or held by the running agent;
//! - [`x509`]: a certificate's validity, read from its DER.

pub mod bus;
pub mod engine;
pub mod hub;
pub mod identity;
pub mod local;
pub mod update;
pub mod x509;

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;

/// The longest any one network step of a check waits (a TCP connect, a TLS handshake, an
/// MQTT exchange, an engine call).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// How a check came out; ordered so the worst is the greatest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Error,
}

impl Level {
    /// `check`'s exit code for this worst result: 0 ok, 1 warning, 2 error.
    pub fn exit_code(self) -> u8 {
        self as u8
    }

    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// A stable name (`hub-tls`, `engine`), for scripts and `--json`.
    pub check: String,
    pub level: Level,
    pub message: String,
    /// What to do about it; always set when the level is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: &str, message: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            level: Level::Ok,
            message: message.into(),
            fix: None,
        }
    }

    pub fn warning(check: &str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            level: Level::Warning,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn error(check: &str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            level: Level::Error,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Every finding of one run, in the order the checks ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// The worst level found (ok when nothing was checked).
    pub fn worst(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }

    /// `{"worst", "findings"}`: what `check --json` prints and the support bundle keeps.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"worst": self.worst(), "findings": self.findings})
    }

    /// The findings as aligned lines, the fix under each finding that is not ok, and a count;
    /// levels in colour when `color`.
    pub fn human(&self, color: bool) -> String {
        let width = self
            .findings
            .iter()
            .map(|f| f.check.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for f in &self.findings {
            let word = format!("{:<7}", f.level.word());
            let word = match (color, f.level) {
                (false, _) => word,
                (true, Level::Ok) => format!("\x1b[32m{word}\x1b[0m"),
                (true, Level::Warning) => format!("\x1b[33m{word}\x1b[0m"),
                (true, Level::Error) => format!("\x1b[31m{word}\x1b[0m"),
            };
            out.push_str(&format!("{word}  {:<width$}  {}\n", f.check, f.message));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("{:7}  {:<width$}  fix: {fix}\n", "", ""));
            }
        }
        let count = |l: Level| self.findings.iter().filter(|f| f.level == l).count();
        out.push_str(&format!(
            "{} ok, {} warning(s), {} error(s)\n",
            count(Level::Ok),
            count(Level::Warning),
            count(Level::Error)
        ));
        out
    }
}

/// Runs every check for the configuration at `path` (with `OUTPOST__*` overrides from `env`).
/// A configuration that does not load is one error finding; nothing else can be checked then.
pub async fn run(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Report {
    match Config::load(path, env) {
        Err(e) => Report {
            findings: vec![local::config_error(path, &e)],
        },
        Ok(config) => run_with(&config).await,
    }
}

/// Runs every check for a loaded configuration (the hub's `support-bundle` command runs it
/// inside the agent).
pub async fn run_with(config: &Config) -> Report {
    let mut findings = vec![local::config_ok(config)];
    findings.extend(local::state_dir(config));
    let config = &provisioning(config, &mut findings);
    let identity = identity::check(config);
    findings.extend(identity.findings);
    findings.push(local::trusted_keys(config));
    findings.push(update::check(config));
    findings.extend(local::process_limits(config));
    findings.extend(local::process_user(config));
    // The network checks wait on other parties: run them side by side.
    let (hub, engine) = tokio::join!(hub::check(config), engine::check(config));
    findings.extend(hub.findings);
    findings.extend(engine.findings);
    findings.push(local::clock(
        outpost_core::time::unix_now(),
        identity.certificate.as_ref(),
        hub.server_certificate.as_ref(),
    ));
    findings.push(bus::check(config, engine.bridge_gateway).await);
    Report { findings }
}

/// With `[provisioning]`: the configuration as the agent will run it — with its identity once
/// provisioned, else with the claim identity (so the claim certificate and the hub are
/// checked) — and a finding on how provisioning stands.
fn provisioning(config: &Config, findings: &mut Vec<Finding>) -> Config {
    let Some(p) = &config.provisioning else {
        return config.clone();
    };
    let files = crate::provision::IdentityFiles::new(&config.state_dir);
    match crate::provision::identity::load(&files) {
        Ok(Some(id)) => {
            findings.push(Finding::ok(
                "provisioning",
                format!(
                    "provisioned as `{}` (serial {}, groups {:?})",
                    id.device_id, id.serial, id.groups
                ),
            ));
            crate::provision::apply(config.clone(), &id, &files)
        }
        Ok(None) => {
            findings.push(match crate::provision::identity::last_refusal(&files) {
                Some(r) => Finding::error(
                    "provisioning",
                    format!("the responder refused serial `{}`: {}", r.serial, r.reason),
                    "ask the operator to allow this serial (outpost-ctl provision serve --allow-list / --allow-pattern), or to run the responder with --reissue for a replaced board; the agent keeps asking",
                ),
                None => Finding::warning(
                    "provisioning",
                    format!(
                        "not provisioned yet: at start the agent asks the responder on {}:{} (prefix {})",
                        p.host, p.port, p.topic_prefix
                    ),
                    "start the agent with the hub reachable and `outpost-ctl provision serve` running; its log says how provisioning goes",
                ),
            });
            let mut claim = config.clone();
            if let Some(hub) = claim.hub.as_mut() {
                hub.client_auth = Some((p.claim_cert.clone(), p.claim_key.clone()));
                hub.ca_file.clone_from(&p.ca_file);
                hub.host.clone_from(&p.host);
                hub.port = p.port;
                hub.failover.clone_from(&p.failover);
            }
            claim
        }
        Err(e) => {
            findings.push(Finding::error(
                "provisioning",
                e.to_string(),
                format!(
                    "move {} aside and restart the agent to provision again (it refuses to start with a damaged identity)",
                    files.dir.display()
                ),
            ));
            config.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_level_is_the_exit_code() {
        let mut r = Report::default();
        assert_eq!(r.worst().exit_code(), 0);
        r.findings.push(Finding::ok("a", "fine"));
        r.findings.push(Finding::warning("b", "meh", "do x"));
        assert_eq!(r.worst().exit_code(), 1);
        r.findings.push(Finding::error("c", "bad", "do y"));
        assert_eq!(r.worst().exit_code(), 2);
        let text = r.human(false);
        assert!(text.contains("warning  b  meh\n"), "{text}");
        assert!(text.contains("fix: do y"), "{text}");
        assert!(text.ends_with("1 ok, 1 warning(s), 1 error(s)\n"));
        assert!(!text.contains('\x1b'));
        assert!(r.human(true).contains("\x1b[31m"));
    }
}
