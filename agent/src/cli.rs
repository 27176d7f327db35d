//! The `outpost` command line: parsing, and the commands that run to completion (manifest and
//! key tools). This is the program's edge, so errors here are `anyhow` with context; the
//! binary maps the outcome to an exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::api::{self, ApiEvent, ApiRequest};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::logging::{self, LogFormat};
use crate::state::{ModuleStatus, ReportedState};

/// Exit code for a configuration error (sysexits' EX_CONFIG): the service unit tells systemd
/// not to restart on it, since restarting cannot fix a bad file.
pub const EXIT_CONFIG: u8 = 78;
/// Exit code when the command ran but its answer is "no" (invalid manifest, bad signature).
pub const EXIT_REFUSED: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
    version,
    about = "Outpost: deploy and run container modules on edge devices"
)]
pub struct Cli {
    /// Device configuration file.
    #[arg(long, global = true, env = "OUTPOST_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level or filter (overridden by RUST_LOG).
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the service's command): reconcile deployments, serve the local API.
    Run,
    /// Apply a manifest (or signed envelope) to the running agent, without a hub.
    Deploy {
        /// Required: this command talks to the agent on this device.
        #[arg(long, required = true)]
        local: bool,
        file: PathBuf,
        /// How long to wait for the deployment to be applied.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
    },
    /// Show this device's modules: a table of status, image, restarts and uptime.
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Show a module's logs.
    Logs {
        module: String,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// Keep streaming new lines.
        #[arg(long, short)]
        follow: bool,
        /// Only lines from the last N seconds.
        #[arg(long, value_name = "SECS")]
        since: Option<u64>,
    },
    /// Restart a module's container now.
    Restart { module: String },
    /// Check deployment manifests (signing and verifying is `outpost-ctl manifest`).
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Check the device configuration file and show what it resolves to.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check that this device can run: configuration, state directory, identity, hub (reach,
    /// TLS, MQTT, access rules), certificates, trusted keys, engine, log rotation, clock, bus.
    /// Exit code: 0 all ok, 1 a warning, 2 an error.
    Check {
        #[command(flatten)]
        output: Output,
    },
    /// Write a tar.gz for support: configuration (no secrets), check results, state, agent
    /// and module logs, engine facts.
    SupportBundle {
        /// Where to write it (default: outpost-support-DEVICE-TIME.tar.gz here).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Validate manifests (bare or in a signed envelope) and report every issue with its path.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration (file and OUTPOST__* variables) and print a summary.
    Check,
}

#[derive(Debug, Args)]
pub struct Output {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    crate::hub::install_crypto_provider();
    ExitCode::from(run_args(std::env::args_os()))
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
    // The daemon takes its level and format from the configuration unless the command line
    // names them; it sets up logging itself once the configuration is read.
    let from_config =
        matches!(cli.command, Command::Run) && cli.log_level.is_none() && cli.log_format.is_none();
    if !from_config {
        logging::init(
            cli.log_format.unwrap_or_default(),
            cli.log_level.as_deref().unwrap_or("info"),
        );
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = if e.downcast_ref::<ConfigError>().is_some() {
                EXIT_CONFIG
            } else {
                EXIT_REFUSED
            };
            eprintln!("error: {e:#}");
            code
        }
    }
}

fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Run => {
            let config = load_config(&cli.config)?;
            // The configured level applies unless the command line or RUST_LOG said otherwise.
            if cli.log_level.is_none() && cli.log_format.is_none() {
                logging::init(config.log_format, &config.log_level);
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let result = runtime.block_on(async {
                let shutdown = tokio_util::sync::CancellationToken::new();
                tokio::spawn(crate::daemon::cancel_on_signal(shutdown.clone()));
                crate::daemon::run(config, shutdown).await
            });
            match result {
                Ok(()) => Ok(0),
                Err(e) if e.is_configuration() => {
                    eprintln!("error: {e}");
                    Ok(EXIT_CONFIG)
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Deploy {
            local: _,
            file,
            wait_secs,
        } => {
            let config = load_config(&cli.config)?;
            let text = String::from_utf8(read(&file)?)
                .with_context(|| format!("{} is not UTF-8 text", file.display()))?;
            local_deploy(&config.api_socket, text, wait_secs)
        }
        Command::List { output } => {
            let config = load_config(&cli.config)?;
            list(&config.api_socket, output.json)
        }
        Command::Logs {
            module,
            tail,
            follow,
            since,
        } => {
            let config = load_config(&cli.config)?;
            let since = since.map(|s| outpost_core::time::unix_now().saturating_sub(s) as i64);
            let request = ApiRequest::Logs {
                module,
                tail,
                follow,
                since,
            };
            let mut failed = None;
            block_on(api::call(
                &config.api_socket,
                &request,
                |event| match event {
                    ApiEvent::Log { text } => print!("{text}"),
                    ApiEvent::Error { message } => failed = Some(message),
                    _ => {}
                },
            ))?;
            match failed {
                Some(message) => anyhow::bail!(message),
                None => Ok(0),
            }
        }
        Command::Restart { module } => {
            let config = load_config(&cli.config)?;
            let mut outcome = Ok(0);
            block_on(api::call(
                &config.api_socket,
                &ApiRequest::Restart {
                    module: module.clone(),
                },
                |event| {
                    if let ApiEvent::Error { message } = event {
                        outcome = Err(anyhow::anyhow!(message));
                    }
                },
            ))?;
            if outcome.is_ok() {
                println!("{module}: restarted");
            }
            outcome
        }
        Command::Manifest(ManifestCommand::Validate { files, output }) => {
            let v = outpost_core::present::validate_files(&files);
            if output.json {
                println!("{}", serde_json::to_string_pretty(&v.json)?);
            } else {
                print!("{}", v.text);
            }
            Ok(if v.refused == 0 { 0 } else { EXIT_REFUSED })
        }
        Command::Check { output } => {
            let report = block_on(crate::check::run(&cli.config, std::env::vars()));
            if output.json {
                println!("{}", serde_json::to_string_pretty(&report.json())?);
            } else {
                use std::io::IsTerminal as _;
                let color =
                    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
                print!("{}", report.human(color));
            }
            Ok(report.worst().exit_code())
        }
        Command::SupportBundle { out } => {
            let bundle = block_on(crate::support::from_cli(&cli.config, std::env::vars()));
            let out = out.unwrap_or_else(|| PathBuf::from(&bundle.file_name));
            crate::support::write_private(&out, &bundle.bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "wrote {} ({} bytes{})",
                out.display(),
                bundle.bytes.len(),
                if bundle.left_out.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; left out over the size cap: {}",
                        bundle.left_out.join(", ")
                    )
                }
            );
            Ok(0)
        }
        Command::Config(ConfigCommand::Check) => {
            let config = load_config(&cli.config)?;
            println!("{}: ok", config.source.display());
            match &config.provisioning {
                None => println!("  device_id     {}", config.device_id),
                Some(p) => {
                    let files = crate::provision::IdentityFiles::new(&config.state_dir);
                    match crate::provision::identity::load(&files) {
                        Ok(Some(id)) => println!("  device_id     {} (provisioned)", id.device_id),
                        Ok(None) => println!(
                            "  device_id     (given at first boot by the responder on {}:{}, prefix {})",
                            p.host, p.port, p.topic_prefix
                        ),
                        Err(e) => println!("  device_id     unknown: {e}"),
                    }
                }
            }
            println!("  state_dir     {}", config.state_dir.display());
            match &config.hub {
                Some(hub) => {
                    println!(
                        "  hub           {}:{} (tls: {})",
                        hub.host, hub.port, hub.tls
                    );
                    if !hub.failover.is_empty() {
                        let nodes: Vec<String> = hub
                            .failover
                            .iter()
                            .map(|(h, p)| format!("{h}:{p}"))
                            .collect();
                        println!("  failover      {}", nodes.join(", "));
                    }
                }
                None => println!("  hub           none (local deployments only)"),
            }
            println!("  trusted keys  {}", config.policy.trusted_keys.len());
            Ok(0)
        }
    }
}

fn load_config(path: &Path) -> Result<Config, ConfigError> {
    Config::load(path, std::env::vars())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    outpost_core::present::read_input(path).map_err(anyhow::Error::msg)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    // A current-thread runtime is all a one-shot client needs; building it cannot fail on
    // Linux short of the process being out of file descriptors.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
        .block_on(f)
}

fn local_deploy(socket: &Path, manifest: String, wait_secs: u64) -> Result<u8> {
    let mut code = EXIT_REFUSED;
    let mut last_line = String::new();
    let request = ApiRequest::Deploy {
        manifest,
        wait_secs,
    };
    block_on(api::call(socket, &request, |event| match event {
        ApiEvent::Accepted { id, version } => println!("accepted {id} v{version}; applying"),
        ApiEvent::Rejected { issues } => {
            println!("rejected:");
            print!("{}", outpost_core::present::issue_lines(&issues));
        }
        ApiEvent::Progress {
            image,
            status,
            current,
            total,
        } => {
            let line = if total > 0 {
                format!(
                    "  pulling {image}: {status} {:.1}/{:.1} MB",
                    current as f64 / 1e6,
                    total as f64 / 1e6
                )
            } else {
                format!("  pulling {image}: {status}")
            };
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
            }
        }
        ApiEvent::Done { status, reasons } => {
            println!("{status}");
            print!("{}", outpost_core::present::issue_lines(&reasons));
            code = if status == "applied" { 0 } else { EXIT_REFUSED };
        }
        ApiEvent::Error { message } => eprintln!("error: {message}"),
        _ => {}
    }))?;
    Ok(code)
}

