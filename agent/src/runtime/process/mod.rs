//! The process runtime: modules that are native executables, for devices without a container
//! engine (docs/reconciler.md#process-modules). It implements the same [`Runtime`] as the
//! Docker engine, so the reconciler treats both alike — startup order, stage then switch,
//! restart policies and backoff, stop grace, rollback, logs, adoption after a restart.
//!
//! A "container" here is a folder `{state_dir}/processes/{id}/` ([`files`]); a start runs
//! `outpost shim` ([`shim`]) in a process group of its own, which runs the module and records
//! its pid, output and exit. Processes outlive the agent: a restarted agent lists the folders
//! and finds each module running (same pid, same kernel start time, same boot) or exited —
//! *adoption*, as with containers; after a reboot every module is found exited and the restart
//! policy decides, as Docker's containers are.
//!
//! - `files.rs`: the folder's files and whether a recorded process still runs;
//! - `shim.rs`: the shim (limits, output, exit code);
//! - `logs.rs`: the rotated log, written and read back.

pub mod cgroup;
pub mod files;
pub mod logs;
pub mod shim;
pub mod user;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;

use self::files::{EXIT, Exit, RECORD, RUN, Record, Run};
use super::{
    ContainerSpec, ContainerState, ContainerUsage, EngineInfo, Health, ImageInfo, LogOptions,
    Observed, PullProgress, Runtime, RuntimeError, RuntimeEvent, labels,
};
use crate::manifest::RegistryCredentials;

/// Ids of process modules start with this: how the combined runtime tells them apart.
pub const ID_PREFIX: &str = "proc-";
/// How often the folders are looked at for exits (the events a container engine would send).
const POLL: Duration = Duration::from_millis(250);
/// One record as the event poller last saw it: id, module, state, latest run (pid, ticks).
type Seen = (String, String, ContainerState, Option<(i32, u64)>);
/// How long a start waits for the shim to say the process runs (or could not be started).
const START_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    /// `{state_dir}/processes`.
    root: PathBuf,
    /// The binary that runs the shims (this one).
    shim: PathBuf,
    /// Where modules' cgroups go, when the device offers cgroup v2 ([`cgroup::prepare`]).
    cgroups: Option<cgroup::Placement>,
    /// The user modules run as; `None`: the agent's own ([`user::resolve`]).
    run_as: Option<user::RunAs>,
}

