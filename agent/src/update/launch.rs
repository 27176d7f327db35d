//! The launcher: what `outpost run` does before any agent starts, in the binary the service
//! starts (the installed one, which no update ever writes).
//!
//! It reads the update record and
//! - with a build on trial, starts it as a child and watches it: the trial ends when the child
//!   commits itself (it passed its health gate), or is rolled back when it exits before that
//!   `max_starts` times or does not pass the gate within `gate_timeout`. Any exit counts, the
//!   configuration-error code 78 included, which systemd would not restart: the launcher, not
//!   the service manager, decides a trial's fate. Then it decides again;
//! - with an update slot active, replaces itself with that slot's binary (`exec`: same process,
//!   nothing resident);
//! - otherwise runs the agent itself.
//!
//! A process started from a slot learns so from its environment ([`Role::from_env`]) and does
//! not launch again.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{error, info, warn};

use super::record::{Build, Paths, Record, Slot};
use crate::config::{Config, UpdateConfig};

/// Set by the launcher for the binary it starts: which slot it is.
pub const ENV_SLOT: &str = "OUTPOST_SLOT";
/// Set to `1` for a build on trial (it runs its health gate).
pub const ENV_TRIAL: &str = "OUTPOST_TRIAL";
/// The installed binary: where a slot's agent hands over to for its own updates.
pub const ENV_LAUNCHER: &str = "OUTPOST_LAUNCHER";
/// The launcher's process id, for a trial to see that its launcher is still there.
pub const ENV_LAUNCHER_PID: &str = "OUTPOST_LAUNCHER_PID";

/// Wait between starts of a trial that exited.
const RESTART_DELAY: Duration = Duration::from_secs(2);
/// How long a trial gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(12);

/// Who this agent process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub slot: Slot,
    /// On trial: it must pass its health gate, then commit itself and exit.
    pub trial: bool,
    /// The installed binary (the launcher).
    pub launcher: PathBuf,
}

impl Role {
    /// The role the launcher gave this process; `None` for the installed binary itself.
    pub fn from_env() -> Option<Role> {
        let slot = Slot::from_name(&std::env::var(ENV_SLOT).ok()?)?;
        Some(Role {
            slot,
            trial: std::env::var(ENV_TRIAL).is_ok_and(|v| v == "1"),
            launcher: std::env::var_os(ENV_LAUNCHER).map(PathBuf::from)?,
        })
    }

    /// The installed binary running as the agent.
    pub fn installed() -> Role {
        Role {
            slot: Slot::Installed,
            trial: false,
            launcher: installed_path(),
        }
    }
}

/// This binary's path (the launcher's, when it is the installed one).
pub fn installed_path() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/outpost"))
}

/// What `outpost run` does next.
#[derive(Debug)]
pub enum Next {
    /// Run the agent in this process, in this role.
    Run(Role),
    /// Stop: the launcher was told to stop while a trial ran (the trial stays pending).
    Stop,
}

/// Decides what runs, supervising a trial when there is one; returns when this process is to
/// run the agent itself or to stop. `args` are the program's arguments (without its name),
/// passed on to the binary it starts.
pub fn launch(config: &Config, args: &[OsString]) -> Next {
    if let Some(role) = Role::from_env() {
        if role.trial {
            tie_to_launcher();
        }
        return Next::Run(role);
    }
    let installed = installed_path();
    let paths = Paths::new(&config.state_dir);
    loop {
        let mut record = match paths.read() {
            Ok(Some(r)) => r,
            Ok(None) => return Next::Run(Role::installed()),
            Err(e) => {
                error!(error = %e, "cannot read the update record; the installed agent runs");
                return Next::Run(Role::installed());
            }
        };
        let mut changed = installed_upgraded(&mut record);
        if let Some(trial) = &record.trial
            && trial.starts >= config.update.max_starts
        {
            let reason = format!(
                "the new agent {} was started {} times and stopped each time before passing its health gate",
                trial.build.version, trial.starts
            );
            warn!(%reason, "rolling back");
            record.roll_back(reason, outpost_core::time::unix_now());
            changed = true;
        }
        if changed && let Err(e) = paths.write(&record) {
            error!(error = %e, "cannot write the update record");
        }
        if let Some(trial) = record.trial.clone() {
            match supervise(&paths, &installed, &trial.build, &config.update, args) {
                Supervised::Decided => continue,
                Supervised::Stop => return Next::Stop,
            }
        }
        if record.active.slot == Slot::Installed {
            return Next::Run(Role::installed());
        }
        let binary = paths.binary(record.active.slot, &installed);
        let e = exec(&binary, record.active.slot, false, &installed, args);
        // Only a failed exec returns.
        let reason = format!(
            "the agent {} in slot {} could not be started ({e}); the installed agent runs",
            record.active.version,
            record.active.slot.name()
        );
        error!(%reason);
        record.last = Some(super::record::Outcome {
            version: record.active.version.clone(),
            phase: crate::state::UpdatePhase::RolledBack,
            reason: Some(reason),
            at: outpost_core::time::unix_now(),
        });
        record.active = Build {
            slot: Slot::Installed,
            version: outpost_core::version::current().to_string(),
            sha256: None,
        };
        if let Err(e) = paths.write(&record) {
            error!(error = %e, "cannot write the update record");
        }
        return Next::Run(Role::installed());
    }
}

