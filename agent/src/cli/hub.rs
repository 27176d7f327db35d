//! `outpost hub ...`: the operator's commands. They connect with their own settings (flags or
//! `OUTPOST_HUB_*` variables; without `--hub`, the `[hub]` section of the device configuration),
//! do one thing and print it, as a table or with `--json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{EXIT_REFUSED, Output, load_config, print_issues, read};
use crate::hub::link::{Password, Settings};
use crate::hub::operator::{
    self, DeviceView, Message, Operator, Progress, Target, describe_deployment, fold,
    group_summary, progress, source_name, status_name,
};
use crate::hub::tls::TlsFiles;
use crate::hub::topics::{self, is_level};
use crate::intake::hex_sha256;
use crate::manifest;
use crate::signing;
use crate::state::ReportedState;

/// Exit code when the answer did not come in time (sysexits' EX_TEMPFAIL).
pub const EXIT_TIMEOUT: u8 = 75;
/// Exit code when the hub cannot be reached or refuses us (sysexits' EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// How the operator reaches the hub.
#[derive(Debug, Args)]
pub struct HubConnection {
    /// Hub URL: `mqtts://host:8883` (or `mqtt://` on loopback). Without it, the `[hub]` section
    /// of the device configuration (--config) is used.
    #[arg(long = "hub", env = "OUTPOST_HUB_URL", global = true)]
    pub url: Option<String>,
    /// CA certificate (PEM) that signs the broker's certificate; default: the system's roots.
    #[arg(long, env = "OUTPOST_HUB_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "OUTPOST_HUB_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "OUTPOST_HUB_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// User name, with --password-file.
    #[arg(
        long,
        env = "OUTPOST_HUB_USERNAME",
        global = true,
        requires = "password_file"
    )]
    pub username: Option<String>,
    /// File holding the password (never passed on the command line).
    #[arg(
        long,
        env = "OUTPOST_HUB_PASSWORD_FILE",
        global = true,
        requires = "username"
    )]
    pub password_file: Option<PathBuf>,
    /// Topic prefix of the fleet.
    #[arg(long, env = "OUTPOST_HUB_PREFIX", global = true)]
    pub prefix: Option<String>,
    /// Allow plaintext `mqtt://` to a host that is not loopback.
    #[arg(long, global = true)]
    pub allow_insecure: bool,
    /// Seconds to wait for the broker to accept the connection.
    #[arg(long, default_value_t = 10, global = true)]
    pub connect_timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Publish a deployment (retained) to a device or a group, then show its progress until it
    /// is applied, fails or the timeout passes. Exit code: 0 applied, 1 failed or rejected,
    /// 75 timeout, 69 hub unreachable.
    Deploy {
        /// The manifest (or a signed envelope from `outpost manifest sign`).
        file: PathBuf,
        /// The device whose own deployment this is.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        device: Option<String>,
        /// The group whose deployment this is (every device following it).
        #[arg(long)]
        group: Option<String>,
        /// Sign the manifest with this private key before publishing. The signature binds the
        /// manifest to its target (the device or group) and an expiry, unless it names them.
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// How long the signature is accepted by devices (`30d`, `12h`): an old envelope
        /// cannot be replayed after it. A deployment in force keeps running past it.
        #[arg(long, default_value = "30d", value_parser = parse_expiry)]
        expires_in: Duration,
        /// Seconds to wait for the device(s) to settle.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Publish and return without waiting.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Devices from their retained state and presence, as a table; with --group, how many of
    /// the group's devices applied its deployment, failed, or are offline.
    Status {
        /// Only this device.
        #[arg(long, conflicts_with = "group")]
        device: Option<String>,
        /// Count the members of this group and their progress on its deployment.
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Print state and presence changes as they happen (Ctrl-C ends).
    Watch {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        output: Output,
    },
    /// Print a device's telemetry as it arrives, one record a line, duplicates (by record id)
    /// left out; the `metrics` stream as a summary line per snapshot (Ctrl-C ends).
    Telemetry {
        /// The device.
        #[arg(long)]
        device: String,
        /// Only this stream (e.g. `metrics`, or a route's `$upstream/STREAM`).
        #[arg(long)]
        stream: Option<String>,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        output: Output,
    },
    /// Withdraw a device's or a group's deployment: the device falls back to its group's
    /// deployment (or keeps what runs). On devices that trust keys it must be signed; unsigned
    /// withdrawals (an empty retained message) are refused there.
    Withdraw {
        /// The device whose own deployment is withdrawn.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        device: Option<String>,
        /// The group whose deployment is withdrawn.
        #[arg(long)]
        group: Option<String>,
        /// Sign the withdrawal with this private key.
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// The version withdrawn (default: the version of the deployment retained now).
        #[arg(long)]
        version: Option<u64>,
        /// How long the signed withdrawal is accepted.
        #[arg(long, default_value = "30d", value_parser = parse_expiry)]
        expires_in: Duration,
    },
    /// Send a command (restart-module, logs, ping, state) and print the device's answer.
    Cmd {
        /// The device to ask.
        #[arg(long)]
        device: String,
        /// The command's name.
        name: String,
        /// Arguments as JSON, e.g. '{"module": "infer", "tail": 50}'.
        #[arg(long)]
        args: Option<String>,
        /// Sign the command (devices that trust keys carry out only signed commands).
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// How long the signed command is valid (at most an hour; devices refuse more).
        #[arg(long, default_value = "5m", value_parser = parse_expiry)]
        expires_in: Duration,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[command(flatten)]
        output: Output,
    },
}

/// Runs a hub command on a runtime of its own; returns the exit code.
pub fn run(config_path: &Path, conn: &HubConnection, command: HubCommand) -> Result<u8> {
    crate::hub::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (settings, prefix) = settings(config_path, conn)?;
        let timeout = Duration::from_secs(conn.connect_timeout);
        let op = match Operator::connect(&settings, &prefix, timeout).await {
            Ok(op) => op,
            Err(e) => {
                eprintln!(
                    "error: cannot connect to the hub at {}:{}: {e}",
                    settings.host, settings.port
                );
                return Ok(EXIT_UNAVAILABLE);
            }
        };
        match command {
            HubCommand::Deploy {
                file,
                device,
                group,
                sign_key,
                expires_in,
                timeout,
                no_wait,
                output,
            } => {
                let target = target_of(device, group)?;
                deploy(
                    op,
                    target,
                    &file,
                    sign_key.as_deref().map(|k| (k, expires_in)),
                    Duration::from_secs(timeout),
                    no_wait,
                    output.json,
                )
                .await
            }
            HubCommand::Withdraw {
                device,
                group,
                sign_key,
                version,
                expires_in,
            } => {
                let target = target_of(device, group)?;
                withdraw(op, target, sign_key.as_deref(), version, expires_in).await
            }
            HubCommand::Status {
                device,
                group,
                output,
            } => match group {
                Some(g) => group_status(op, &g, output.json).await,
                None => status(op, device.as_deref(), output.json).await,
            },
            HubCommand::Watch {
                device,
                count,
                output,
            } => watch(op, device.as_deref(), count, output.json).await,
            HubCommand::Telemetry {
                device,
                stream,
                count,
                output,
            } => telemetry(op, &device, stream.as_deref(), count, output.json).await,
            HubCommand::Cmd {
                device,
                name,
                args,
                sign_key,
                expires_in,
                timeout,
                output,
            } => {
                cmd(
                    op,
                    &device,
                    &name,
                    args.as_deref(),
                    sign_key.as_deref().map(|k| (k, expires_in)),
                    Duration::from_secs(timeout),
                    output.json,
                )
                .await
            }
        }
    })
}

