//! The support bundle: one tar.gz an operator can hand to whoever helps them, made by
//! `outpost support-bundle` on the device or by the hub's `support-bundle` command.
//!
//! What it holds: `README.txt` (what is inside, what was left out and why), `config.json`
//! (the effective configuration, files by path only), `check.txt` and `check.json`,
//! `state.json` (from the running agent, else a summary of the store), `agent.log` (the
//! journal of the `outpost` unit, or a note that there is none), `modules/NAME.log` (each
//! module's recent output, capped, secrets redacted) and `engine.json`.
//!
//! What it never holds: the contents of password files or keys, the bus secret, registry
//! passwords, module environment values, or the stored manifests (which carry registry
//! credentials). Besides leaving them out, every member goes through a last redaction of the
//! secrets known to the agent (hub and bus passwords, module environment values, registry
//! passwords) and of PEM private key blocks.
//!
//! Layout: `gather` (the sources), `redact` (the configuration as shown), `tar` (the archive).

pub mod gather;
pub mod redact;
pub mod tar;

use std::path::Path;

use serde_json::json;

use crate::config::{Config, ConfigError};
use crate::control::AgentHandle;

/// Most bytes of content (before compression) in a bundle; members past it are left out and
/// named in `README.txt`. Below the hub's cap for a file sent in chunks, compressed or not.
pub const MAX_CONTENT_BYTES: usize = 7 * 1024 * 1024;
/// The end of each module's log kept.
pub const MODULE_LOG_BYTES: usize = 512 * 1024;
/// The end of the agent's journal kept.
pub const AGENT_LOG_BYTES: usize = 1024 * 1024;
/// Most modules whose logs are taken.
pub const MAX_MODULES: usize = 32;

/// A finished bundle.
pub struct Bundle {
    pub bytes: Vec<u8>,
    /// `outpost-support-DEVICE-TIME.tar.gz`.
    pub file_name: String,
    /// Members left out over [`MAX_CONTENT_BYTES`].
    pub left_out: Vec<String>,
}

/// Where the bundle is made: by the `outpost` command (the agent may or may not run), or
/// inside the running agent for the hub's command.
#[derive(Clone, Copy)]
enum Origin<'a> {
    Cli,
    Agent(&'a AgentHandle),
}