/// A package upgrade put a newer agent in the installed binary's place than the active slot
/// holds: the newer one wins (an older slot would otherwise shadow every package upgrade).
fn installed_upgraded(record: &mut Record) -> bool {
    let mine = outpost_core::version::current();
    if record.active.slot == Slot::Installed {
        record.active.version = mine.to_string();
        return false;
    }
    if outpost_core::version::compare(mine, &record.active.version)
        == Some(std::cmp::Ordering::Greater)
    {
        info!(installed = mine, slot_version = %record.active.version,
            "the installed agent is newer than the one in the update slot (a package upgrade): it runs");
        record.active = Build {
            slot: Slot::Installed,
            version: mine.to_string(),
            sha256: None,
        };
        return true;
    }
    false
}

/// Replaces this process with `binary` in the role of `slot`; returns only on failure.
pub fn exec(binary: &Path, slot: Slot, trial: bool, installed: &Path, args: &[OsString]) -> String {
    use std::os::unix::process::CommandExt as _;
    info!(binary = %binary.display(), slot = slot.name(), "starting the agent of the update slot");
    let mut command = std::process::Command::new(binary);
    command
        .args(args)
        .env(ENV_SLOT, slot.name())
        .env(ENV_LAUNCHER, installed)
        .env_remove(ENV_LAUNCHER_PID);
    if trial {
        command.env(ENV_TRIAL, "1");
    } else {
        command.env_remove(ENV_TRIAL);
    }
    command.exec().to_string()
}

/// Replaces this process with the launcher (the installed binary), which decides what runs
/// next: how an agent hands over after staging an update. Returns only on failure.
pub fn exec_launcher(launcher: &Path, args: &[OsString]) -> String {
    use std::os::unix::process::CommandExt as _;
    info!(launcher = %launcher.display(), "handing over to the launcher");
    std::process::Command::new(launcher)
        .args(args)
        .env_remove(ENV_SLOT)
        .env_remove(ENV_TRIAL)
        .env_remove(ENV_LAUNCHER)
        .env_remove(ENV_LAUNCHER_PID)
        .exec()
        .to_string()
}

/// A trial dies with its launcher, at once (a `kill -9` of the service's process must not
/// leave an agent behind that the next start would run beside, as systemd would not either:
/// it kills what is left of the unit before starting it again).
fn tie_to_launcher() {
    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
    if let Err(e) = set_parent_process_death_signal(Some(Signal::KILL)) {
        warn!(error = %e, "cannot tie the agent on trial to its launcher");
    }
    let expected = std::env::var(ENV_LAUNCHER_PID)
        .ok()
        .and_then(|p| p.parse::<i32>().ok());
    let parent = getppid().map(|p| p.as_raw_nonzero().get());
    if expected.is_some() && parent != expected {
        // The launcher died before the tie was made.
        error!("the launcher is gone; stopping");
        std::process::exit(0);
    }
}

enum Supervised {
    /// The trial ended (committed or rolled back): decide again from the record.
    Decided,
    /// Told to stop.
    Stop,
}

/// Runs the trial build as a child until it commits, is given up, or the launcher is told to
/// stop.
fn supervise(
    paths: &Paths,
    installed: &Path,
    build: &Build,
    update: &UpdateConfig,
    args: &[OsString],
) -> Supervised {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the launcher's runtime; rolling the update back");
            roll_back_now(paths, format!("the launcher could not watch it: {e}"));
            return Supervised::Decided;
        }
    };
    runtime.block_on(supervise_async(paths, installed, build, update, args))
}

