//! The `outpost` command line: parsing, and the commands that run to completion (manifest and
//! key tools). This is the program's edge, so errors here are `anyhow` with context; the
//! binary maps the outcome to an exit code.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

pub mod hub;

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::intake::{self, Provenance};
use crate::logging::{self, LogFormat};
use crate::manifest::{self, Issue};
use crate::signing::{self, TrustedKeys};

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
    /// Check, sign and inspect deployment manifests.
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Create signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check the device configuration file and show what it resolves to.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The operator's side of the hub: deploy, status, watch, commands.
    Hub {
        #[command(flatten)]
        connection: Box<hub::HubConnection>,
        #[command(subcommand)]
        command: Box<hub::HubCommand>,
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
    /// Sign a manifest into a DSSE envelope. The manifest is validated first.
    Sign {
        file: PathBuf,
        /// Private key (PKCS#8 PEM) from `outpost keys generate`.
        #[arg(long)]
        key: PathBuf,
        /// Where to write the envelope; standard output when absent.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Verify a signed manifest against trusted public keys, then validate it.
    Verify {
        file: PathBuf,
        /// Trusted public key (PEM); repeatable. Without any, the config's policy.trusted_keys.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<PathBuf>,
        #[command(flatten)]
        output: Output,
    },
    /// Print the manifest's JSON Schema.
    Schema,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an Ed25519 key pair: PREFIX.key (private, mode 600) and PREFIX.pub.
    Generate {
        #[arg(long)]
        out: PathBuf,
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
    logging::init(
        cli.log_format.unwrap_or_default(),
        cli.log_level.as_deref().unwrap_or("info"),
    );
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = if e.downcast_ref::<ConfigError>().is_some() {
                EXIT_CONFIG
            } else if e.downcast_ref::<crate::hub::HubError>().is_some() {
                hub::EXIT_UNAVAILABLE
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
        Command::Hub {
            connection,
            command,
        } => hub::run(&cli.config, &connection, *command),
        Command::Manifest(ManifestCommand::Validate { files, output }) => {
            validate(&files, output.json)
        }
        Command::Manifest(ManifestCommand::Sign { file, key, out }) => {
            sign(&file, &key, out.as_deref())
        }
        Command::Manifest(ManifestCommand::Verify {
            file,
            trusted_keys,
            output,
        }) => {
            let trusted = if trusted_keys.is_empty() {
                load_config(&cli.config)?.policy.trusted_keys
            } else {
                TrustedKeys::load(&trusted_keys)?
            };
            verify(&file, &trusted, output.json)
        }
        Command::Manifest(ManifestCommand::Schema) => {
            print!("{}", manifest::schema::schema_text());
            Ok(0)
        }
        Command::Keys(KeysCommand::Generate { out }) => {
            let key = signing::generate_key()?;
            let (private, public) = signing::write_key_pair(&key, &out)?;
            println!("private key: {} (keep it secret)", private.display());
            println!(
                "public key:  {} (key id {})",
                public.display(),
                signing::key_id(&key.verifying_key())
            );
            Ok(0)
        }
        Command::Config(ConfigCommand::Check) => {
            let config = load_config(&cli.config)?;
            println!("{}: ok", config.source.display());
            println!("  device_id     {}", config.device_id);
            println!("  state_dir     {}", config.state_dir.display());
            match &config.hub {
                Some(hub) => println!(
                    "  hub           {}:{} (tls: {})",
                    hub.host, hub.port, hub.tls
                ),
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
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > intake::MAX_MESSAGE_BYTES as u64 {
        anyhow::bail!(
            "{} is {} bytes, over the {}-byte limit",
            path.display(),
            meta.len(),
            intake::MAX_MESSAGE_BYTES
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn validate(files: &[PathBuf], json: bool) -> Result<u8> {
    let mut reports = Vec::new();
    let mut refused = 0;
    for file in files {
        let outcome = read(file)
            .map_err(|e| vec![Issue::new("", format!("{e:#}"))])
            .and_then(|bytes| {
                intake::intake(&bytes, &TrustedKeys::default()).map_err(|e| e.issues())
            });
        match outcome {
            Ok(accepted) => {
                let d = &accepted.deployment;
                if json {
                    reports.push(json!({"file": file, "valid": true, "id": d.id, "version": d.version, "modules": d.modules.len()}));
                } else {
                    println!(
                        "{}: ok ({} v{}, {} module{})",
                        file.display(),
                        d.id,
                        d.version,
                        d.modules.len(),
                        if d.modules.len() == 1 { "" } else { "s" }
                    );
                }
            }
            Err(issues) => {
                refused += 1;
                if json {
                    reports.push(json!({"file": file, "valid": false, "issues": issues}));
                } else {
                    println!(
                        "{}: invalid ({} issue{})",
                        file.display(),
                        issues.len(),
                        if issues.len() == 1 { "" } else { "s" }
                    );
                    print_issues(&issues);
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(if refused == 0 { 0 } else { EXIT_REFUSED })
}

fn print_issues(issues: &[Issue]) {
    for issue in issues {
        let path = if issue.path.is_empty() {
            "(document)"
        } else {
            issue.path.as_str()
        };
        println!("  {path}: {}", issue.message);
    }
}

fn sign(file: &Path, key: &Path, out: Option<&Path>) -> Result<u8> {
    let bytes = read(file)?;
    if let Err(e) = manifest::parse(&bytes) {
        println!("{}: not signed, the manifest is invalid", file.display());
        print_issues(&e.issues());
        return Ok(EXIT_REFUSED);
    }
    let key = signing::load_signing_key(key)?;
    let envelope = signing::sign(&bytes, &key);
    let mut text = serde_json::to_string_pretty(&envelope)?;
    text.push('\n');
    match out {
        Some(path) => {
            std::fs::write(path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "signed {} with key {} -> {}",
                file.display(),
                envelope.signatures[0].keyid,
                path.display()
            );
        }
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(0)
}

fn verify(file: &Path, trusted: &TrustedKeys, json: bool) -> Result<u8> {
    if trusted.is_empty() {
        anyhow::bail!(
            "no trusted keys: pass --trusted-key PUB or set policy.trusted_keys in the configuration"
        );
    }
    let bytes = read(file)?;
    // A bare manifest is refused by intake as unsigned, since keys are trusted here.
    match intake::intake(&bytes, trusted) {
        Ok(accepted) => {
            let key = match &accepted.provenance {
                Provenance::Signed { key_id } => key_id.clone(),
                other => format!("{other:?}"),
            };
            let d = &accepted.deployment;
            if json {
                println!(
                    "{}",
                    json!({"file": file, "verified": true, "keyId": key, "id": d.id, "version": d.version, "digest": accepted.digest})
                );
            } else {
                println!(
                    "{}: verified, signed by key {key}; {} v{} is valid",
                    file.display(),
                    d.id,
                    d.version
                );
            }
            Ok(0)
        }
        Err(e) => {
            let issues = e.issues();
            if json {
                println!(
                    "{}",
                    json!({"file": file, "verified": false, "issues": issues})
                );
            } else {
                println!("{}: refused", file.display());
                print_issues(&issues);
            }
            Ok(EXIT_REFUSED)
        }
    }
}