/// The bundle as `outpost support-bundle` makes it.
pub async fn from_cli(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Bundle {
    let config = Config::load(path, env);
    build(path, config, Origin::Cli).await
}

/// The bundle as the running agent makes it for the hub's `support-bundle` command.
pub async fn from_agent(config: &Config, handle: &AgentHandle) -> Bundle {
    build(&config.source, Ok(config.clone()), Origin::Agent(handle)).await
}

/// Secrets taken out of every member, longest first.
#[derive(Default)]
struct Redactor(Vec<String>);

impl Redactor {
    fn add(&mut self, secret: String) {
        if secret.len() >= 4 && !self.0.contains(&secret) {
            self.0.push(secret);
            self.0.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    fn apply(&self, text: &str) -> String {
        let mut out = strip_private_keys(text);
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// Every PEM private key block replaced by a marker (`-----BEGIN ... PRIVATE KEY-----`).
fn strip_private_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let header_end = rest[start..].find("-----\n").map(|i| start + i);
        let is_key = header_end.is_some_and(|h| rest[start..h].contains("PRIVATE KEY"));
        let end = rest[start..].find("-----END ").and_then(|e| {
            rest[start + e + 9..]
                .find("-----")
                .map(|f| start + e + 9 + f + 5)
        });
        match (is_key, end) {
            (true, Some(end)) => {
                out.push_str(&rest[..start]);
                out.push_str("[private key redacted]");
                rest = &rest[end..];
            }
            _ => {
                out.push_str(&rest[..start + 11]);
                rest = &rest[start + 11..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Members under the content cap.
struct Members {
    list: Vec<(String, String)>,
    total: usize,
    left_out: Vec<String>,
}

impl Members {
    fn add(&mut self, name: &str, text: String) {
        if self.total + text.len() > MAX_CONTENT_BYTES {
            self.left_out.push(name.to_string());
            return;
        }
        self.total += text.len();
        self.list.push((name.to_string(), text));
    }
}

/// What the sources gave, redactions included.
struct Gathered {
    state: serde_json::Value,
    engine: serde_json::Value,
    /// Each module's log, its own secrets already taken out.
    modules: Vec<(String, String)>,
    redactor: Redactor,
    notes: Vec<String>,
}

/// The whole time module logs may take, whatever their number: with the checks running
/// beside them, a bundle stays within the hub command's 30 s.
pub const MODULE_LOGS_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

async fn gather_all(c: &Config, origin: Origin<'_>) -> Gathered {
    let mut g = Gathered {
        state: json!(null),
        engine: json!(null),
        modules: Vec::new(),
        redactor: Redactor::default(),
        notes: Vec::new(),
    };
    for file in [
        c.hub
            .as_ref()
            .and_then(|h| h.credentials.as_ref().map(|(_, f)| f.clone())),
        c.bus.external_credentials.as_ref().map(|(_, f)| f.clone()),
    ]
    .into_iter()
    .flatten()
    {
        if let Ok(p) = outpost_mqtt::Password::read(&file) {
            g.redactor.add(p.expose().to_string());
        }
    }
    g.state = match origin {
        Origin::Agent(handle) => {
            let s = handle.state.borrow().clone();
            json!({"from": "the running agent", "state": s})
        }
        Origin::Cli => gather::state(c).await,
    };
    let rt = match crate::check::engine::connect(c).await {
        Ok(rt) => rt,
        Err(e) => {
            g.engine = json!({"error": e});
            g.notes.push(format!(
                "module logs: absent, the engine did not answer ({e})"
            ));
            return g;
        }
    };
    g.engine = gather::engine_facts(&rt, &c.device_id).await;
    let containers = match tokio::time::timeout(
        gather::SOURCE_TIMEOUT,
        crate::runtime::Runtime::list(&rt, &c.device_id),
    )
    .await
    {
        Ok(Ok(list)) => list,
        _ => Vec::new(),
    };
    let agent_runs = matches!(origin, Origin::Agent(_))
        || crate::api::running_state(&c.api_socket, std::time::Duration::from_secs(2))
            .await
            .is_some();
    let deadline = tokio::time::Instant::now() + MODULE_LOGS_BUDGET;
    for container in containers.iter().take(MAX_MODULES) {
        let name = if container.module.is_empty() {
            container.name.clone()
        } else {
            container.module.clone()
        };
        let fetch = async {
            let mut secrets = gather::container_secrets(&rt, &container.id).await;
            let text = match origin {
                Origin::Agent(handle) => {
                    if let Ok(more) = handle.secrets(&name).await {
                        secrets.extend(more);
                    }
                    match handle
                        .logs(&name, gather::MODULE_LOG_LINES, MODULE_LOG_BYTES)
                        .await
                    {
                        Ok(Ok(text)) => Ok(text),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Origin::Cli if agent_runs => gather::module_log_via_api(c, &name)
                    .await
                    .ok_or_else(|| "the agent did not send the log".to_string()),
                Origin::Cli => gather::container_log(&rt, &container.id).await,
            };
            (secrets, text)
        };
        // Out of time, the log is not taken: without its secrets it could not be redacted.
        let Ok((secrets, text)) = tokio::time::timeout_at(deadline, fetch).await else {
            g.modules.push((
                name,
                format!(
                    "(no log: the {} s budget for module logs was spent)\n",
                    MODULE_LOGS_BUDGET.as_secs()
                ),
            ));
            continue;
        };
        let text = match text {
            Ok(t) => {
                let (t, cut) = gather::tail(&t, MODULE_LOG_BYTES);
                if cut {
                    g.notes.push(format!(
                        "modules/{name}.log: the last {} KiB only",
                        MODULE_LOG_BYTES / 1024
                    ));
                }
                t
            }
            Err(e) => format!("(no log: {e})\n"),
        };
        let mut own = Redactor::default();
        for s in &secrets {
            own.add(s.clone());
            // Long ones (passwords, tokens) go from every member too.
            if s.len() >= 8 {
                g.redactor.add(s.clone());
            }
        }
        g.modules.push((name, own.apply(&text)));
    }
    g
}

async fn build(path: &Path, config: Result<Config, ConfigError>, origin: Origin<'_>) -> Bundle {
    let now = outpost_core::time::unix_now();
    let stamp = outpost_core::time::format_rfc3339(now).replace([':', '-'], "");
    let mut members = Members {
        list: Vec::new(),
        total: 0,
        left_out: Vec::new(),
    };
    let device = config
        .as_ref()
        .map_or("unknown".to_string(), |c| c.device_id.clone());
    // The checks wait on the hub and the engine; the sources on the engine, the agent and the
    // journal: side by side, each with its own timeouts.
    let checks = async {
        match &config {
            Ok(c) => crate::check::run_with(c).await,
            Err(e) => crate::check::Report {
                findings: vec![crate::check::local::config_error(path, e)],
            },
        }
    };
    let sources = async {
        match &config {
            Ok(c) => Some(gather_all(c, origin).await),
            Err(_) => None,
        }
    };
    let (report, gathered, journal) = tokio::join!(checks, sources, gather::agent_log());
    let Gathered {
        state,
        engine,
        modules,
        redactor,
        mut notes,
    } = gathered.unwrap_or_else(|| Gathered {
        state: json!({"error": "no configuration"}),
        engine: json!({"error": "no configuration"}),
        modules: Vec::new(),
        redactor: Redactor::default(),
        notes: Vec::new(),
    });
    let agent_log = match journal {
        Ok(text) => gather::tail(&text, AGENT_LOG_BYTES).0,
        Err(note) => {
            notes.push(format!("agent.log: {note}"));
            format!("{note}\n")
        }
    };

    let config_json = match &config {
        Ok(c) => redact::config_json(c),
        Err(e) => json!({"error": e.to_string()}),
    };
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let check_json = report.json();
    let mut pending = vec![
        ("config.json".to_string(), pretty(&config_json)),
        ("check.txt".to_string(), report.human(false)),
        ("check.json".to_string(), pretty(&check_json)),
        ("state.json".to_string(), pretty(&state)),
        ("engine.json".to_string(), pretty(&engine)),
        ("agent.log".to_string(), agent_log),
    ];
    // The agent's update record (versions, slots, outcomes: no secret in it).
    if let Ok(c) = &config {
        let record = crate::update::record::Paths::new(&c.state_dir).record();
        if let Ok(text) = std::fs::read_to_string(&record) {
            pending.push(("agent-update.json".to_string(), text));
        }
    }
    for (name, text) in modules {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        pending.push((format!("modules/{safe}.log"), text));
    }
    for (name, text) in pending {
        members.add(&name, redactor.apply(&text));
    }
    let readme = readme(&device, now, &members.left_out, &notes);
    let mut tar = tar::TarGz::new(now);
    let mut all = vec![("README.txt".to_string(), redactor.apply(&readme))];
    all.extend(members.list);
    for (name, text) in &all {
        // Names are ours and short; a failure here would be a bug, and the member is skipped.
        if let Err(e) = tar.add(name, text.as_bytes()) {
            tracing::warn!(member = %name, error = %e, "support bundle member skipped");
        }
    }
    let bytes = tar.finish().unwrap_or_default();
    Bundle {
        bytes,
        file_name: format!("outpost-support-{device}-{stamp}.tar.gz"),
        left_out: members.left_out,
    }
}

fn readme(device: &str, now: u64, left_out: &[String], notes: &[String]) -> String {
    let mut s = format!(
        "Outpost support bundle\n\ndevice: {device}\nmade: {}\nagent version: {}\n\n\
         config.json   the effective configuration; files by path only\n\
         check.txt     `outpost check`, as printed; check.json the same for machines\n\
         state.json    the reported state (from the running agent) or a summary of the store\n\
         agent.log     the agent's recent journal (journalctl -u outpost)\n\
         agent-update.json  the agent's update record, when it has been updated\n\
         modules/*.log each module's recent output, secrets redacted\n\
         engine.json   the engine's version, facts and the images this device's modules run\n\n\
         Never included: password files' or keys' contents, the bus secret, registry passwords,\n\
         module environment values, stored manifests.\n",
        outpost_core::time::format_rfc3339(now),
        outpost_core::version::current(),
    );
    if !left_out.is_empty() {
        s.push_str(&format!(
            "\nLeft out over the {} MiB cap: {}\n",
            MAX_CONTENT_BYTES >> 20,
            left_out.join(", ")
        ));
    }
    if !notes.is_empty() {
        s.push_str("\nNotes:\n");
        for n in notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s
}

/// Writes `bytes` to `path`, readable by its owner only (a bundle describes the device).
///
/// Fails when the file cannot be created or written.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_past_the_cap_are_left_out_and_named() {
        let mut m = Members {
            list: Vec::new(),
            total: 0,
            left_out: Vec::new(),
        };
        m.add("a", "x".repeat(MAX_CONTENT_BYTES - 10));
        m.add("b", "y".repeat(11));
        m.add("c", "z".repeat(10));
        assert_eq!(m.total, MAX_CONTENT_BYTES);
        assert_eq!(m.left_out, ["b"]);
        let readme = readme("d", 0, &m.left_out, &[]);
        assert!(
            readme.contains("Left out over the 7 MiB cap: b"),
            "{readme}"
        );
    }

    #[test]
    fn private_keys_and_known_secrets_are_taken_out() {
        let mut r = Redactor::default();
        r.add("hunter2-password".into());
        r.add("abc".into());
        let text = "a\n-----BEGIN PRIVATE KEY-----\nMIIEsecret\n-----END PRIVATE KEY-----\nb hunter2-password abc\n\
                    -----BEGIN CERTIFICATE-----\nMIIcert\n-----END CERTIFICATE-----\n";
        let out = r.apply(text);
        assert!(
            !out.contains("MIIEsecret") && !out.contains("hunter2"),
            "{out}"
        );
        assert!(out.contains("[private key redacted]"));
        assert!(out.contains("abc"), "too short to redact");
        assert!(out.contains("MIIcert"), "certificates are not secret");
        let ec = "-----BEGIN EC PRIVATE KEY-----\nAAA\n-----END EC PRIVATE KEY-----";
        assert_eq!(r.apply(ec), "[private key redacted]");
    }
}
