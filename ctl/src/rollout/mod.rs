//! `outpost-ctl rollout`: a signed deployment sent to a fleet in waves — a canary first, then
//! a growing rate — each wave only once the one before applied, aborting (and, when asked,
//! reverting) when the failures pass a budget. Everything about a rollout is retained on the
//! broker under the operator's topics, so it can be watched, resumed, cancelled or reverted
//! from any machine; the devices see nothing but their own deployment topic.
//!
//! `plan` holds the pure rules, `stage` what each device is sent, `store` the broker's
//! topics, `run` the runner, `view` the tables.

pub mod plan;
pub mod run;
pub mod stage;
pub mod store;
pub mod view;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use outpost_core::present::{issue_lines, read_input};
use outpost_core::wire::topics::{self, is_level};
use outpost_core::{manifest, signing};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::EXIT_REFUSED;
use crate::deploy::{parse_expiry, wall_ms};
use crate::hub::{DeviceView, Operator, describe_deployment, fold};
use plan::{DeviceRecord, DeviceStatus, Policy, Record, Status, Threshold, Wave};
use run::{Runner, live_owner, me};
use stage::{Signer, Staged};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Send a deployment to a set of devices in waves, and follow it until it completes or
    /// aborts. Exit code: 0 completed, 1 aborted, cancelled, paused or refused.
    Start(Box<StartArgs>),
    /// Go on with a rollout whose runner stopped (Ctrl-C, a closed laptop, a crash), from
    /// this machine or any other.
    Resume {
        id: String,
        /// Take over even though the rollout's runner sent a heartbeat in the last 20 s (it
        /// stops when it sees the takeover).
        #[arg(long)]
        force: bool,
    },
    /// A rollout's waves as a table (without an id: every rollout on the hub).
    Status {
        id: Option<String>,
        /// Print the table again on every change until the rollout ends (Ctrl-C ends).
        #[arg(long)]
        watch: bool,
        /// One line per device as well.
        #[arg(long)]
        devices: bool,
        #[command(flatten)]
        output: crate::Output,
    },
    /// Stop a rollout: its runner sends no further wave. Devices already sent the deployment
    /// keep it (`rollout revert` sends them their previous one).
    Cancel { id: String },
    /// Send every device the rollout reached its previous deployment again (prepared and
    /// signed when the rollout started), and follow them until they applied it.
    Revert {
        id: String,
        /// Revert even though a live runner still sends waves (cancel it first instead).
        #[arg(long)]
        force: bool,
    },
    /// Remove a finished rollout's retained messages from the hub.
    Forget { id: String },
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The deployment manifest (bare: the rollout binds and signs it for each device).
    pub file: PathBuf,
    /// The rollout's name (default: `{deployment id}-v{version}`).
    #[arg(long)]
    pub id: Option<String>,
    /// The devices whose presence lists this group.
    #[arg(long)]
    pub group: Option<String>,
    /// These devices (comma-separated, or the option repeated).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Only devices matching KEY=VALUE, from what they report: arch, os, agentVersion, group,
    /// deployment (the id in force), online (true/false). Repeat to require several.
    #[arg(long = "select", value_name = "KEY=VALUE")]
    pub select: Vec<String>,
    /// Sign each device's deployment (and the reverts) with this private key.
    #[arg(long)]
    pub sign_key: Option<PathBuf>,
    /// How long the signatures are accepted by devices (`30d`, `12h`).
    #[arg(long, default_value = "30d", value_parser = parse_expiry)]
    pub expires_in: Duration,
    /// Devices of the first (canary) wave.
    #[arg(long, default_value_t = 1)]
    pub canary: usize,
    /// Devices of the second wave (default: twice the canary).
    #[arg(long)]
    pub wave_size: Option<usize>,
    /// Each later wave is this many times the one before (1: a fixed rate).
    #[arg(long, default_value_t = 2.0)]
    pub growth: f64,
    /// No wave larger than this (0: no cap).
    #[arg(long, default_value_t = 0)]
    pub max_wave: usize,
    /// Failures tolerated before aborting: a count (`0`: the first failure aborts) or a share
    /// of the devices that settled (`10%`).
    #[arg(long, default_value = "0")]
    pub max_failures: Threshold,
    /// Judge the failure budget only once this many devices have settled.
    #[arg(long, default_value_t = 1)]
    pub min_devices: usize,
    /// Seconds an online device may take to settle before it counts as failed (`silent`).
    #[arg(long, default_value_t = 600)]
    pub device_timeout: u64,
    /// Seconds to watch a wave after it applied before sending the next.
    #[arg(long, default_value_t = 0)]
    pub bake: u64,
    /// On abort, send the devices already reached their previous deployment again.
    #[arg(long)]
    pub revert_on_abort: bool,
    /// Prepare and store the rollout on the hub, then exit without sending anything
    /// (`rollout resume ID` runs it, from any machine).
    #[arg(long)]
    pub no_run: bool,
}