/// The connection settings: from the flags when `--hub` is given, else from the device
/// configuration's `[hub]` section (so the CLI works on a device without repeating it).
fn settings(config_path: &Path, conn: &HubConnection) -> Result<(Settings, String)> {
    let client_id = "outpost-operator".to_string();
    let Some(text) = &conn.url else {
        let config = load_config(config_path)?;
        let hub = config.hub.as_ref().with_context(|| {
            format!(
                "no --hub given and {} has no [hub] section",
                config_path.display()
            )
        })?;
        let mut settings = Settings::from_hub_config(hub, &config.device_id)?;
        settings.client_id = client_id;
        let prefix = conn
            .prefix
            .clone()
            .unwrap_or_else(|| hub.topic_prefix.clone());
        return Ok((settings, prefix));
    };
    let url = url::Url::parse(text).with_context(|| format!("--hub `{text}` is not a URL"))?;
    let tls = match url.scheme() {
        "mqtts" => true,
        "mqtt" => false,
        other => {
            bail!("--hub: scheme `{other}` is not supported; use mqtts:// (or mqtt:// on loopback)")
        }
    };
    let host = url
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_string())
        .with_context(|| format!("--hub `{text}` names no host"))?;
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !tls && !loopback && !conn.allow_insecure {
        bail!(
            "--hub `{text}` is plaintext MQTT to a remote host; use mqtts:// or pass --allow-insecure"
        );
    }
    if !tls && (conn.cert.is_some() || conn.ca.is_some()) {
        bail!("--ca and --cert need an mqtts:// hub URL");
    }
    let credentials = match (&conn.username, &conn.password_file) {
        (Some(u), Some(f)) => Some((u.clone(), Password::read(f)?)),
        _ => None,
    };
    let settings = Settings {
        client_id,
        port: url.port().unwrap_or(if tls { 8883 } else { 1883 }),
        host,
        tls: tls.then(|| TlsFiles {
            ca_file: conn.ca.clone(),
            client_auth: conn.cert.clone().zip(conn.key.clone()),
            ca_setting: "--ca",
        }),
        credentials,
        keep_alive: Duration::from_secs(30),
        reconnect_min: Duration::from_millis(250),
        reconnect_max: Duration::from_secs(5),
    };
    let prefix = conn.prefix.clone().unwrap_or_else(|| "outpost".into());
    Ok((settings, prefix))
}