fn list(socket: &Path, json: bool) -> Result<u8> {
    let mut state: Option<ReportedState> = None;
    block_on(api::call(socket, &ApiRequest::State, |event| {
        if let ApiEvent::State { state: s } = event {
            state = Some(*s);
        }
    }))?;
    let state = state.context("the agent sent no state")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(0);
    }
    match &state.deployment {
        Some(d) => println!(
            "deployment {} v{}: {}",
            d.id,
            d.version,
            serde_json::to_value(d.status)?.as_str().unwrap_or("?")
        ),
        None => println!("no deployment"),
    }
    if let Some(d) = &state.deployment {
        for r in &d.reasons {
            let at = if r.path.is_empty() {
                ""
            } else {
                r.path.as_str()
            };
            println!("  {at} {}", r.message);
        }
    }
    for c in &state.conditions {
        println!("! {}: {}", c.kind, c.message);
    }
    let now = outpost_core::time::unix_now();
    let rows: Vec<[String; 5]> = state
        .modules
        .iter()
        .map(|(name, m)| {
            let status = serde_json::to_value(m.status)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let uptime = match (m.status, m.started_at) {
                (ModuleStatus::Running | ModuleStatus::Unmanaged, Some(t)) => {
                    human_duration(now.saturating_sub(t))
                }
                _ => "-".into(),
            };
            [
                name.clone(),
                status,
                m.image.clone(),
                m.restart_count.to_string(),
                uptime,
            ]
        })
        .collect();
    print_table(&["MODULE", "STATUS", "IMAGE", "RESTARTS", "UPTIME"], &rows);
    for (name, m) in &state.modules {
        if let Some(e) = &m.last_error {
            println!("{name}: {e}");
        }
    }
    Ok(0)
}

/// Prints rows under a header, columns padded to their widest cell.
pub fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    print!("{}", outpost_core::present::table(header, rows));
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}
