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
/// Exit code when the agent could not hand over to the launcher after staging an update
/// (sysexits' EX_TEMPFAIL): the unit restarts it, and the launcher takes over then.
pub const EXIT_HANDOVER: u8 = 75;

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
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
    /// Take a module's update lock: a new deployment that would replace, stop or remove it
    /// waits until `outpost unlock` or the deployment's lock deadline.
    Lock { module: String },
    /// Release a module's update lock.
    Unlock { module: String },
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
    /// See it all on this machine: a hub broker, an agent, a signed deployment of
    /// outpost-infer with a model, inferences, telemetry at the hub; Ctrl-C stops it all.
    Demo {
        /// Where the module runs: Docker when an engine answers, else a process.
        #[arg(long, value_enum, default_value = "auto")]
        runtime: crate::demo::DemoRuntime,
        /// Inference requests to send once the module serves.
        #[arg(long, default_value_t = 3)]
        requests: usize,
        /// Stop once the first telemetry reaches the hub (or, without one, once the
        /// inferences answered), instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
        /// No hub broker, even with Mosquitto installed: deploy through the local API (what
        /// happens anyway without Mosquitto).
        #[arg(long)]
        no_hub: bool,
    },
    /// Runs one start of a process module (the agent starts it; not for people).
    #[command(hide = true)]
    Shim {
        /// Start the shim detached and return at once.
        #[arg(long)]
        detach: bool,
        dir: PathBuf,
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
    use clap::{CommandFactory as _, FromArgMatches as _};
    // The version is the binary's stamp when it has one (outpost_core::version), so it is set
    // at run time rather than from the crate at build time.
    let parsed = Cli::command()
        .version(outpost_core::version::current())
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
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
        Command::Shim { detach: true, dir } => Ok(crate::runtime::process::shim::detach(&dir)),
        Command::Shim { detach: false, dir } => Ok(crate::runtime::process::shim::run(&dir)),
        Command::Demo {
            runtime,
            requests,
            once,
            no_hub,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(crate::demo::run(crate::demo::Options {
                runtime,
                requests,
                once,
                no_hub,
            })),
        Command::Run => {
            let config = load_config(&cli.config)?;
            // The configured level applies unless the command line or RUST_LOG said otherwise.
            if cli.log_level.is_none() && cli.log_format.is_none() {
                logging::init(config.log_format, &config.log_level);
            }
            // The arguments a binary started in this one's place gets: the same.
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            let role = match crate::update::launch::launch(&config, &args) {
                crate::update::launch::Next::Run(role) => role,
                crate::update::launch::Next::Stop => return Ok(0),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let result = runtime.block_on(async {
                let shutdown = tokio_util::sync::CancellationToken::new();
                tokio::spawn(crate::daemon::cancel_on_signal(shutdown.clone()));
                crate::daemon::run(config, role.clone(), shutdown).await
            });
            // Nothing of the agent may outlive the hand-over (the exec replaces the process,
            // threads included; the runtime's own stop comes first).
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            match result {
                Ok(crate::daemon::Exit::Stopped) => Ok(0),
                // On trial, the launcher (the parent) takes over once this process ends.
                Ok(crate::daemon::Exit::Handover) if role.trial => Ok(0),
                Ok(crate::daemon::Exit::Handover) => {
                    let e = crate::update::launch::exec_launcher(&role.launcher, &args);
                    // Only a failed exec comes back: the service manager restarts the agent,
                    // and the launcher it starts takes over.
                    tracing::error!(error = %e, "cannot hand over to the launcher; exiting for a restart");
                    Ok(EXIT_HANDOVER)
                }
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
        Command::Lock { module } => lock(&cli.config, module, true),
        Command::Unlock { module } => lock(&cli.config, module, false),
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

/// Pull progress on standard error: at a terminal, one line of bars redrawn in place; to a
/// file or pipe, plain lines — one per image at each tenth of its bytes and at each change of
/// a status without byte counts — so a log gets a dozen lines per image, not thousands.
struct PullView {
    tty: bool,
    /// Per image: status, bytes so far, total.
    images: std::collections::BTreeMap<String, (String, u64, u64)>,
    /// Per image: the last plain line's key (tenth or status).
    printed: std::collections::BTreeMap<String, String>,
    drawn: bool,
}

impl PullView {
    fn new() -> PullView {
        PullView {
            tty: crate::logging::colour_wanted(),
            images: Default::default(),
            printed: Default::default(),
            drawn: false,
        }
    }

    fn update(&mut self, image: String, status: String, current: u64, total: u64) {
        if self.tty {
            self.images.insert(image, (status, current, total));
            let line = self
                .images
                .iter()
                .map(|(image, (status, current, total))| bar(image, status, *current, *total))
                .collect::<Vec<_>>()
                .join("  ");
            eprint!("\r\x1b[K{line}");
            self.drawn = true;
        } else if let Some(line) = plain_line(&mut self.printed, &image, &status, current, total) {
            eprintln!("{line}");
        }
    }

    /// Ends the line of bars before anything else is printed.
    fn finish(&mut self) {
        if std::mem::take(&mut self.drawn) {
            eprintln!();
        }
    }
}

/// `name [#####-----]  42% 12.3/29.1 MB`, or `name: status` without byte counts.
fn bar(image: &str, status: &str, current: u64, total: u64) -> String {
    let name = image.rsplit('/').next().unwrap_or(image);
    if total == 0 {
        return format!("{name}: {status}");
    }
    let pct = (current.min(total) * 100 / total) as usize;
    let filled = pct / 10;
    format!(
        "{name} [{}{}] {pct:>3}% {:.1}/{:.1} MB",
        "#".repeat(filled),
        "-".repeat(10 - filled),
        current as f64 / 1e6,
        total as f64 / 1e6
    )
}

/// The plain line for this update, if it says something new (see [`PullView`]).
fn plain_line(
    printed: &mut std::collections::BTreeMap<String, String>,
    image: &str,
    status: &str,
    current: u64,
    total: u64,
) -> Option<String> {
    let (key, line) = if let Some(tenth) = (current.min(total) * 10).checked_div(total) {
        (
            format!("{tenth}"),
            format!(
                "  pulling {image}: {}% ({:.1}/{:.1} MB)",
                tenth * 10,
                current as f64 / 1e6,
                total as f64 / 1e6
            ),
        )
    } else {
        (status.to_string(), format!("  pulling {image}: {status}"))
    };
    if printed.get(image) == Some(&key) {
        return None;
    }
    printed.insert(image.to_string(), key);
    Some(line)
}

/// `outpost lock` / `outpost unlock` through the local API.
fn lock(config: &Path, module: String, hold: bool) -> Result<u8> {
    let config = load_config(config)?;
    let request = if hold {
        ApiRequest::Lock {
            module: module.clone(),
        }
    } else {
        ApiRequest::Unlock {
            module: module.clone(),
        }
    };
    let mut outcome = Ok(0);
    block_on(api::call(&config.api_socket, &request, |event| {
        if let ApiEvent::Error { message } = event {
            outcome = Err(anyhow::anyhow!(message));
        }
    }))?;
    if outcome.is_ok() {
        let what = if hold { "locked" } else { "unlocked" };
        println!("{module}: {what}");
    }
    outcome
}

fn local_deploy(socket: &Path, manifest: String, wait_secs: u64) -> Result<u8> {
    let mut code = EXIT_REFUSED;
    let mut view = PullView::new();
    let request = ApiRequest::Deploy {
        manifest,
        wait_secs,
    };
    block_on(api::call(socket, &request, |event| match event {
        ApiEvent::Accepted { id, version } => println!("accepted {id} v{version}; applying"),
        ApiEvent::Waiting { message } => {
            view.finish();
            println!("{message}");
        }
        ApiEvent::Rejected { issues } => {
            println!("rejected:");
            print!("{}", outpost_core::present::issue_lines(&issues));
        }
        ApiEvent::Progress {
            image,
            status,
            current,
            total,
        } => view.update(image, status, current, total),
        ApiEvent::Done { status, reasons } => {
            view.finish();
            println!("{status}");
            print!("{}", outpost_core::present::issue_lines(&reasons));
            code = if status == "applied" { 0 } else { EXIT_REFUSED };
        }
        ApiEvent::Error { message } => {
            view.finish();
            eprintln!("error: {message}");
        }
        _ => {}
    }))?;
    view.finish();
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
        if let Some(w) = &d.waiting {
            println!("  {}", w.message);
        }
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
    let a = &state.agent;
    let slot = a.slot.as_deref().unwrap_or("installed");
    match &a.update {
        Some(u) if !(u.version == a.version && u.phase == crate::state::UpdatePhase::Committed) => {
            let phase = serde_json::to_value(u.phase)?
                .as_str()
                .unwrap_or("?")
                .to_string();
            let bytes = match (u.downloaded_bytes, u.total_bytes) {
                (Some(d), Some(t)) if t > 0 => format!(" {}%", d * 100 / t),
                _ => String::new(),
            };
            println!(
                "agent {} (slot {slot}); update to {}: {phase}{bytes}{}",
                a.version,
                u.version,
                u.reason
                    .as_deref()
                    .map(|r| format!(" — {r}"))
                    .unwrap_or_default()
            );
        }
        _ => println!("agent {} (slot {slot})", a.version),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_progress_says_each_tenth_once() {
        let mut printed = Default::default();
        let mut lines = Vec::new();
        for current in (0..=100u64).map(|i| i * 1_000_000) {
            lines.extend(plain_line(
                &mut printed,
                "reg/app:1",
                "Downloading",
                current,
                100_000_000,
            ));
        }
        assert_eq!(lines.len(), 11, "{lines:#?}");
        assert_eq!(lines[4], "  pulling reg/app:1: 40% (40.0/100.0 MB)");
        assert!(plain_line(&mut printed, "reg/app:1", "Pull complete", 0, 0).is_some());
        assert!(plain_line(&mut printed, "reg/app:1", "Pull complete", 0, 0).is_none());
    }

    #[test]
    fn a_bar_fills_by_tenths() {
        assert_eq!(
            bar("127.0.0.1:5000/team/app:1", "Downloading", 42, 100),
            "app:1 [####------]  42% 0.0/0.0 MB"
        );
        assert_eq!(bar("app:1", "Waiting", 0, 0), "app:1: Waiting");
    }
}
