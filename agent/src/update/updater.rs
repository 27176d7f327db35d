//! In the running agent: carries out the deployment's `agent` section. The new build is
//! fetched (resumable, capped, digest checked — [`crate::fetch`]), put in the free slot,
//! self-tested (`outpost --version` must print the version the deployment names), and only
//! then recorded as on trial; the agent hands over to the launcher, which runs the trial.
//! Until the record says "trial", nothing has changed for the device: a failure before that
//! leaves the running agent as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::record::{self, Build, Outcome, Paths, Record, Slot, Trial};
use super::{AgentStatus, Handover};
use crate::config::UpdateConfig;
use crate::fetch::{FetchError, Fetcher};
use crate::manifest::{AgentSpec, Artifact};
use crate::state::{AgentUpdate, UpdatePhase};

/// How long the new binary's `--version` may take.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(20);
/// First wait after a download that may succeed later, and the longest.
const RETRY_BASE: Duration = Duration::from_secs(5);
const RETRY_CAP: Duration = Duration::from_secs(600);

pub struct Context {
    pub paths: Paths,
    pub slot: Slot,
    /// The platform this build runs on (`linux/arm64`): the build the deployment must name.
    pub platform: String,
    pub config: UpdateConfig,
    /// Disk space a download must leave free.
    pub reserve: u64,
    /// The desired deployment's `agent` section.
    pub spec: watch::Receiver<Option<AgentSpec>>,
    pub status: watch::Sender<AgentStatus>,
    pub handover: Handover,
    /// The reported state: the hand-over waits for the deployment to settle and be reported.
    pub state: watch::Receiver<crate::state::ReportedState>,
}

/// How long the hand-over waits for a deployment still being applied.
const SETTLE_WITHIN: Duration = Duration::from_secs(120);
/// Time for the last state (the deployment's outcome, `switching`) to reach the hub before
/// the agent stops: several times the report's rate limit.
const REPORT_TIME: Duration = Duration::from_secs(1);

/// What to do about the desired agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing; the update to show (the last outcome, when it still concerns what is asked).
    Nothing(Option<AgentUpdate>),
    /// Fetch and switch to this build.
    Stage { version: String, artifact: Artifact },
}

fn shown(phase: UpdatePhase, version: &str, reason: Option<String>) -> Option<AgentUpdate> {
    Some(AgentUpdate {
        version: version.to_string(),
        phase,
        reason,
        downloaded_bytes: None,
        total_bytes: None,
    })
}

/// The decision, from the desired section, the record and this build.
pub fn plan(
    spec: Option<&AgentSpec>,
    record: &Record,
    running: &str,
    platform: &str,
    enabled: bool,
) -> Plan {
    let last = record.last.as_ref();
    let last_for = |v: &str| {
        last.filter(|o| o.version == v)
            .and_then(|o| shown(o.phase, &o.version, o.reason.clone()))
    };
    let Some(spec) = spec else {
        // No agent asked for: the agent stays; the last outcome is still worth showing.
        return Plan::Nothing(last.and_then(|o| shown(o.phase, &o.version, o.reason.clone())));
    };
    if spec.version == running {
        return Plan::Nothing(last_for(running));
    }
    if !enabled {
        return Plan::Nothing(shown(
            UpdatePhase::Skipped,
            &spec.version,
            Some(format!(
                "agent updates are disabled on this device (update.enabled = false); it stays at {running}"
            )),
        ));
    }
    let Some(artifact) = spec.artifacts.get(platform) else {
        let named: Vec<&str> = spec.artifacts.keys().map(String::as_str).collect();
        return Plan::Nothing(shown(
            UpdatePhase::Skipped,
            &spec.version,
            Some(format!(
                "the deployment has no build for this device's platform {platform} (it names {}); the agent stays at {running}",
                named.join(", ")
            )),
        ));
    };
    if record.is_refused(&spec.version) {
        let why = last_for(&spec.version)
            .and_then(|u| u.reason.map(|r| format!("{r}; ")))
            .unwrap_or_default();
        let phase = last_for(&spec.version).map_or(UpdatePhase::Skipped, |u| u.phase);
        return Plan::Nothing(shown(
            phase,
            &spec.version,
            Some(format!(
                "{why}{} was given up on this device and is not tried again until a deployment names another version",
                spec.version
            )),
        ));
    }
    Plan::Stage {
        version: spec.version.clone(),
        artifact: artifact.clone(),
    }
}

