//! A process module's files, under `{state_dir}/processes/{id}/`:
//!
//! - `record.json`: what to run (written by the agent at create, renamed at a switch);
//! - `run.json`: the running process (written by its shim once it started: pid, the kernel's
//!   start time of that pid, the boot, the limits that applied);
//! - `exit.json`: how it ended (written by the shim when it exits);
//! - `log`, `log.1`, `log.2`: its output, rotated by size.
//!
//! A process is alive when its pid exists in this boot *with the start time recorded*: a pid
//! reused by another program after a crash or a reboot is never taken for the module.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What to run: the container spec's part that applies to a process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub id: String,
    pub name: String,
    pub executable: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub memory_bytes: Option<u64>,
    pub nano_cpus: Option<i64>,
    pub pids_limit: Option<i64>,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    /// Unix seconds.
    pub created: u64,
    /// The module's cgroup v2 folder, when the device offers one ([`super::cgroup`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The user the module runs as; absent: the agent's own ([`super::user`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<super::user::RunAs>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
    pub start_ticks: u64,
    pub boot_id: String,
    /// Unix seconds.
    pub started_at: u64,
    /// The limits that applied, and how (for the log and the operator).
    pub limits: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Exit {
    /// The exit code, or 128 + the signal that ended it (as a shell reports it).
    pub code: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Unix seconds.
    pub finished_at: u64,
    /// Why it could not be started, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Killed by the kernel for going past its cgroup's memory limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
}

pub const RECORD: &str = "record.json";
pub const RUN: &str = "run.json";
pub const EXIT: &str = "exit.json";
pub const LOG: &str = "log";

pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn write<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    crate::fsutil::write_atomic(path, &bytes, 0o600)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The start time of `pid` in clock ticks since boot, if it runs (`/proc/PID/stat` field 22;
/// the command name, in parentheses, may hold spaces: fields are counted after its `)`).
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After `)`: field 3 (state) is the first; field 22 is the 20th.
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Whether the process `run` describes still runs (same boot, same pid, same start time).
pub fn alive(run: &Run) -> bool {
    run.boot_id == boot_id() && start_ticks(run.pid) == Some(run.start_ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = std::process::id() as i32;
        let ticks = start_ticks(me).expect("our own stat");
        let run = Run {
            pid: me,
            start_ticks: ticks,
            boot_id: boot_id(),
            started_at: 0,
            limits: String::new(),
        };
        assert!(alive(&run));
        assert!(!alive(&Run {
            start_ticks: ticks + 1,
            ..run.clone()
        }));
        assert!(!alive(&Run {
            boot_id: "another boot".into(),
            ..run
        }));
    }
}