/// What `deploy` publishes: the bytes on the wire, the manifest inside, its id and version.
type Prepared = (Vec<u8>, Vec<u8>, String, u64);

/// Reads the file to publish; an invalid manifest comes back as its issues.
/// `--device` or `--group` (clap requires one of the two).
fn target_of(device: Option<String>, group: Option<String>) -> Result<Target> {
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
    crate::binding::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a duration such as 30d, 12h, 90m or 45s"))
}

fn wall_ms() -> u64 {
    crate::hub::unix_now().saturating_mul(1000)
}

/// Publishes a withdrawal of `target`'s deployment: signed (with the version it withdraws), or
/// an empty retained message without a key.
async fn withdraw(
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
    let withdrawal = crate::binding::Withdrawal {
        withdraw: manifest_target(&target),
        version,
        expires_at: crate::binding::expiry_after(wall_ms(), expires_in),
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

fn prepare(
    file: &Path,
    sign: Option<(&Path, Duration)>,
    target: &Target,
) -> Result<Result<Prepared, Vec<manifest::Issue>>> {
    let bytes = read(file)?;
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
        let bytes = crate::binding::bind(
            &bytes,
            Some(&manifest_target(target)),
            &crate::binding::expiry_after(wall_ms(), expires_in),
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
    let expires_ms = crate::clock::parse_rfc3339(expires?.as_str()?)?.checked_mul(1000)?;
    (theirs == mine && expires_ms > now_ms.saturating_add(3_600_000)).then_some(payload)
}

async fn deploy(
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
            print_issues(&issues);
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

fn reasons(p: &Progress) -> Vec<manifest::Issue> {
    match p {
        Progress::Failed(_, r) | Progress::Rejected(r) => r.clone(),
        _ => Vec::new(),
    }
}

async fn fleet(op: &mut Operator, device: Option<&str>) -> Result<BTreeMap<String, DeviceView>> {
    let prefix = op.prefix().to_string();
    let who = device.unwrap_or("+");
    if device.is_some_and(|d| !is_level(d)) {
        bail!("--device `{who}` is not a valid device id");
    }
    let messages: Vec<Message> = op
        .snapshot(
            &[
                topics::device_topic(&prefix, who, "state"),
                topics::device_topic(&prefix, who, "presence"),
            ],
            Duration::from_secs(10),
        )
        .await?;
    let mut views = BTreeMap::new();
    fold(&prefix, &messages, &mut views);
    Ok(views)
}

fn row(v: &DeviceView) -> Value {
    let s = v.state.as_ref();
    let d = s.and_then(|s| s.deployment.as_ref());
    json!({
        "device": v.device,
        "online": v.online(),
        "groups": v.presence.as_ref().map(|p| p.groups.clone()).unwrap_or_default(),
        "deployment": d.map(|d| json!({"id": d.id, "version": d.version, "status": status_name(d.status), "source": source_name(&d.source)})),
        "modules": s.map(|s| s.modules.len()),
        "running": s.map(|s| s.modules.values().filter(|m| m.status == crate::state::ModuleStatus::Running).count()),
        "lastRejected": s.and_then(|s| s.last_rejected.as_ref()).map(|r| json!({"id": r.id, "version": r.version, "reasons": r.reasons})),
        "unreadable": v.unreadable,
    })
}

async fn status(mut op: Operator, device: Option<&str>, json_out: bool) -> Result<u8> {
    let views = fleet(&mut op, device).await?;
    if json_out {
        let rows: Vec<Value> = views.values().map(row).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if views.is_empty() {
        println!("no device has reported to this hub");
        return Ok(if device.is_some() { EXIT_REFUSED } else { 0 });
    }
    println!(
        "{:<24} {:<8} {:<28} {:<12} {:<14} {:<8} LAST REJECTED",
        "DEVICE", "ONLINE", "DEPLOYMENT", "STATUS", "SOURCE", "MODULES"
    );
    for v in views.values() {
        let s = v.state.as_ref();
        let d = s.and_then(|s| s.deployment.as_ref());
        let online = match v.online() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let modules = s
            .map(|s| {
                format!(
                    "{}/{}",
                    s.modules
                        .values()
                        .filter(|m| m.status == crate::state::ModuleStatus::Running)
                        .count(),
                    s.modules.len()
                )
            })
            .unwrap_or_else(|| "-".into());
        let rejected = s
            .and_then(|s| s.last_rejected.as_ref())
            .map(|r| {
                format!(
                    "{} v{}: {}",
                    r.id,
                    r.version,
                    r.reasons.first().map(|i| i.to_string()).unwrap_or_default()
                )
            })
            .or_else(|| v.unreadable.clone())
            .unwrap_or_default();
        println!(
            "{:<24} {:<8} {:<28} {:<12} {:<14} {:<8} {}",
            v.device,
            online,
            d.map(|d| format!("{} v{}", d.id, d.version))
                .unwrap_or_else(|| "-".into()),
            d.map(|d| status_name(d.status))
                .unwrap_or_else(|| "-".into()),
            d.map(|d| source_name(&d.source))
                .unwrap_or_else(|| "-".into()),
            modules,
            rejected
        );
    }
    Ok(0)
}

async fn group_status(mut op: Operator, group: &str, json_out: bool) -> Result<u8> {
    if !is_level(group) {
        bail!("--group `{group}` is not a valid group name");
    }
    let prefix = op.prefix().to_string();
    let deployment_msgs = op
        .snapshot(
            &[topics::group_deployment(&prefix, group)],
            Duration::from_secs(10),
        )
        .await?;
    let deployment = deployment_msgs
        .last()
        .and_then(|m| describe_deployment(&m.payload));
    let views = fleet(&mut op, None).await?;
    let summary = group_summary(group, deployment.clone(), &views);
    let applied = summary.count(|p| *p == Progress::Applied);
    let failed = summary.count(|p| matches!(p, Progress::Failed(..) | Progress::Rejected(_)));
    let overridden = summary.count(|p| matches!(p, Progress::Overridden(_)));
    let pending = summary.count(|p| !p.is_final());
    let offline = summary.offline();
    if json_out {
        let members: Vec<Value> = summary
            .members
            .iter()
            .map(|(d, online, p)| json!({"device": d, "online": online, "progress": p.label(), "reasons": reasons(p)}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "group": group,
                "deployment": deployment.as_ref().map(|(id, v, digest)| json!({"id": id, "version": v, "digest": digest})),
                "devices": summary.members.len(),
                "applied": applied, "failed": failed, "overridden": overridden, "pending": pending, "offline": offline,
                "members": members,
            }))?
        );
        return Ok(0);
    }
    match &deployment {
        Some((id, v, _)) => println!("group {group}: deployment {id} v{v}"),
        None => println!("group {group}: no deployment published"),
    }
    println!(
        "{} devices: {applied} applied, {failed} failed, {overridden} overridden, {pending} pending, {offline} offline",
        summary.members.len()
    );
    for (d, online, p) in &summary.members {
        println!(
            "  {d:<24} {:<8} {}",
            if *online == Some(true) {
                "online"
            } else {
                "offline"
            },
            p.label()
        );
    }
    Ok(0)
}

async fn telemetry(
    mut op: Operator,
    device: &str,
    stream: Option<&str>,
    count: Option<usize>,
    json_out: bool,
) -> Result<u8> {
    if !is_level(device) || stream.is_some_and(|s| !is_level(s)) {
        bail!("--device and --stream must be one topic level each (no `/`, `+` or `#`)");
    }
    let prefix = op.prefix().to_string();
    let leaf = format!("telemetry/{}", stream.unwrap_or("+"));
    op.subscribe(&[topics::device_topic(&prefix, device, &leaf)])
        .await?;
    let mut seen = std::collections::HashSet::new();
    let mut printed = 0usize;
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            m = op.recv_until(far) => m?,
        };
        let Some(m) = message else { continue };
        let batch: crate::telemetry::upstream::ReceivedBatch =
            match serde_json::from_slice(&m.payload) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: not a telemetry batch ({e}); skipped", m.topic);
                    continue;
                }
            };
        for r in batch.records {
            if !seen.insert(r.id) {
                continue;
            }
            if json_out {
                println!(
                    "{}",
                    json!({"stream": batch.stream, "id": r.id, "ts": r.ts, "topic": r.topic,
                           "body": r.body, "bodyBase64": r.body_base64})
                );
            } else if batch.stream == crate::telemetry::collector::STREAM
                && let Some(body) = &r.body
            {
                println!("{}", metrics_line(body));
            } else {
                let body = match (&r.body, &r.body_base64) {
                    (Some(b), _) => b.to_string(),
                    (None, Some(b64)) => format!("base64:{b64}"),
                    (None, None) => String::new(),
                };
                println!("{} #{} {} {body}", batch.stream, r.id, r.topic);
            }
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(0);
            }
        }
    }
}