async fn supervise_async(
    paths: &Paths,
    installed: &Path,
    build: &Build,
    update: &UpdateConfig,
    args: &[OsString],
) -> Supervised {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        roll_back_now(paths, "the launcher could not handle signals".into());
        return Supervised::Decided;
    };
    let deadline = tokio::time::Instant::now() + update.gate_timeout;
    let binary = paths.binary(build.slot, installed);
    let mut last_exit: Option<String> = None;
    loop {
        // Counted before the start: a crash, or a kill of this launcher, counts as well.
        let mut record = match paths.read() {
            Ok(Some(r)) => r,
            _ => return Supervised::Decided,
        };
        let Some(trial) = record.trial.as_mut() else {
            return Supervised::Decided;
        };
        if trial.starts >= update.max_starts {
            let reason = format!(
                "the new agent {} stopped {} times before passing its health gate (last: {})",
                trial.build.version,
                trial.starts,
                last_exit
                    .as_deref()
                    .unwrap_or("the launcher was restarted while it ran")
            );
            warn!(%reason, "rolling back");
            record.roll_back(reason, outpost_core::time::unix_now());
            write(paths, &record);
            return Supervised::Decided;
        }
        trial.starts += 1;
        let start = trial.starts;
        write(paths, &record);
        let _ = std::fs::remove_file(paths.probation());
        info!(version = %build.version, slot = build.slot.name(), start, max = update.max_starts,
            "starting the new agent on probation");
        let mut child = match tokio::process::Command::new(&binary)
            .args(args)
            .env(ENV_SLOT, build.slot.name())
            .env(ENV_TRIAL, "1")
            .env(ENV_LAUNCHER, installed)
            .env(ENV_LAUNCHER_PID, std::process::id().to_string())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                last_exit = Some(format!("it could not be started: {e}"));
                warn!(error = %e, "cannot start the new agent");
                tokio::time::sleep(RESTART_DELAY).await;
                continue;
            }
        };
        tokio::select! {
            status = child.wait() => {
                if !matches!(paths.read(), Ok(Some(r)) if r.trial.is_some()) {
                    info!("the new agent ended its probation");
                    return Supervised::Decided;
                }
                let what = match status {
                    Ok(s) => describe(s),
                    Err(e) => format!("cannot wait for it: {e}"),
                };
                warn!(exit = %what, start, "the new agent stopped before passing its health gate");
                last_exit = Some(what);
                tokio::select! {
                    _ = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = term.recv() => return Supervised::Stop,
                    _ = int.recv() => return Supervised::Stop,
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                stop(&mut child).await;
                if let Ok(Some(mut record)) = paths.read()
                    && record.trial.is_some()
                {
                    let reason = format!(
                        "the new agent {} did not pass its health gate within {} s: {}",
                        build.version,
                        update.gate_timeout.as_secs(),
                        super::gate::what_it_lacked(&paths.probation())
                    );
                    warn!(%reason, "rolling back");
                    record.roll_back(reason, outpost_core::time::unix_now());
                    write(paths, &record);
                }
                return Supervised::Decided;
            }
            _ = term.recv() => { stop(&mut child).await; return Supervised::Stop; }
            _ = int.recv() => { stop(&mut child).await; return Supervised::Stop; }
        }
    }
}

fn write(paths: &Paths, record: &Record) {
    if let Err(e) = paths.write(record) {
        error!(error = %e, "cannot write the update record");
    }
}

fn roll_back_now(paths: &Paths, reason: String) {
    if let Ok(Some(mut record)) = paths.read() {
        record.roll_back(reason, outpost_core::time::unix_now());
        write(paths, &record);
    }
}

/// SIGTERM, the grace, then SIGKILL.
async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_slot(version: &str) -> Record {
        let mut r = Record::installed("0.0.1");
        r.active = Build {
            slot: Slot::B,
            version: version.into(),
            sha256: Some("ab".repeat(32)),
        };
        r
    }

    #[test]
    fn a_package_upgrade_newer_than_the_slot_runs() {
        // This build is the crate's version (0.1.0 here): a slot at 0.0.9 is older.
        let mut r = on_slot("0.0.9");
        assert!(installed_upgraded(&mut r));
        assert_eq!(r.active.slot, Slot::Installed);
        assert_eq!(r.active.version, outpost_core::version::current());
    }

    #[test]
    fn a_slot_newer_than_the_package_keeps_running() {
        let mut r = on_slot("99.0.0");
        assert!(!installed_upgraded(&mut r));
        assert_eq!(r.active.slot, Slot::B);
        let mut same = on_slot(outpost_core::version::current());
        assert!(
            !installed_upgraded(&mut same),
            "equal versions: the slot stays"
        );
    }
}
