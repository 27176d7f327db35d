//! `manifest` and `keys`: check, sign and verify deployment manifests offline, and create the
//! Ed25519 keys that sign them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Subcommand;
use outpost_core::intake::{self, Provenance};
use outpost_core::manifest;
use outpost_core::present::{issue_lines, read_input, validate_files};
use outpost_core::signing::{self, TrustedKeys};
use serde_json::json;

use crate::{EXIT_REFUSED, Output};

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
        /// Private key (PKCS#8 PEM) from `outpost-ctl keys generate`.
        #[arg(long)]
        key: PathBuf,
        /// Where to write the envelope; standard output when absent.
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Bind the manifest to its target before signing: `device:ID` or `group:NAME`
        /// (devices that trust keys require one).
        #[arg(long, value_parser = parse_target)]
        target: Option<manifest::Target>,
        /// How long devices accept the signature, when the manifest names no `expiresAt`.
        #[arg(long, default_value = "30d", value_parser = crate::deploy::parse_expiry)]
        expires_in: std::time::Duration,
    },
    /// Verify a signed manifest against trusted public keys, then validate it.
    Verify {
        file: PathBuf,
        /// Trusted public key (PEM); repeatable, at least one.
        #[arg(long = "trusted-key", required = true)]
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

/// Runs a `manifest` command.
pub fn run(command: ManifestCommand) -> Result<u8> {
    match command {
        ManifestCommand::Validate { files, output } => {
            let v = validate_files(&files);
            if output.json {
                println!("{}", serde_json::to_string_pretty(&v.json)?);
            } else {
                print!("{}", v.text);
            }
            Ok(if v.refused == 0 { 0 } else { EXIT_REFUSED })
        }
        ManifestCommand::Sign {
            file,
            key,
            out,
            target,
            expires_in,
        } => sign(&file, &key, out.as_deref(), target.as_ref(), expires_in),
        ManifestCommand::Verify {
            file,
            trusted_keys,
            output,
        } => verify(&file, &TrustedKeys::load(&trusted_keys)?, output.json),
        ManifestCommand::Schema => {
            print!("{}", manifest::schema::schema_text());
            Ok(0)
        }
    }
}

/// Runs a `keys` command.
pub fn keys(command: KeysCommand) -> Result<u8> {
    match command {
        KeysCommand::Generate { out } => {
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
    }
}

/// `--target device:ID` or `group:NAME`.
fn parse_target(text: &str) -> Result<manifest::Target, String> {
    match text.split_once(':') {
        Some(("device", id)) if manifest::validate::is_topic_level(id) => {
            Ok(manifest::Target::Device(id.to_string()))
        }
        Some(("group", name)) if manifest::validate::is_topic_level(name) => {
            Ok(manifest::Target::Group(name.to_string()))
        }
        _ => Err(format!(
            "`{text}` is not `device:ID` or `group:NAME` (letters, digits, `.`, `_`, `-`)"
        )),
    }
}

fn sign(
    file: &Path,
    key: &Path,
    out: Option<&Path>,
    target: Option<&manifest::Target>,
    expires_in: std::time::Duration,
) -> Result<u8> {
    let bytes = read_input(file).map_err(anyhow::Error::msg)?;
    let now_ms = outpost_core::time::wall_now_ms();
    let bytes = outpost_core::binding::bind(
        &bytes,
        target,
        &outpost_core::binding::expiry_after(now_ms, expires_in),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if let Err(e) = manifest::parse(&bytes) {
        println!("{}: not signed, the manifest is invalid", file.display());
        print!("{}", issue_lines(&e.issues()));
        return Ok(EXIT_REFUSED);
    }
    let key = signing::load_signing_key(key)?;
    let envelope = signing::sign(&bytes, &key);
    let mut text = serde_json::to_string_pretty(&envelope)?;
    text.push('\n');
    match out {
        Some(path) => {
            // Whole or not at all: a half-written envelope would be refused on the device.
            outpost_core::files::write_replace(path, text.as_bytes(), 0o644)
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
        anyhow::bail!("no trusted keys: pass --trusted-key PUB");
    }
    let bytes = read_input(file).map_err(anyhow::Error::msg)?;
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
                print!("{}", issue_lines(&issues));
            }
            Ok(EXIT_REFUSED)
        }
    }
}