/// One metrics snapshot as a line an operator reads at a glance.
fn metrics_line(m: &Value) -> String {
    let gib = |v: &Value| v.as_f64().map(|b| b / (1u64 << 30) as f64);
    let d = &m["device"];
    let a = &m["agent"];
    let mut parts = Vec::new();
    if let Some(cpu) = d["cpuPercent"].as_f64() {
        parts.push(format!("cpu {cpu:.0}%"));
    }
    if let (Some(avail), Some(total)) =
        (gib(&d["memoryAvailableBytes"]), gib(&d["memoryTotalBytes"]))
    {
        parts.push(format!("mem {:.1}/{total:.1} GiB used", total - avail));
    }
    if let (Some(avail), Some(total)) = (gib(&d["diskAvailableBytes"]), gib(&d["diskTotalBytes"])) {
        parts.push(format!("disk {avail:.1} GiB free of {total:.1}"));
    }
    if let Some(t) = d["temperatureCelsius"].as_f64() {
        parts.push(format!("{t:.0}°C"));
    }
    let dropped: u64 = a["droppedTotal"]
        .as_object()
        .map(|o| o.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    parts.push(format!(
        "outbox {} records, {dropped} dropped",
        a["outboxRecords"].as_u64().unwrap_or(0)
    ));
    let modules: Vec<String> = m["modules"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(name, v)| {
                    let mut s = format!("{name} {}", v["status"].as_str().unwrap_or("?"));
                    if let Some(cpu) = v["cpuPercent"].as_f64() {
                        s.push_str(&format!(" {cpu:.0}%"));
                    }
                    if let Some(mem) = v["memoryBytes"].as_f64() {
                        s.push_str(&format!(" {:.0} MiB", mem / (1u64 << 20) as f64));
                    }
                    s
                })
                .collect()
        })
        .unwrap_or_default();
    if !modules.is_empty() {
        parts.push(format!("modules: {}", modules.join(", ")));
    }
    format!(
        "{} metrics: {}",
        m["deviceId"].as_str().unwrap_or("?"),
        parts.join(" · ")
    )
}