/// Runs until the agent stops or hands over.
pub async fn run(mut ctx: Context, shutdown: CancellationToken) {
    let fetcher = Fetcher::new(ctx.config.ca_file.as_deref(), ctx.reserve);
    let mut failures = 0u32;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let spec = ctx.spec.borrow_and_update().clone();
        let record = read_record(&ctx.paths);
        let running = outpost_core::version::current();
        match plan(
            spec.as_ref(),
            &record,
            running,
            &ctx.platform,
            ctx.config.enabled,
        ) {
            Plan::Nothing(update) => {
                set(&ctx, update);
                failures = 0;
                retry_at = None;
            }
            Plan::Stage { version, artifact } if retry_at.is_none() => {
                let cancel = shutdown.child_token();
                // A new deployment while this one is fetched: start over with it.
                let mut spec_rx = ctx.spec.clone();
                let watch_spec = async {
                    let _ = spec_rx.changed().await;
                };
                let outcome = tokio::select! {
                    o = stage(&ctx, &fetcher, record, &version, &artifact, &cancel) => o,
                    _ = watch_spec => { cancel.cancel(); continue; }
                };
                match outcome {
                    Ok(()) => {
                        settle(&mut ctx, &shutdown).await;
                        ctx.handover.request();
                        return;
                    }
                    Err(StageError::Stopped) => return,
                    Err(StageError::Retry(e)) => {
                        failures = failures.saturating_add(1);
                        let wait = backoff(failures);
                        warn!(error = %e, retry_secs = wait.as_secs(), version = %version,
                            "cannot fetch the new agent; trying again");
                        let mut status = ctx.status.borrow().update.clone();
                        if let Some(u) = status.as_mut() {
                            u.reason = Some(format!("{e}; trying again in {} s", wait.as_secs()));
                        }
                        set(&ctx, status);
                        retry_at = Some(tokio::time::Instant::now() + wait);
                    }
                    Err(StageError::Refused(reason)) => {
                        warn!(%reason, version = %version, "the new agent is refused; the agent stays");
                        let mut record = read_record(&ctx.paths);
                        record.refuse(&version);
                        record.last = Some(Outcome {
                            version: version.clone(),
                            phase: UpdatePhase::Failed,
                            reason: Some(reason),
                            at: outpost_core::time::unix_now(),
                        });
                        if let Err(e) = ctx.paths.write(&record) {
                            warn!(error = %e, "cannot write the update record");
                        }
                        continue;
                    }
                }
            }
            Plan::Stage { .. } => {}
        }
        let wait_retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = ctx.spec.changed() => {
                if changed.is_err() { return; }
                failures = 0;
                retry_at = None;
            }
            _ = wait_retry => retry_at = None,
        }
    }
}

/// Waits (bounded) until the deployment is no longer being applied, then a moment for the
/// report to go out: the operator sees `applied` and `switching` before the agent stops. A
/// deployment stuck applying does not hold the update back past [`SETTLE_WITHIN`] (the new
/// agent may be its fix).
async fn settle(ctx: &mut Context, shutdown: &CancellationToken) {
    use crate::state::DeploymentStatus::{Applying, Received};
    let settled = ctx.state.wait_for(|s| {
        !s.deployment
            .as_ref()
            .is_some_and(|d| matches!(d.status, Received | Applying))
    });
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::timeout(SETTLE_WITHIN, settled) => {}
    }
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(REPORT_TIME) => {}
    }
}

