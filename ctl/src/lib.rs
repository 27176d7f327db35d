//! `outpost-ctl`, the operator's tool: deploy to devices and groups over the hub, follow
//! their status, telemetry and commands, and sign, verify and validate manifests and keys.
//! It speaks to the devices only through the hub (any MQTT broker), with the wire formats of
//! `outpost-core` and the connection of `outpost-mqtt`; it has no Unix-only code, so it builds
//! for the operator's laptop as well as for a device.

pub mod agent;
pub mod cmd;
pub mod connect;
pub mod deploy;
pub mod hub;
pub mod manifest;
pub mod provision;
pub mod rollout;
pub mod status;
pub mod telemetry;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use tokio_util::sync::CancellationToken;

use crate::connect::HubConnection;
use crate::deploy::parse_expiry;
use crate::hub::Operator;

/// Exit code when the command ran but its answer is "no" (failed, rejected, invalid).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code when the answer did not come in time (sysexits' EX_TEMPFAIL).
pub const EXIT_TIMEOUT: u8 = 75;
/// Exit code when the hub cannot be reached or refuses us (sysexits' EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "outpost-ctl",
    version,
    about = "Outpost's operator tool: deploy to edge devices over the hub and see what they report"
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: HubConnection,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Output {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish a deployment (retained) to a device or a group, then show its progress until it
    /// is applied, fails or the timeout passes. Exit code: 0 applied, 1 failed or rejected,
    /// 75 timeout, 69 hub unreachable.
    Deploy {
        /// The manifest (or a signed envelope from `outpost-ctl manifest sign`).
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
    /// Send a command (restart-module, logs, ping, state, support-bundle) and print the
    /// device's answer; `support-bundle` writes the bundle to --out after checking its digest.
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
        /// Where to write a file the device answers with (`support-bundle`).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        output: Output,
    },
    /// Roll a deployment out to a fleet in waves (canary first), aborting on failures; the
    /// rollout lives on the hub, so it can be watched, resumed, cancelled or reverted from any
    /// machine (see docs/hub.md#rollouts).
    #[command(subcommand)]
    Rollout(crate::rollout::RolloutCommand),
    /// Check, sign and verify deployment manifests, or print their JSON Schema.
    #[command(subcommand)]
    Manifest(crate::manifest::ManifestCommand),
    /// Create signing keys.
    #[command(subcommand)]
    Keys(crate::manifest::KeysCommand),
    /// Release tools for agent updates: stamp a build's version, print its `agent` section.
    #[command(subcommand)]
    Agent(crate::agent::AgentCommand),
    /// The provisioning responder: gives devices flashed from one image their own identity at
    /// first boot, and renews their certificates (see docs/provisioning.md).
    #[command(subcommand)]
    Provision(crate::provision::ProvisionCommand),
}

/// Parses `args` (the program name first) and runs the command; returns the exit code.
/// The binary's `main` and the end-to-end tests both come through here.
pub fn run_args<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code().clamp(0, 255) as u8;
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = if e.downcast_ref::<outpost_mqtt::HubError>().is_some() {
                EXIT_UNAVAILABLE
            } else {
                EXIT_REFUSED
            };
            eprintln!("error: {e:#}");
            code
        }
    }
}

/// SIGINT or SIGTERM (the responder runs as a service).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs a command: manifest and key tools directly, hub commands on a runtime of their own;
/// returns the exit code.
fn run(cli: Cli) -> Result<u8> {
    let command = match cli.command {
        Command::Manifest(c) => return crate::manifest::run(c),
        Command::Keys(c) => return crate::manifest::keys(c),
        Command::Agent(c) => return crate::agent::run(c),
        hub => hub,
    };
    let conn = &cli.connection;
    outpost_mqtt::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (settings, prefix) = connect::settings(conn)?;
        if let Command::Provision(crate::provision::ProvisionCommand::Serve(args)) = &command {
            // Logs are the responder's output: what it issued and refused, as it happens.
            use std::io::IsTerminal as _;
            let _ = tracing_subscriber::fmt()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .try_init();
            let stop = CancellationToken::new();
            let signal = stop.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                signal.cancel();
            });
            crate::provision::serve(settings, &prefix, args, stop).await?;
            return Ok(0);
        }
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
            Command::Deploy {
                file,
                device,
                group,
                sign_key,
                expires_in,
                timeout,
                no_wait,
                output,
            } => {
                let target = deploy::target_of(device, group)?;
                deploy::deploy(
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
            Command::Withdraw {
                device,
                group,
                sign_key,
                version,
                expires_in,
            } => {
                let target = deploy::target_of(device, group)?;
                deploy::withdraw(op, target, sign_key.as_deref(), version, expires_in).await
            }
            Command::Status {
                device,
                group,
                output,
            } => match group {
                Some(g) => status::group_status(op, &g, output.json).await,
                None => status::status(op, device.as_deref(), output.json).await,
            },
            Command::Watch {
                device,
                count,
                output,
            } => status::watch(op, device.as_deref(), count, output.json).await,
            Command::Telemetry {
                device,
                stream,
                count,
                output,
            } => telemetry::telemetry(op, &device, stream.as_deref(), count, output.json).await,
            Command::Cmd {
                device,
                name,
                args,
                sign_key,
                expires_in,
                timeout,
                out,
                output,
            } => {
                cmd::cmd(
                    op,
                    &device,
                    &name,
                    args.as_deref(),
                    sign_key.as_deref().map(|k| (k, expires_in)),
                    cmd::Answer {
                        timeout: Duration::from_secs(timeout),
                        out: out.as_deref(),
                        json: output.json,
                    },
                )
                .await
            }
            Command::Rollout(c) => rollout::run(op, c).await,
            Command::Manifest(_) | Command::Keys(_) | Command::Agent(_) | Command::Provision(_) => {
                unreachable!("handled before connecting")
            }
        }
    })
}
