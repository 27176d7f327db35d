//! A fleet on one machine: N real agents (`outpost run`), each with its own device id, state
//! folder and API socket, on one hub broker, running process modules (no container engine, so
//! N can be large). The rollout test and the fleet benchmark both use it.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::broker::Broker;
use crate::engine::{outpost_command, start_ticks};

/// How the fleet's devices are set up.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Device ids are `{name}-{i:04}`.
    pub name: String,
    pub devices: usize,
    pub groups: Vec<String>,
    /// Trust this public key (devices then accept signed deployments only).
    pub trusted_key: Option<PathBuf>,
    /// Executables process modules may run.
    pub allowed_executables: Vec<String>,
    /// Devices (by index) whose policy allows only the first of `allowed_executables`: a
    /// deployment running any other one is refused there — the share of a fleet a bad
    /// deployment fails on.
    pub refusing: Vec<usize>,
    pub log_level: String,
}

impl FleetOptions {
    pub fn new(name: &str, devices: usize) -> FleetOptions {
        FleetOptions {
            name: name.into(),
            devices,
            groups: vec![],
            trusted_key: None,
            allowed_executables: vec!["/bin/sleep".into(), "/usr/bin/sleep".into()],
            refusing: vec![],
            log_level: "warn".into(),
        }
    }

    pub fn device(&self, i: usize) -> String {
        format!("{}-{i:04}", self.name)
    }
}

/// One agent of the fleet.
pub struct Member {
    pub id: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Member {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Resident and proportional set size of the agent process, in KiB (`smaps_rollup`).
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.pid()?)).ok()?;
        let field = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        };
        Some((field("Rss:")?, field("Pss:")?))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Process modules outlive the agent: end the ones still recorded as running (same pid
        // and kernel start time, so a reused pid is never hit).
        let Ok(entries) = std::fs::read_dir(self.dir.join("state/processes")) else {
            return;
        };
        for e in entries.flatten() {
            let Some(run) = std::fs::read(e.path().join("run.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            else {
                continue;
            };
            if let Some(pid) = run["pid"].as_i64().filter(|p| *p > 1)
                && run["startTicks"].as_u64().is_some()
                && start_ticks(pid) == run["startTicks"].as_u64()
            {
                // kill(2) on the group, never the `kill` program with a negative number.
                outpost_agent::runtime::process::kill_group(pid as i32);
            }
        }
    }
}

/// The fleet: its agents stop (and their modules end) when it is dropped.
pub struct Fleet {
    pub options: FleetOptions,
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
}

impl Fleet {
    /// Writes every device's configuration and starts its agent (without waiting: see
    /// [`Fleet::wait_online`]).
    pub fn start(broker: &Broker, options: FleetOptions) -> Result<Fleet> {
        let dir = tempfile::Builder::new().prefix("fleet-").tempdir()?;
        crate::engine::passable(dir.path());
        let mut members = Vec::with_capacity(options.devices);
        let hub = broker.device_hub_section();
        for i in 0..options.devices {
            let id = options.device(i);
            let root = dir.path().join(&id);
            std::fs::create_dir_all(&root)?;
            let allowed: Vec<String> = if options.refusing.contains(&i) {
                options
                    .allowed_executables
                    .iter()
                    .take(1)
                    .cloned()
                    .collect()
            } else {
                options.allowed_executables.clone()
            };
            let mut policy = format!("[policy]\nallowed_executables = {}\n", json!(allowed));
            if let Some(key) = &options.trusted_key {
                policy.push_str(&format!("trusted_keys = [\"{}\"]\n", key.display()));
            }
            let config = format!(
                "device_id = \"{id}\"\nstate_dir = \"{root}/state\"\nlog_level = \"{level}\"\n\
                 {hub}keep_alive_secs = 30\ngroups = {groups}\n\
                 [runtime]\nkind = \"process\"\nstop_grace_secs = 2\n\
                 [api]\nsocket = \"{root}/api.sock\"\n[bus]\nenabled = false\n{policy}",
                root = root.display(),
                level = options.log_level,
                groups = json!(options.groups),
            );
            let path = root.join("config.toml");
            std::fs::write(&path, config)?;
            let mut member = Member {
                id,
                dir: root,
                child: None,
            };
            member.child = Some(spawn(&path, &member.dir)?);
            members.push(member);
        }
        Ok(Fleet {
            options,
            dir,
            members,
        })
    }

    pub fn ids(&self) -> Vec<String> {
        self.members.iter().map(|m| m.id.clone()).collect()
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Waits until every device's presence says online on the hub; returns how long it took.
    pub async fn wait_online(&self, broker: &Broker, within: Duration) -> Result<Duration> {
        let started = tokio::time::Instant::now();
        let mut op = broker.operator(self.dir.path()).await?;
        op.subscribe(&["outpost/+/presence".to_string()]).await?;
        let mut online = std::collections::BTreeSet::new();
        let deadline = started + within;
        while online.len() < self.members.len() {
            let Some(m) = op.recv_until(deadline).await? else {
                let missing: Vec<&str> = self
                    .members
                    .iter()
                    .filter(|m| !online.contains(&m.id))
                    .map(|m| m.id.as_str())
                    .take(5)
                    .collect();
                anyhow::bail!(
                    "{} of {} devices online after {within:?}; missing e.g. {missing:?}; a log: {}",
                    online.len(),
                    self.members.len(),
                    missing
                        .first()
                        .and_then(|id| self.member(id))
                        .map(Member::log)
                        .unwrap_or_default()
                );
            };
            let Some(device) = outpost_core_device(&m.topic) else {
                continue;
            };
            let up = serde_json::from_slice::<Value>(&m.payload)
                .ok()
                .is_some_and(|v| v["online"] == true);
            if up && self.member(device).is_some() {
                online.insert(device.to_string());
            }
        }
        Ok(started.elapsed())
    }

    /// Kills every agent (`kill -9`) and ends their modules.
    pub fn stop(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn outpost_core_device(topic: &str) -> Option<&str> {
    topic.strip_prefix("outpost/")?.strip_suffix("/presence")
}

fn spawn(config: &Path, dir: &Path) -> Result<Child> {
    let log = std::fs::File::create(dir.join("agent.log"))?;
    outpost_command()
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start outpost run")
}

/// A deployment of one process module (`sleep`), whose `env` makes each version a change.
pub fn sleeper(id: &str, version: u64) -> Value {
    json!({
        "schemaVersion": "1.0",
        "id": id,
        "version": version,
        "modules": {
            "app": {
                "runtime": "process",
                "command": ["/bin/sleep", "86400"],
                "env": {"RELEASE": version.to_string()}
            }
        }
    })
}