async fn watch(
    mut op: Operator,
    device: Option<&str>,
    count: Option<usize>,
    json_out: bool,
) -> Result<u8> {
    let prefix = op.prefix().to_string();
    let who = device.unwrap_or("+");
    op.subscribe(&[
        topics::device_topic(&prefix, who, "state"),
        topics::device_topic(&prefix, who, "presence"),
    ])
    .await?;
    let mut views = BTreeMap::new();
    let mut printed = 0usize;
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            m = op.recv_until(far) => m?,
        };
        let Some(m) = message else { continue };
        fold(&prefix, std::slice::from_ref(&m), &mut views);
        let Some(device) = topics::device_of(&prefix, &m.topic, "state")
            .or_else(|| topics::device_of(&prefix, &m.topic, "presence"))
        else {
            continue;
        };
        let Some(v) = views.get(device) else { continue };
        if json_out {
            println!(
                "{}",
                json!({"topic": m.topic, "retained": m.retain, "device": row(v)})
            );
        } else {
            let summary = v
                .state
                .as_ref()
                .and_then(|s: &ReportedState| s.deployment.as_ref())
                .map(|d| {
                    format!(
                        "{} v{} {} ({})",
                        d.id,
                        d.version,
                        status_name(d.status),
                        source_name(&d.source)
                    )
                })
                .unwrap_or_else(|| "no deployment".into());
            let online = match v.online() {
                Some(true) => "online",
                Some(false) => "offline",
                None => "presence unknown",
            };
            println!(
                "{device}: {online}, {summary}{}",
                if m.retain { " [retained]" } else { "" }
            );
        }
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            return Ok(0);
        }
    }
}