fn backoff(failures: u32) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1u32 << failures.min(10).saturating_sub(1));
    exp.min(RETRY_CAP)
}

fn read_record(paths: &Paths) -> Record {
    match paths.read() {
        Ok(Some(r)) => r,
        Ok(None) => Record::installed(outpost_core::version::current()),
        Err(e) => {
            warn!(error = %e, "the update record cannot be read; starting from the installed agent's");
            Record::installed(outpost_core::version::current())
        }
    }
}

fn set(ctx: &Context, update: Option<AgentUpdate>) {
    ctx.status.send_if_modified(|s| {
        let next = AgentStatus {
            slot: ctx.slot,
            update: update.clone(),
        };
        let changed = *s != next;
        *s = next;
        changed
    });
}

fn phase(ctx: &Context, version: &str, phase: UpdatePhase, done: Option<(u64, u64)>) {
    set(
        ctx,
        Some(AgentUpdate {
            version: version.to_string(),
            phase,
            reason: None,
            downloaded_bytes: done.map(|d| d.0),
            total_bytes: done.map(|d| d.1),
        }),
    );
}

#[derive(Debug)]
enum StageError {
    /// Worth trying again later (the link, the server, the disk).
    Retry(String),
    /// This build will never do (digest, size, self-test): given up.
    Refused(String),
    Stopped,
}

impl From<FetchError> for StageError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Cancelled => StageError::Stopped,
            e if e.is_transient() => StageError::Retry(e.to_string()),
            e => StageError::Refused(e.to_string()),
        }
    }
}

/// Fetch, verify, install in the free slot, self-test, record the trial.
async fn stage(
    ctx: &Context,
    fetcher: &Fetcher,
    mut record: Record,
    version: &str,
    artifact: &Artifact,
    cancel: &CancellationToken,
) -> Result<(), StageError> {
    if artifact.size > ctx.config.max_bytes {
        return Err(StageError::Refused(format!(
            "the build is {} bytes, more than the {} this device takes (update.max_mb)",
            artifact.size, ctx.config.max_bytes
        )));
    }
    info!(version, url = %artifact.url, bytes = artifact.size, "fetching the new agent");
    phase(
        ctx,
        version,
        UpdatePhase::Downloading,
        Some((0, artifact.size)),
    );
    let mut last_logged = 0u64;
    let file = fetcher
        .fetch(
            artifact,
            &ctx.paths.downloads(),
            |done, total| {
                phase(ctx, version, UpdatePhase::Downloading, Some((done, total)));
                let tenth = total / 10;
                if tenth > 0 && done / tenth != last_logged / tenth {
                    last_logged = done;
                    info!(version, done, total, "fetching the new agent");
                }
            },
            cancel,
        )
        .await?;
    phase(ctx, version, UpdatePhase::Verifying, None);
    let slot = record.active.slot.free_beside();
    let binary = ctx.paths.binary(slot, Path::new(""));
    install(&file, &binary).map_err(|e| {
        StageError::Retry(format!(
            "cannot put the new agent in slot {}: {e}",
            slot.name()
        ))
    })?;
    self_test(&binary, version)
        .await
        .map_err(StageError::Refused)?;
    // The download is in the slot now.
    let _ = std::fs::remove_dir_all(ctx.paths.downloads());
    phase(ctx, version, UpdatePhase::Switching, None);
    record.trial = Some(Trial {
        build: Build {
            slot,
            version: version.to_string(),
            sha256: Some(artifact.sha256.clone()),
        },
        starts: 0,
        replaces: outpost_core::version::current().to_string(),
    });
    ctx.paths
        .write(&record)
        .map_err(|e| StageError::Retry(e.to_string()))?;
    info!(
        version,
        slot = slot.name(),
        "the new agent is staged and verified; handing over"
    );
    Ok(())
}