/// Runs a `rollout` command; returns the exit code.
pub async fn run(mut op: Operator, command: RolloutCommand) -> Result<u8> {
    let stop = CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            signal.cancel();
        }
    });
    match command {
        RolloutCommand::Start(args) => start(op, *args, stop).await,
        RolloutCommand::Resume { id, force } => {
            let Some(stored) = load_or_say(&mut op, &id).await? else {
                return Ok(EXIT_REFUSED);
            };
            let record = &stored.record;
            if record.status.is_final() {
                eprintln!(
                    "rollout {id} is {}: nothing to resume{}",
                    record.status.name(),
                    if matches!(record.status, Status::Aborted | Status::Cancelled) {
                        " (`outpost-ctl rollout revert` sends the devices it reached their previous deployment)"
                    } else {
                        ""
                    }
                );
                return Ok(EXIT_REFUSED);
            }
            if stored.control.cancel {
                eprintln!("rollout {id} was cancelled; it is not resumed");
                return Ok(EXIT_REFUSED);
            }
            if let Some(owner) = live_owner(record, &me())
                && !force
            {
                eprintln!(
                    "rollout {id} is being run by {}:{} (heartbeat {} s ago); use --force to take over",
                    owner.host,
                    owner.pid,
                    outpost_core::time::unix_now().saturating_sub(owner.heartbeat_at)
                );
                return Ok(EXIT_REFUSED);
            }
            let t = record.tally(None);
            eprintln!(
                "[{id}] resuming at wave {} of {}: {} applied, {} failed, {} in flight, {} pending",
                record.current_wave,
                record.waves.len(),
                t.applied,
                t.failed,
                t.in_flight,
                t.pending
            );
            let mut runner = Runner::new(op, stored.record, stored.staged);
            let code = runner.drive(stop).await?;
            runner.flush().await?;
            Ok(code)
        }
        RolloutCommand::Status {
            id,
            watch,
            devices,
            output,
        } => match id {
            None => view::list(op, output.json).await,
            Some(id) => view::status(op, &id, watch, devices, output.json, stop).await,
        },
        RolloutCommand::Cancel { id } => cancel(op, &id).await,
        RolloutCommand::Revert { id, force } => {
            let Some(stored) = load_or_say(&mut op, &id).await? else {
                return Ok(EXIT_REFUSED);
            };
            if let Some(owner) = live_owner(&stored.record, &me())
                && stored.record.status == Status::Running
                && !force
            {
                eprintln!(
                    "rollout {id} is still being run by {}:{}; `outpost-ctl rollout cancel {id}` first (or --force)",
                    owner.host, owner.pid
                );
                return Ok(EXIT_REFUSED);
            }
            let mut runner = Runner::new(op, stored.record, stored.staged);
            let code = runner.revert(stop).await?;
            runner.flush().await?;
            Ok(code)
        }
        RolloutCommand::Forget { id } => {
            let Some(stored) = load_or_say(&mut op, &id).await? else {
                return Ok(EXIT_REFUSED);
            };
            if let Some(owner) = live_owner(&stored.record, &me()) {
                eprintln!(
                    "rollout {id} is being run by {}:{}; cancel it first",
                    owner.host, owner.pid
                );
                return Ok(EXIT_REFUSED);
            }
            for topic in &stored.topics {
                op.publish(topic, true, Vec::new()).await?;
            }
            op.fence(Duration::from_secs(30)).await?;
            eprintln!(
                "forgot rollout {id} ({} retained messages cleared)",
                stored.topics.len()
            );
            Ok(0)
        }
    }
}

async fn load_or_say(op: &mut Operator, id: &str) -> Result<Option<store::Stored>> {
    if !is_level(id) {
        bail!("`{id}` is not a rollout id: 1 to 128 letters, digits, `.`, `_` or `-`");
    }
    let stored = store::load(op, id).await?;
    if stored.is_none() {
        eprintln!(
            "no rollout {id} on this hub ({}); `outpost-ctl rollout status` lists them",
            store::state_topic(op.prefix(), id)
        );
    }
    Ok(stored)
}