impl ProcessRuntime {
    pub fn new(state_dir: &Path) -> std::io::Result<ProcessRuntime> {
        let root = state_dir.join("processes");
        // Modules that run as another user pass through these two to their working folders:
        // they may pass, not list. Each module's record folder (its environment, with its bus
        // password) stays the agent's alone.
        for dir in [root.clone(), root.join("work")] {
            crate::update::record::private_dir(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        }
        Ok(ProcessRuntime {
            root,
            shim: std::env::current_exe()?,
            cgroups: None,
            run_as: None,
        })
    }

    /// Modules started from now on run as `run_as` (`None`: as the agent).
    pub fn with_user(mut self, run_as: Option<user::RunAs>) -> ProcessRuntime {
        self.run_as = run_as;
        self
    }

    /// Modules created from now on run in cgroups under `placement`.
    pub fn with_cgroups(mut self, placement: Option<cgroup::Placement>) -> ProcessRuntime {
        self.cgroups = placement;
        self
    }

    fn dir(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        // Ids are ours ("proc-" and hex): nothing else may name a folder.
        if !id.starts_with(ID_PREFIX)
            || !id[ID_PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(RuntimeError::NotFound {
                what: format!("process {id}"),
            });
        }
        let dir = self.root.join(id);
        if !dir.join(RECORD).is_file() {
            return Err(RuntimeError::NotFound {
                what: format!("process {id}"),
            });
        }
        Ok(dir)
    }

    fn record(&self, id: &str) -> Result<(PathBuf, Record), RuntimeError> {
        let dir = self.dir(id)?;
        match files::read::<Record>(&dir.join(RECORD)) {
            Ok(Some(r)) => Ok((dir, r)),
            Ok(None) => Err(RuntimeError::NotFound {
                what: format!("process {id}"),
            }),
            Err(e) => Err(error("read", id, e)),
        }
    }

    /// Where a module's process runs when its manifest names no working directory.
    pub fn default_working_dir(&self, module: &str) -> PathBuf {
        self.root.join("work").join(module)
    }

    /// A record as observed, with the start of its latest run (pid, start ticks): a state alone
    /// cannot tell one exit from the next when a restart and its crash fall between two looks.
    fn observe(&self, dir: &Path, record: Record) -> (Observed, Option<(i32, u64)>) {
        let run: Option<Run> = files::read(&dir.join(RUN)).ok().flatten();
        let exit: Option<Exit> = files::read(&dir.join(EXIT)).ok().flatten();
        let (state, exit_code, finished_at) = match (&run, &exit) {
            (_, Some(e)) => (ContainerState::Exited, Some(e.code), Some(e.finished_at)),
            (Some(r), None) if files::alive(r) => (ContainerState::Running, None, None),
            // Its shim is gone with it (a kill of both, a reboot): how it ended is unknown.
            (Some(_), None) => (ContainerState::Exited, Some(-1), None),
            (None, None) => (ContainerState::Created, None, None),
        };
        let label = |k: &str| record.labels.get(k).cloned().unwrap_or_default();
        let generation = run.as_ref().map(|r| (r.pid, r.start_ticks));
        let observed = Observed {
            id: record.id.clone(),
            name: record.name.clone(),
            module: label(labels::MODULE),
            config_hash: label(labels::CONFIG_HASH),
            state,
            health: Health::None,
            exit_code,
            oom_killed: exit.as_ref().is_some_and(|e| e.oom_killed),
            started_at: run.as_ref().map(|r| r.started_at),
            finished_at,
            image: record.executable.clone(),
            image_id: record.executable.clone(),
            labels: record.labels,
        };
        (observed, generation)
    }

    /// Every record, as observed.
    fn all(&self) -> Vec<Observed> {
        self.all_runs().into_iter().map(|(o, _)| o).collect()
    }

    /// Every record, as observed, with the start of its latest run.
    fn all_runs(&self) -> Vec<(Observed, Option<(i32, u64)>)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().to_str()?.to_string();
                name.starts_with(ID_PREFIX).then_some(())?;
                let record = files::read::<Record>(&e.path().join(RECORD)).ok()??;
                Some(self.observe(&e.path(), record))
            })
            .collect()
    }

    /// The id of the process module named `name` (a container name, `outpost.DEVICE.MODULE`,
    /// as the local API asks for logs): a running one before others.
    pub fn id_by_name(&self, name: &str) -> Option<String> {
        self.all()
            .into_iter()
            .filter(|o| o.name == name)
            .max_by_key(|o| o.state == ContainerState::Running)
            .map(|o| o.id)
    }

    /// The running process of `id`, if it runs.
    fn running(&self, dir: &Path) -> Option<Run> {
        let run: Run = files::read(&dir.join(RUN)).ok().flatten()?;
        (files::read::<Exit>(&dir.join(EXIT))
            .ok()
            .flatten()
            .is_none()
            && files::alive(&run))
        .then_some(run)
    }
}

/// The events between two looks at a device's records. A new run counts even in the same
/// state: a restart and its crash between two looks is still a death the reconciler must hear
/// of (it was missed once, and the crash waited for the next resync).
fn changes(before: &[Seen], now: &[Seen]) -> Vec<RuntimeEvent> {
    let event = |id: &str, module: &str, action: &str| RuntimeEvent {
        container_id: id.to_string(),
        module: Some(module.to_string()),
        action: action.to_string(),
    };
    let mut events = Vec::new();
    for (id, module, state, run) in now {
        if !before
            .iter()
            .any(|(i, _, s, r)| i == id && s == state && r == run)
        {
            let action = match state {
                ContainerState::Running => "start",
                ContainerState::Exited => "die",
                _ => "create",
            };
            events.push(event(id, module, action));
        }
    }
    for (id, module, _, _) in before {
        if !now.iter().any(|(i, _, _, _)| i == id) {
            events.push(event(id, module, "destroy"));
        }
    }
    events
}

fn error(op: &'static str, target: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Engine {
        op,
        target: target.to_string(),
        message: e.to_string(),
    }
}

/// SIGKILL to a process module's group (the module and its children), for tests and tools
/// that clean up after the agent; nothing for pid 1 or less.
pub fn kill_group(pid: i32) {
    signal_group(pid, rustix::process::Signal::KILL);
}