/// Copies the verified file into the slot (executable, written whole).
fn install(file: &Path, binary: &Path) -> std::io::Result<()> {
    let dir = binary.parent().unwrap_or(Path::new("/"));
    record::private_dir(dir)?;
    let mut source = std::fs::File::open(file)?;
    crate::fsutil::write_atomic_with(binary, 0o755, crate::fsutil::Existing::Replace, |out| {
        std::io::copy(&mut source, out).map(|_| ())
    })
}

/// `binary --version` must print `version` (as a word of its output) within the timeout.
async fn self_test(binary: &PathBuf, version: &str) -> Result<(), String> {
    let run = tokio::process::Command::new(binary)
        .arg("--version")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(SELF_TEST_TIMEOUT, run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("the new agent cannot be run: {e}")),
        Err(_) => {
            return Err(format!(
                "the new agent's `--version` did not finish in {} s",
                SELF_TEST_TIMEOUT.as_secs()
            ));
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && text.split_whitespace().any(|w| w == version) {
        return Ok(());
    }
    let said: String = text.trim().chars().take(120).collect();
    Err(format!(
        "the new agent's self-test failed: `outpost --version` printed `{said}` ({}), not version {version}",
        out.status
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(version: &str, platforms: &[&str]) -> AgentSpec {
        AgentSpec {
            version: version.into(),
            artifacts: platforms
                .iter()
                .map(|p| {
                    (
                        p.to_string(),
                        Artifact {
                            url: format!("https://dl.example.com/{version}/{p}"),
                            sha256: "ab".repeat(32),
                            size: 10,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_new_version_for_this_platform_is_staged() {
        let r = Record::installed("0.1.0");
        let p = plan(
            Some(&spec("0.2.0", &["linux/amd64", "linux/arm64"])),
            &r,
            "0.1.0",
            "linux/arm64",
            true,
        );
        assert!(
            matches!(&p, Plan::Stage { version, artifact } if version == "0.2.0" && artifact.url.ends_with("linux/arm64")),
            "{p:?}"
        );
    }

    #[test]
    fn the_agent_is_left_alone_and_says_why() {
        let r = Record::installed("0.1.0");
        let s = spec("0.2.0", &["linux/amd64"]);
        let skipped = |p: Plan| match p {
            Plan::Nothing(Some(u)) if u.phase == UpdatePhase::Skipped => u.reason.unwrap(),
            other => panic!("{other:?}"),
        };
        let why = skipped(plan(Some(&s), &r, "0.1.0", "linux/arm/v7", true));
        assert!(
            why.contains("no build for this device's platform linux/arm/v7 (it names linux/amd64)"),
            "{why}"
        );
        let why = skipped(plan(Some(&s), &r, "0.1.0", "linux/amd64", false));
        assert!(why.contains("update.enabled = false"), "{why}");
        assert_eq!(
            plan(None, &r, "0.1.0", "linux/amd64", true),
            Plan::Nothing(None)
        );
        assert_eq!(
            plan(Some(&s), &r, "0.2.0", "linux/amd64", true),
            Plan::Nothing(None),
            "already there"
        );
    }

    #[test]
    fn a_given_up_version_is_not_tried_again_but_a_newer_one_is() {
        let mut r = Record::installed("0.1.0");
        r.trial = Some(Trial {
            build: Build {
                slot: Slot::A,
                version: "0.2.0".into(),
                sha256: None,
            },
            starts: 3,
            replaces: "0.1.0".into(),
        });
        r.roll_back("it crashed".into(), 1);
        match plan(
            Some(&spec("0.2.0", &["linux/amd64"])),
            &r,
            "0.1.0",
            "linux/amd64",
            true,
        ) {
            Plan::Nothing(Some(u)) => {
                assert_eq!(u.phase, UpdatePhase::RolledBack);
                let reason = u.reason.unwrap();
                assert!(
                    reason.starts_with("it crashed; 0.2.0 was given up"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan(
                Some(&spec("0.2.1", &["linux/amd64"])),
                &r,
                "0.1.0",
                "linux/amd64",
                true
            ),
            Plan::Stage { .. }
        ));
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(30), RETRY_CAP);
    }
}