async fn cmd(
    mut op: Operator,
    device: &str,
    name: &str,
    args: Option<&str>,
    sign: Option<(&Path, Duration)>,
    timeout: Duration,
    json_out: bool,
) -> Result<u8> {
    if !is_level(device) || !is_level(name) {
        bail!("device and command names are 1 to 128 letters, digits, `.`, `_` or `-`");
    }
    let args: Value = match args {
        Some(text) => serde_json::from_str(text).context("--args is not JSON")?,
        None => Value::Null,
    };
    let prefix = op.prefix().to_string();
    let id = operator::request_id();
    let reply_topic = topics::device_topic(&prefix, device, &format!("responses/{id}"));
    op.subscribe(std::slice::from_ref(&reply_topic)).await?;
    op.fence(Duration::from_secs(10)).await?;
    let body = match sign {
        None => serde_json::to_vec(&json!({"id": id, "args": args}))?,
        Some((key, expires_in)) => {
            let signed = crate::hub::commands::SignedCommand {
                command: name.to_string(),
                device: device.to_string(),
                id: id.clone(),
                expires_at: crate::binding::expiry_after(wall_ms(), expires_in),
                args,
            };
            let key = signing::load_signing_key(key)?;
            let envelope =
                signing::sign_as(signing::COMMAND_TYPE, &serde_json::to_vec(&signed)?, &key);
            serde_json::to_vec(&envelope)?
        }
    };
    op.publish(
        &topics::device_topic(&prefix, device, &format!("commands/{name}")),
        false,
        body,
    )
    .await?;
    let deadline = Instant::now() + timeout;
    loop {
        let Some(m) = op.recv_until(deadline).await? else {
            eprintln!("no answer from {device} within {timeout:?} (is it online?)");
            return Ok(EXIT_TIMEOUT);
        };
        if m.topic != reply_topic {
            continue;
        }
        let reply: Value =
            serde_json::from_slice(&m.payload).context("the device's reply is not JSON")?;
        let ok = reply.get("ok").and_then(Value::as_bool).unwrap_or(false);
        if json_out {
            println!("{reply}");
        } else if ok {
            match reply.get("result") {
                Some(Value::Object(o)) if o.get("text").is_some_and(Value::is_string) => {
                    print!(
                        "{}",
                        o.get("text").and_then(Value::as_str).unwrap_or_default()
                    )
                }
                Some(result) => println!("{}", serde_json::to_string_pretty(result)?),
                None => println!("ok"),
            }
        } else {
            eprintln!(
                "{device} refused `{name}`: {}",
                reply
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            );
        }
        return Ok(if ok { 0 } else { EXIT_REFUSED });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_900_000_000_000;

    fn bound(expires_in: Duration, manifest: &[u8]) -> Vec<u8> {
        let target = Target::Device("cam-1".into());
        crate::binding::bind(
            manifest,
            Some(&manifest_target(&target)),
            &crate::binding::expiry_after(NOW_MS, expires_in),
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