async fn cancel(mut op: Operator, id: &str) -> Result<u8> {
    let Some(stored) = load_or_say(&mut op, id).await? else {
        return Ok(EXIT_REFUSED);
    };
    let prefix = op.prefix().to_string();
    if stored.record.status.is_final() {
        eprintln!("rollout {id} is already {}", stored.record.status.name());
        return Ok(0);
    }
    let control = store::Control {
        cancel: true,
        at: outpost_core::time::unix_now(),
    };
    op.publish(
        &store::control_topic(&prefix, id),
        true,
        serde_json::to_vec(&control)?,
    )
    .await?;
    match live_owner(&stored.record, &me()) {
        Some(owner) => eprintln!(
            "cancel requested: the runner on {}:{} sends no further wave",
            owner.host, owner.pid
        ),
        None => {
            // No live runner: record it here.
            let mut record = stored.record;
            record.status = Status::Cancelled;
            record.reason = Some("cancelled by an operator".into());
            record.updated_at = outpost_core::time::unix_now();
            op.publish(
                &store::state_topic(&prefix, id),
                true,
                store::encode(&record)?,
            )
            .await?;
            eprintln!("cancelled rollout {id}");
        }
    }
    op.fence(Duration::from_secs(10)).await?;
    Ok(0)
}

/// `--select KEY=VALUE`: does the device match?
fn matches(view: &DeviceView, key: &str, value: &str) -> bool {
    let state = view.state.as_ref();
    let presence = view.presence.as_ref();
    match key {
        "arch" => state.is_some_and(|s| s.agent.arch == value),
        "os" => state.is_some_and(|s| s.agent.os == value),
        "agentVersion" | "agent-version" => {
            state
                .map(|s| s.agent.version.as_str())
                .or_else(|| presence.and_then(|p| p.agent_version.as_deref()))
                == Some(value)
        }
        "group" => presence.is_some_and(|p| p.groups.iter().any(|g| g == value)),
        "deployment" => state
            .and_then(|s| s.deployment.as_ref())
            .is_some_and(|d| d.id == value),
        "online" => (view.online() == Some(true)).to_string() == value,
        _ => false,
    }
}

const SELECT_KEYS: &[&str] = &[
    "arch",
    "os",
    "agentVersion",
    "group",
    "deployment",
    "online",
];

fn parse_selectors(select: &[String]) -> Result<Vec<(String, String)>> {
    select
        .iter()
        .map(|s| {
            let Some((k, v)) = s.split_once('=') else {
                bail!("--select `{s}`: expected KEY=VALUE, e.g. arch=aarch64");
            };
            let k = k.trim();
            if !SELECT_KEYS.contains(&k) && k != "agent-version" {
                bail!(
                    "--select `{s}`: unknown key `{k}`; the keys are {}",
                    SELECT_KEYS.join(", ")
                );
            }
            Ok((k.to_string(), v.trim().to_string()))
        })
        .collect()
}

