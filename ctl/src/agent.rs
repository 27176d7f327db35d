//! `outpost-ctl agent`: release tools for the agent's own updates. `stamp` writes a version
//! into a built agent (`outpost --version` prints it; docs/operations.md#updating-the-agent),
//! `artifact` prints the manifest's `agent` section for a built binary: its version (read
//! from the binary, whatever its architecture), SHA-256 and size.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use sha2::{Digest as _, Sha256};

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Write a copy of an agent binary that reports VERSION.
    Stamp {
        binary: PathBuf,
        /// `1.4.2`, `1.5.0-rc.1`.
        #[arg(long)]
        version: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the deployment's `agent` section for a built binary served at URL.
    Artifact {
        binary: PathBuf,
        /// Where devices fetch it: https://…, http://… or file:///….
        #[arg(long)]
        url: String,
        /// The platform it is built for (`linux/amd64`, `linux/arm64`, `linux/arm/v7`).
        #[arg(long)]
        platform: String,
        /// The version it reports, when it was not stamped (its crate version).
        #[arg(long)]
        version: Option<String>,
    },
}

pub fn run(c: AgentCommand) -> Result<u8> {
    match c {
        AgentCommand::Stamp {
            binary,
            version,
            out,
        } => {
            let mut bytes = read(&binary)?;
            outpost_core::version::stamp(&mut bytes, &version)
                .with_context(|| format!("cannot stamp {}", binary.display()))?;
            outpost_core::files::write_replace(&out, &bytes, 0o755)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("{} reports {version}", out.display());
            Ok(0)
        }
        AgentCommand::Artifact {
            binary,
            url,
            platform,
            version,
        } => {
            let bytes = read(&binary)?;
            let stamped = match outpost_core::version::read_stamp(&bytes) {
                Ok(s) => s,
                // A wrapper or another build: the device's self-test checks what it says.
                Err(outpost_core::version::StampError::NoRecord) if version.is_some() => {
                    eprintln!(
                        "warning: {} holds no version record; the device's self-test will check that it reports {}",
                        binary.display(),
                        version.as_deref().unwrap_or_default()
                    );
                    None
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot read the version of {}", binary.display())
                    });
                }
            };
            let version = match (stamped, version) {
                (Some(s), Some(v)) if s != v => {
                    bail!("{} reports {s}, not {v}", binary.display())
                }
                (Some(s), _) => s,
                (None, Some(v)) => v,
                (None, None) => bail!(
                    "{} is not stamped: pass --version (what its `--version` prints) or stamp it",
                    binary.display()
                ),
            };
            if let Err(e) = outpost_core::manifest::validate::check_artifact_url(&url) {
                bail!("--url: {e}");
            }
            if let Err(e) = outpost_core::platform::Platform::parse(&platform) {
                bail!("--platform: {e}");
            }
            let sha256: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let section = serde_json::json!({
                "version": version,
                "artifacts": { platform: { "url": url, "sha256": sha256, "size": bytes.len() } }
            });
            println!("{}", serde_json::to_string_pretty(&section)?);
            Ok(0)
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}