pub(super) fn signal_group(pid: i32, signal: rustix::process::Signal) {
    // A record naming pid 1 (or less) is damaged: signalling group 1 would reach init's.
    if pid <= 1 {
        return;
    }
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        // The module leads its own group: its children get the signal too.
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

fn random_id() -> String {
    let mut bytes = [0u8; 8];
    // Without randomness, the time and pid make a unique enough id for this device.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = (outpost_core::time::wall_now_ms() ^ u64::from(std::process::id())).to_le_bytes();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{ID_PREFIX}{hex}")
}

impl Runtime for ProcessRuntime {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        let here = outpost_core::platform::Platform::of_this_build();
        Ok(EngineInfo {
            version: format!(
                "process runtime (outpost {})",
                outpost_core::version::current()
            ),
            os: here.os,
            architecture: here.architecture,
            root_dir: Some(self.root.clone()),
        })
    }

    /// The executable, as an image: present when it is a regular executable file.
    async fn image(&self, image: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        let Ok(meta) = std::fs::metadata(image) else {
            return Ok(None);
        };
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Ok(None);
        }
        let here = outpost_core::platform::Platform::of_this_build();
        Ok(Some(ImageInfo {
            id: image.to_string(),
            tags: vec![image.to_string()],
            digests: Vec::new(),
            created: meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64),
            os: here.os,
            architecture: here.architecture,
            variant: here.variant,
        }))
    }

    async fn pull(
        &self,
        image: &str,
        _platform: &super::registry::Platform,
        _credentials: Option<&RegistryCredentials>,
        _progress: Option<&mpsc::Sender<PullProgress>>,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError::Pull {
            image: image.to_string(),
            message: format!(
                "the executable {image} is not found on the device (or is not executable): a process module's executable is installed on the device, nothing is pulled"
            ),
        })
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let id = random_id();
        let dir = self.root.join(&id);
        let module = spec.labels.get(labels::MODULE).cloned().unwrap_or_default();
        let working_dir = match &spec.working_dir {
            Some(d) => PathBuf::from(d),
            None => {
                let d = self.default_working_dir(&module);
                crate::update::record::private_dir(&d)
                    .map_err(|e| error("create", &spec.name, e))?;
                d
            }
        };
        let record = Record {
            id: id.clone(),
            name: spec.name.clone(),
            executable: spec.image.clone(),
            args: spec.cmd.clone().unwrap_or_default(),
            env: spec.env.clone(),
            working_dir,
            labels: spec.labels.clone(),
            memory_bytes: spec.memory_bytes.and_then(|b| u64::try_from(b).ok()),
            nano_cpus: spec.nano_cpus,
            pids_limit: spec.pids_limit,
            log_max_bytes: parse_size(&spec.log_max_size).unwrap_or(10 << 20),
            log_max_files: spec.log_max_files.max(1),
            created: outpost_core::time::unix_now(),
            cgroup: self.cgroups.as_ref().map(|c| c.module(&id)),
            user: self.run_as,
        };
        crate::update::record::private_dir(&dir).map_err(|e| error("create", &spec.name, e))?;
        files::write(&dir.join(RECORD), &record).map_err(|e| error("create", &spec.name, e))?;
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let (dir, mut record) = self.record(id)?;
        if self.running(&dir).is_some() {
            return Ok(());
        }
        // The user is the device's current setting, not the one at create: a change of
        // `runtime.process_user` applies at each module's next start.
        if record.user != self.run_as {
            record.user = self.run_as;
            files::write(&dir.join(RECORD), &record).map_err(|e| error("start", id, e))?;
        }
        let module = record
            .labels
            .get(labels::MODULE)
            .cloned()
            .unwrap_or_default();
        if let Some(run_as) = self.run_as
            && record.working_dir == self.default_working_dir(&module)
        {
            user::hand_over(&record.working_dir, run_as).map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(1) => user::not_permitted(run_as),
                    _ => String::new(),
                };
                error(
                    "start",
                    id,
                    format!(
                        "cannot give {} to its user: {e}{hint}",
                        record.working_dir.display()
                    ),
                )
            })?;
        }
        for f in [RUN, EXIT] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        // `--detach`: the process started here starts the shim and exits at once, so the
        // shim is never this agent's child — no zombie is left to a process that `exec`s
        // another agent binary (a self-update), and none outlives its reaper.
        let mut shim = tokio::process::Command::new(&self.shim);
        shim.args(["shim", "--detach"])
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let status = shim
            .status()
            .await
            .map_err(|e| error("start", &record.name, e))?;
        if !status.success() {
            return Err(error(
                "start",
                &record.name,
                format!("its shim could not be started ({status})"),
            ));
        }
        let deadline = tokio::time::Instant::now() + START_WITHIN;
        loop {
            if let Ok(Some(exit)) = files::read::<Exit>(&dir.join(EXIT))
                && let Some(why) = exit.error
            {
                return Err(error("start", &record.name, why));
            }
            if let Ok(Some(run)) = files::read::<Run>(&dir.join(RUN)) {
                tracing::info!(module = %record.labels.get(labels::MODULE).map_or("", String::as_str),
                    pid = run.pid, limits = %run.limits, "process module started");
                return Ok(());
            }
            if dir.join(EXIT).is_file() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(error(
                    "start",
                    &record.name,
                    format!(
                        "its shim did not report within {} s",
                        START_WITHIN.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let dir = self.dir(id)?;
        let Some(run) = self.running(&dir) else {
            return Ok(());
        };
        signal_group(run.pid, rustix::process::Signal::TERM);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if self.running(&dir).is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal_group(run.pid, rustix::process::Signal::KILL);
        // What the module started outside its group goes too.
        if let Ok((_, record)) = self.record(id)
            && let Some(cg) = &record.cgroup
        {
            cgroup::kill_all(cg);
        }
        for _ in 0..100 {
            if self.running(&dir).is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(error("stop", id, "still running after SIGKILL"))
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.dir(id)?;
        // A damaged record is removed all the same; only its cgroup is then not known.
        let cg = files::read::<Record>(&dir.join(RECORD))
            .ok()
            .flatten()
            .and_then(|r| r.cgroup);
        if let Some(run) = self.running(&dir) {
            signal_group(run.pid, rustix::process::Signal::KILL);
            for _ in 0..100 {
                if self.running(&dir).is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // What the module started outside its group goes with its cgroup.
        if let Some(cg) = &cg {
            cgroup::remove(cg).await;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| error("remove", id, e))
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        let (dir, mut record) = self.record(id)?;
        record.name = name.to_string();
        files::write(&dir.join(RECORD), &record).map_err(|e| error("rename", id, e))
    }

    async fn list(&self, device: &str) -> Result<Vec<Observed>, RuntimeError> {
        Ok(self
            .all()
            .into_iter()
            .filter(|o| o.labels.get(labels::DEVICE).map(String::as_str) == Some(device))
            .collect())
    }

    fn events(
        &self,
        device: &str,
    ) -> impl Stream<Item = Result<RuntimeEvent, RuntimeError>> + Send + 'static {
        let (this, device) = (self.clone(), device.to_string());
        // What a container engine pushes, found by looking: each change of a process's state
        // since the last look is an event.
        futures_util::stream::unfold(
            (this, device, None::<Vec<Seen>>, Vec::new()),
            |(this, device, mut seen, mut queue)| async move {
                loop {
                    if let Some(event) = queue.pop() {
                        return Some((Ok(event), (this, device, seen, queue)));
                    }
                    tokio::time::sleep(POLL).await;
                    let now: Vec<Seen> = this
                        .all_runs()
                        .into_iter()
                        .filter(|(o, _)| o.labels.get(labels::DEVICE) == Some(&device))
                        .map(|(o, run)| (o.id, o.module, o.state, run))
                        .collect();
                    if let Some(before) = &seen {
                        queue.extend(changes(before, &now));
                    }
                    seen = Some(now);
                }
            },
        )
    }

    fn logs(
        &self,
        id: &str,
        options: LogOptions,
    ) -> impl Stream<Item = Result<String, RuntimeError>> + Send + 'static {
        let found = self.record(id).map(|(dir, r)| (dir, r.log_max_files));
        let id = id.to_string();
        let format = move |l: &logs::Line| {
            if options.timestamps {
                format!("{} {}\n", l.stamp, l.text)
            } else {
                format!("{}\n", l.text)
            }
        };
        let (first, follow_from) = match &found {
            Ok((dir, files)) => {
                let mut lines = logs::read_all(dir, *files);
                if let Some(since) = options.since {
                    lines.retain(|l| l.at as i64 >= since);
                }
                if let Some(tail) = options.tail {
                    let skip = lines.len().saturating_sub(tail);
                    lines.drain(..skip);
                }
                let text: Vec<Result<String, RuntimeError>> =
                    lines.iter().map(|l| Ok(format(l))).collect();
                (text, Some((dir.clone(), logs::current_len(dir))))
            }
            Err(_) => (
                vec![Err(RuntimeError::NotFound {
                    what: format!("process {id}"),
                })],
                None,
            ),
        };
        let follow = options.follow;
        let head = futures_util::stream::iter(first);
        let tail = futures_util::stream::unfold(
            (follow_from.filter(|_| follow), Vec::<String>::new()),
            move |(state, mut queue)| async move {
                let (dir, mut at) = state?;
                loop {
                    if let Some(line) = queue.pop() {
                        return Some((Ok(line), (Some((dir, at)), queue)));
                    }
                    if !dir.exists() {
                        return None;
                    }
                    tokio::time::sleep(POLL).await;
                    let (lines, next) = logs::read_from(&dir, at);
                    at = next;
                    queue = lines.iter().rev().map(&format).collect();
                }
            },
        );
        futures_util::StreamExt::chain(head, tail)
    }

    async fn images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        // Executables are the device's own: never collected.
        Ok(Vec::new())
    }

    async fn remove_image(&self, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn usage(&self, id: &str) -> Result<ContainerUsage, RuntimeError> {
        let dir = self.dir(id)?;
        let Some(run) = self.running(&dir) else {
            return Ok(ContainerUsage::default());
        };
        let ticks = || cpu_ticks(run.pid);
        let before = ticks();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = ticks();
        let hz = 100.0; // USER_HZ on Linux
        let cpu_percent = match (before, after) {
            (Some(b), Some(a)) => Some((a.saturating_sub(b)) as f64 / hz / 0.5 * 100.0),
            _ => None,
        };
        let memory_bytes = std::fs::read_to_string(format!("/proc/{}/statm", run.pid))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * 4096);
        Ok(ContainerUsage {
            cpu_percent,
            memory_bytes,
            memory_limit_bytes: files::read::<Record>(&dir.join(RECORD))
                .ok()
                .flatten()
                .and_then(|r| r.memory_bytes),
        })
    }

    async fn bridge_gateway(&self) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        Ok(None)
    }
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace();
    // Fields 14 and 15 are the 12th and 13th after `)`.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `10m`, `512k`, `1g` or bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let (n, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s.as_str(), 1),
    };
    n.parse::<u64>().ok().map(|n| n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_ours_only() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path()).unwrap();
        for bad in ["../etc", "proc-../../x", "abc", "proc-zz"] {
            assert!(rt.dir(bad).is_err(), "{bad}");
        }
        assert!(random_id().starts_with(ID_PREFIX));
        assert_eq!(parse_size("10m"), Some(10 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
    }

    #[test]
    fn a_restart_and_its_crash_between_two_looks_is_a_death() {
        let seen = |state, run| ("proc-1".to_string(), "m".to_string(), state, run);
        // One record, looked at twice: before, and now (or gone).
        let actions = |before: &Seen, now: Option<&Seen>| -> Vec<String> {
            let now: Vec<Seen> = now.into_iter().cloned().collect();
            changes(std::slice::from_ref(before), &now)
                .into_iter()
                .map(|e| e.action)
                .collect()
        };
        let exited_a = seen(ContainerState::Exited, Some((10, 100)));
        let exited_b = seen(ContainerState::Exited, Some((11, 200)));
        let running_b = seen(ContainerState::Running, Some((11, 200)));
        assert_eq!(actions(&exited_a, Some(&exited_b)), ["die"]);
        assert_eq!(actions(&exited_a, Some(&running_b)), ["start"]);
        assert_eq!(actions(&running_b, Some(&exited_b)), ["die"]);
        assert!(actions(&exited_b, Some(&exited_b)).is_empty());
        assert_eq!(actions(&exited_a, None), ["destroy"]);
    }
}