async fn start(mut op: Operator, args: StartArgs, stop: CancellationToken) -> Result<u8> {
    let prefix = op.prefix().to_string();
    // The manifest: bare, valid, bound by the rollout (not by itself).
    let bytes = read_input(&args.file).map_err(anyhow::Error::msg)?;
    let value: Option<Value> = serde_json::from_slice(&bytes).ok();
    if value
        .as_ref()
        .is_some_and(|v| v.get("payloadType").is_some())
    {
        bail!(
            "{} is a signed envelope; a rollout binds the manifest to each device and signs it: give the bare manifest and --sign-key",
            args.file.display()
        );
    }
    if value.as_ref().is_some_and(|v| v.get("target").is_some()) {
        bail!(
            "{}: the manifest names a target; a rollout binds it to each device itself: remove `target`",
            args.file.display()
        );
    }
    let deployment = match manifest::parse(&bytes) {
        Ok(d) => d,
        Err(e) => {
            println!(
                "{}: no rollout, the manifest is invalid",
                args.file.display()
            );
            print!("{}", issue_lines(&e.issues()));
            return Ok(EXIT_REFUSED);
        }
    };
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-v{}", deployment.id, deployment.version));
    if !is_level(&id) {
        bail!("--id `{id}` is not a valid name: 1 to 128 letters, digits, `.`, `_` or `-`");
    }
    if args.canary == 0 {
        bail!("--canary must be at least 1: the first wave is what protects the fleet");
    }
    if !(args.growth >= 1.0 && args.growth <= 100.0) {
        bail!(
            "--growth {} must be from 1 (a fixed rate) to 100",
            args.growth
        );
    }
    let selectors = parse_selectors(&args.select)?;
    for d in &args.devices {
        if !is_level(d) || d == "groups" || d.starts_with('_') {
            bail!("--devices: `{d}` is not a valid device id");
        }
    }
    if let Some(g) = &args.group
        && !is_level(g)
    {
        bail!("--group `{g}` is not a valid group name");
    }
    // What the hub knows: every device's state, presence and own deployment, and whether the
    // rollout's name is taken.
    let messages = op
        .snapshot(
            &[
                format!("{prefix}/+/state"),
                format!("{prefix}/+/presence"),
                format!("{prefix}/+/deployment"),
                store::state_topic(&prefix, &id),
            ],
            Duration::from_secs(30),
        )
        .await?;
    if let Some(m) = messages
        .iter()
        .find(|m| m.topic == store::state_topic(&prefix, &id) && !m.payload.is_empty())
    {
        let status = store::parse_record(m)
            .map(|r| r.status.name().to_string())
            .unwrap_or_else(|_| "unreadable".into());
        eprintln!(
            "a rollout named {id} already exists ({status}); choose another --id, or `outpost-ctl rollout forget {id}`"
        );
        return Ok(EXIT_REFUSED);
    }
    let mut views: BTreeMap<String, DeviceView> = BTreeMap::new();
    fold(&prefix, &messages, &mut views);
    let mut previous: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for m in &messages {
        if let Some(d) = topics::device_of(&prefix, &m.topic, "deployment") {
            previous.insert(d.to_string(), m.payload.clone());
        }
    }
    // The devices.
    let mut chosen: Vec<String> = if args.devices.is_empty() {
        views.keys().cloned().collect()
    } else {
        let mut list = args.devices.clone();
        list.sort();
        list.dedup();
        list
    };
    let unknown: Vec<String> = chosen
        .iter()
        .filter(|d| !views.contains_key(*d))
        .cloned()
        .collect();
    chosen.retain(|d| {
        let view = views.get(d).cloned().unwrap_or_else(|| DeviceView {
            device: d.clone(),
            ..Default::default()
        });
        args.group
            .as_ref()
            .is_none_or(|g| matches(&view, "group", g))
            && selectors.iter().all(|(k, v)| matches(&view, k, v))
    });
    if chosen.is_empty() {
        eprintln!(
            "no device matches (of {} known to this hub); nothing to roll out",
            views.len()
        );
        return Ok(EXIT_REFUSED);
    }
    for d in unknown.iter().filter(|d| chosen.contains(d)) {
        eprintln!(
            "{d}: not known to this hub (no presence); it gets the deployment when it connects"
        );
    }
    // Online devices first: the canary must be devices that answer.
    let online = |d: &String| views.get(d).and_then(DeviceView::online) == Some(true);
    chosen.sort_by_key(|d| !online(d));
    // Devices that would refuse the version (the version rule is per device).
    let mut conflicts = Vec::new();
    for d in &chosen {
        let in_force = views
            .get(d)
            .and_then(|v| v.state.as_ref())
            .and_then(|s| s.deployment.as_ref())
            .map(|d| d.version);
        let own = previous
            .get(d)
            .and_then(|p| describe_deployment(p))
            .map(|(_, v, _)| v);
        if let Some(v) = in_force.into_iter().chain(own).max()
            && v >= deployment.version
        {
            conflicts.push(format!("{d} (at version {v})"));
        }
    }
    if !conflicts.is_empty() {
        eprintln!(
            "{} device(s) already have version {} or newer and would refuse it: {}{}",
            conflicts.len(),
            deployment.version,
            conflicts
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if conflicts.len() > 10 { ", ..." } else { "" }
        );
        eprintln!(
            "give the manifest a higher version (a rollback is a newer version carrying the old content)"
        );
        return Ok(EXIT_REFUSED);
    }
    // What each device is sent, signed now, kept on the hub.
    let signer = Signer {
        key: match &args.sign_key {
            Some(k) => Some(signing::load_signing_key(k)?),
            None => None,
        },
        expires_in: args.expires_in,
        now_ms: wall_ms(),
    };
    let policy = Policy {
        canary: args.canary,
        wave_size: args.wave_size.unwrap_or(args.canary * 2).max(1),
        growth: args.growth,
        max_wave: args.max_wave,
        max_failures: args.max_failures,
        min_devices: args.min_devices.max(1),
        device_timeout_secs: args.device_timeout.max(1),
        bake_secs: args.bake,
        revert_on_abort: args.revert_on_abort,
    };
    let waves = plan::waves(&chosen, &policy);
    let mut staged = BTreeMap::new();
    let mut devices = BTreeMap::new();
    for (w, wave) in waves.iter().enumerate() {
        for d in wave {
            let deployment_msg = stage::for_device(&bytes, d, &signer)?;
            let revert = stage::revert(
                previous.get(d).map(Vec::as_slice),
                d,
                deployment.version,
                &signer,
            )?;
            devices.insert(
                d.clone(),
                DeviceRecord {
                    wave: w,
                    status: DeviceStatus::Pending,
                    digest: deployment_msg.digest.clone().unwrap_or_default(),
                    revert_digest: None,
                    sent_at: None,
                    settled_at: None,
                    reason: None,
                },
            );
            staged.insert(
                d.clone(),
                Staged {
                    deployment: deployment_msg,
                    revert,
                },
            );
        }
    }
    let now = outpost_core::time::unix_now();
    let record = Record {
        id: id.clone(),
        deployment: deployment.id.clone(),
        version: deployment.version,
        status: if args.no_run {
            Status::Paused
        } else {
            Status::Running
        },
        reason: args
            .no_run
            .then(|| "prepared with --no-run; `outpost-ctl rollout resume` runs it".into()),
        policy: policy.clone(),
        created_at: now,
        updated_at: now,
        owner: None,
        current_wave: 0,
        waves: waves
            .iter()
            .map(|w| Wave {
                devices: w.clone(),
                started_at: None,
                finished_at: None,
            })
            .collect(),
        devices,
    };
    let encoded = store::encode(&record)?;
    let mut inbox = Vec::new();
    for (d, s) in &staged {
        op.publish_collecting(
            &store::device_topic(&prefix, &id, d),
            true,
            serde_json::to_vec(s)?,
            &mut inbox,
        )
        .await?;
    }
    op.publish_collecting(&store::state_topic(&prefix, &id), true, encoded, &mut inbox)
        .await?;
    op.fence(Duration::from_secs(30)).await?;
    let sizes: Vec<String> = waves.iter().map(|w| w.len().to_string()).collect();
    eprintln!(
        "[{id}] rollout of {} v{} to {} devices in {} waves ({}); {}",
        deployment.id,
        deployment.version,
        chosen.len(),
        waves.len(),
        sizes.join(", "),
        policy.summary()
    );
    if args.no_run {
        eprintln!("[{id}] stored on the hub; `outpost-ctl rollout resume {id}` runs it");
        return Ok(0);
    }
    let mut runner = Runner::new(op, record, staged);
    let code = runner.drive(stop).await?;
    runner.flush().await?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_core::state::{AgentFacts, ReportedState};
    use outpost_core::wire::presence::Presence;

    fn view(arch: &str, version: &str, groups: &[&str], online: bool) -> DeviceView {
        let mut agent = AgentFacts::local(0);
        agent.arch = arch.into();
        agent.version = version.into();
        DeviceView {
            device: "d".into(),
            presence: Some(Presence {
                online,
                since: None,
                agent_version: Some(version.into()),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            }),
            state: Some(ReportedState {
                device_id: "d".into(),
                deployment: None,
                last_rejected: None,
                last_good: None,
                modules: Default::default(),
                agent,
                conditions: vec![],
            }),
            unreadable: None,
        }
    }

    #[test]
    fn selectors_match_what_devices_report() {
        let v = view("aarch64", "0.3.0", &["line-3"], true);
        assert!(matches(&v, "arch", "aarch64"));
        assert!(!matches(&v, "arch", "x86_64"));
        assert!(matches(&v, "agentVersion", "0.3.0"));
        assert!(matches(&v, "group", "line-3"));
        assert!(!matches(&v, "group", "line-4"));
        assert!(matches(&v, "online", "true"));
        assert!(!matches(
            &view("aarch64", "0.3.0", &[], false),
            "online",
            "true"
        ));
        // A device that never reported its state matches nothing about it.
        let bare = DeviceView {
            device: "d".into(),
            ..Default::default()
        };
        assert!(!matches(&bare, "arch", "aarch64"));
    }

    #[test]
    fn selectors_are_checked_before_anything_is_sent() {
        assert_eq!(
            parse_selectors(&["arch=aarch64".into(), " agentVersion = 0.3.0 ".into()]).unwrap(),
            vec![
                ("arch".to_string(), "aarch64".to_string()),
                ("agentVersion".to_string(), "0.3.0".to_string())
            ]
        );
        let e = parse_selectors(&["colour=red".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `colour`") && e.contains("arch"),
            "{e}"
        );
        assert!(parse_selectors(&["arch".into()]).is_err());
    }
}
