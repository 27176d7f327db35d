//! cgroup v2 for process modules. Where the kernel offers cgroup v2 with the memory, pids or cpu
//! controller and the agent may write there, each process module runs in a cgroup of its own,
//! `/sys/fs/cgroup/outpost/{id}` by default, with `memory.max`, `pids.max` and `cpu.max` from
//! its limits — what a container gets from its engine. Elsewhere the shim falls back to
//! `setrlimit` (memory only) and says so. This module owns finding that place, preparing it at
//! start-up, and the files of one module's cgroup; the shim writes them, the runtime reads and
//! removes them.

use std::io;
use std::path::{Path, PathBuf};

/// The controllers a module's limits use, in the order they are enabled.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// The folder of module cgroups at the top of the cgroup2 mount, by default.
const DEFAULT_PARENT: &str = "outpost";
/// Where the agent's own processes go when the cgroup it runs in hands its controllers down:
/// cgroup v2 lets only leaves hold processes.
const AGENT_LEAF: &str = "agent";
/// The period `cpu.max` is expressed in, in microseconds (the kernel's default).
const CPU_PERIOD_US: i64 = 100_000;

/// `runtime.process_cgroup`: where process modules' cgroups go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Setting {
    /// `{cgroup2 mount}/outpost`, when cgroup v2 offers the controllers and it is writable.
    #[default]
    Auto,
    /// Never: limits by `setrlimit` only.
    Off,
    /// This cgroup v2 folder (made when missing; its parent must hand the controllers down or
    /// let the agent do so).
    Path(PathBuf),
}

/// Where process modules' cgroups are made, and the controllers they get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `{cgroup2 mount}/outpost` by default.
    pub parent: PathBuf,
    pub controllers: Vec<String>,
}

impl Placement {
    /// The cgroup of the module whose record is `id`.
    pub fn module(&self, id: &str) -> PathBuf {
        self.parent.join(id)
    }

    pub fn describe(&self) -> String {
        format!(
            "cgroup v2 under {} ({})",
            self.parent.display(),
            self.controllers.join(", ")
        )
    }
}

/// Finds and prepares the place for module cgroups, or says why there is none (the limits are
/// then `setrlimit`'s). Run once at start-up, before any module starts.
///
/// `auto` makes `{cgroup2 mount}/outpost`, as Docker's cgroupfs driver makes `docker`: module
/// cgroups then outlive the agent's own (a restarted service keeps its modules, whatever its
/// unit's `KillMode`), and need no delegation from the service manager.
pub fn prepare(setting: &Setting) -> Result<Placement, String> {
    let found = locate(setting)?;
    if let Some(top) = &found.leaf_first {
        to_leaf(top)?;
    }
    let above = found.above();
    let enabled = enable(above, &found.wanted).map_err(|e| not_writable(above, &e))?;
    make_dir(&found.parent).map_err(|e| not_writable(&found.parent, &e))?;
    let enabled = enable(&found.parent, &enabled).map_err(|e| not_writable(&found.parent, &e))?;
    Ok(Placement {
        parent: found.parent,
        controllers: enabled.into_iter().map(str::to_string).collect(),
    })
}

/// What [`prepare`] would do, without writing anything (`outpost check`): the placement it
/// would make, or why there would be none.
pub fn probe(setting: &Setting) -> Result<Placement, String> {
    let found = locate(setting)?;
    let control = found.above().join("cgroup.subtree_control");
    rustix::fs::access(&control, rustix::fs::Access::WRITE_OK)
        .map_err(|e| not_writable(&control, &io::Error::from(e)))?;
    Ok(Placement {
        parent: found.parent,
        controllers: found.wanted.into_iter().map(str::to_string).collect(),
    })
}

/// Where module cgroups would go, found by reading only.
struct Located {
    /// The folder of module cgroups (its parent is in a cgroup v2 file system).
    parent: PathBuf,
    /// The controllers its parent offers, of those a module's limits use.
    wanted: Vec<&'static str>,
    /// The top of the hierarchy, when the agent runs there and must first move to a leaf.
    leaf_first: Option<PathBuf>,
}

impl Located {
    fn above(&self) -> &Path {
        // Checked by `locate`: the parent has a parent.
        self.parent.parent().unwrap_or(Path::new("/"))
    }
}

fn locate(setting: &Setting) -> Result<Located, String> {
    let mut leaf_first = None;
    let parent = match setting {
        Setting::Off => return Err("runtime.process_cgroup = \"off\"".to_string()),
        Setting::Path(p) => p.clone(),
        Setting::Auto => {
            let (mount, own) = own_cgroup()?;
            // At the top of its hierarchy (a device without a service manager, a container
            // with a cgroup namespace), the agent's processes move to a leaf first: only
            // leaves hold processes once controllers are handed down (the real root is
            // exempt).
            if own == mount && mount.join("cgroup.type").exists() {
                leaf_first = Some(mount.clone());
            }
            mount.join(DEFAULT_PARENT)
        }
    };
    let above = parent
        .parent()
        .filter(|a| a.join("cgroup.controllers").is_file())
        .ok_or_else(|| format!("{} is not in a cgroup v2 file system", parent.display()))?;
    let offered = read_words(&above.join("cgroup.controllers"));
    let wanted: Vec<&'static str> = CONTROLLERS
        .into_iter()
        .filter(|c| offered.iter().any(|o| o == c))
        .collect();
    if wanted.is_empty() {
        return Err(format!(
            "cgroup v2 at {} offers no memory, pids or cpu controller (on this kernel they are bound to cgroup v1)",
            above.display()
        ));
    }
    Ok(Located {
        parent,
        wanted,
        leaf_first,
    })
}

/// Moves every process of `dir` into `dir/agent`.
fn to_leaf(dir: &Path) -> Result<(), String> {
    let leaf = dir.join(AGENT_LEAF);
    make_dir(&leaf).map_err(|e| not_writable(&leaf, &e))?;
    for pid in read_words(&dir.join("cgroup.procs")) {
        // A process that ended meanwhile cannot be moved and need not be.
        if let Err(e) = std::fs::write(leaf.join("cgroup.procs"), &pid)
            && e.raw_os_error() != Some(rustix::io::Errno::SRCH.raw_os_error())
        {
            return Err(not_writable(&leaf.join("cgroup.procs"), &e));
        }
    }
    Ok(())
}

/// The cgroup2 mount and the agent's own cgroup folder in it, from `/proc/self`.
fn own_cgroup() -> Result<(PathBuf, PathBuf), String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = cgroup2_mount(&mounts).ok_or("no cgroup v2 file system is mounted")?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("the agent is in no cgroup v2")?;
    let own = mount.join(own.trim_start_matches('/'));
    Ok((mount, own))
}

/// The mount point of the cgroup2 file system in a `mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// Enables what it can of `controllers` for `dir`'s children; returns those enabled.
fn enable<'a>(dir: &Path, controllers: &[&'a str]) -> io::Result<Vec<&'a str>> {
    let control = dir.join("cgroup.subtree_control");
    let mut enabled = Vec::new();
    let mut last = None;
    for c in controllers {
        match std::fs::write(&control, format!("+{c}")) {
            Ok(()) => enabled.push(*c),
            Err(e) => last = Some(e),
        }
    }
    match (enabled.is_empty(), last) {
        (true, Some(e)) => Err(e),
        _ => Ok(enabled),
    }
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn not_writable(path: &Path, e: &io::Error) -> String {
    format!(
        "cannot write {}: {e} (name a cgroup v2 folder the agent may write in runtime.process_cgroup, or \"off\")",
        path.display()
    )
}

fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A module's limits, as the shim applies them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub nano_cpus: Option<i64>,
    pub pids: Option<i64>,
}

/// What [`apply`] did: the limits it set and those it could not.
#[derive(Debug, Default)]
pub struct Applied {
    pub set: Vec<String>,
    pub failed: Vec<(&'static str, String)>,
}

/// The shim inside a module's cgroup while it forks the module, which then starts there (no
/// code runs between fork and exec: the workspace has no `unsafe`, so no `pre_exec`).
#[derive(Debug)]
pub struct Joined {
    /// The module's cgroup.
    pub dir: PathBuf,
    /// Where the shim was, and goes back to.
    back: PathBuf,
    /// The module's pids limit, set once the shim has left (the shim and the forked module
    /// count together until then).
    pids: Option<i64>,
}

impl Joined {
    pub fn enter(dir: &Path, pids: Option<i64>) -> io::Result<Joined> {
        let (_, back) = own_cgroup().map_err(io::Error::other)?;
        if let Some(n) = pids
            && dir.join("pids.max").exists()
        {
            // Room for the shim beside the module for the moment of the fork.
            std::fs::write(dir.join("pids.max"), n.saturating_add(1).to_string())?;
        }
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(Joined {
            dir: dir.to_path_buf(),
            back,
            pids,
        })
    }

    /// The shim back where it was; the module's own pids limit in force.
    pub fn leave(&self) {
        let _ = std::fs::write(
            self.back.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        if let Some(n) = self.pids {
            let _ = std::fs::write(self.dir.join("pids.max"), n.to_string());
        }
    }
}

/// Makes the module's cgroup `dir` (kept across its restarts) and writes its limits. A limit
/// not asked for is reset to `max`, so a changed module never keeps an old one.
pub fn apply(dir: &Path, limits: &Limits) -> Applied {
    let mut applied = Applied::default();
    if let Err(e) = make_dir(dir) {
        for what in ["memory", "pids", "cpus"] {
            applied
                .failed
                .push((what, format!("cannot make {}: {e}", dir.display())));
        }
        return applied;
    }
    let asked = [
        (
            "memory",
            "memory.max",
            limits.memory_bytes.map(|b| {
                let shown = format!("memory {} MiB (cgroup v2 memory.max)", b >> 20);
                (b.to_string(), shown)
            }),
        ),
        (
            "pids",
            "pids.max",
            limits
                .pids
                .map(|n| (n.to_string(), format!("pids {n} (cgroup v2 pids.max)"))),
        ),
        (
            "cpus",
            "cpu.max",
            limits.nano_cpus.map(|n| {
                let shown = format!("cpus {:.2} (cgroup v2 cpu.max)", n as f64 / 1e9);
                (cpu_max(n), shown)
            }),
        ),
    ];
    for (what, file, asked) in asked {
        let path = dir.join(file);
        match asked {
            Some((value, shown)) if path.exists() => match std::fs::write(&path, value) {
                Ok(()) => applied.set.push(shown),
                Err(e) => applied.failed.push((what, format!("{file}: {e}"))),
            },
            Some(_) => applied
                .failed
                .push((what, format!("no {file} (controller not enabled)"))),
            // Not asked: no limit, so a module whose limit was dropped does not keep it.
            None if path.exists() => {
                let _ = std::fs::write(&path, "max");
            }
            None => {}
        }
    }
    if limits.memory_bytes.is_some() {
        // The whole module goes at once when it runs out, as a container does.
        let _ = std::fs::write(dir.join("memory.oom.group"), "1");
    }
    applied
}

/// `cpu.max` for a share of CPUs in billionths (Docker's `NanoCpus`): quota and period.
pub fn cpu_max(nano_cpus: i64) -> String {
    // The kernel refuses a quota under 1 ms.
    let quota = (nano_cpus.saturating_mul(CPU_PERIOD_US) / 1_000_000_000).max(1_000);
    format!("{quota} {CPU_PERIOD_US}")
}

/// How many times the kernel's OOM killer struck in the cgroup `dir` (`memory.events`).
pub fn oom_kills(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Kills every process left in the cgroup `dir` (`cgroup.kill`, Linux 5.14+): what a module
/// started outside its process group goes with it. Quietly nothing where the kernel has none.
pub fn kill_all(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
}

/// Removes the module's cgroup once its processes are gone (a few tries: the kernel frees it
/// a moment after the last exits).
pub async fn remove(dir: &Path) {
    if !dir.exists() {
        return;
    }
    kill_all(dir);
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    tracing::debug!(cgroup = %dir.display(), "a module's cgroup could not be removed: still busy");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_ones() {
        let hybrid = "\
35 25 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 25 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw"), None);
    }

    #[test]
    fn cpu_shares_become_a_quota_per_period() {
        assert_eq!(cpu_max(500_000_000), "50000 100000");
        assert_eq!(cpu_max(2_000_000_000), "200000 100000");
        // Below the kernel's 1 ms floor: the floor.
        assert_eq!(cpu_max(1_000), "1000 100000");
    }

    #[test]
    fn off_and_a_folder_that_is_no_cgroup_say_why() {
        assert!(prepare(&Setting::Off).unwrap_err().contains("off"));
        let dir = tempfile::tempdir().expect("a temporary folder");
        let why = prepare(&Setting::Path(dir.path().join("outpost"))).unwrap_err();
        assert!(why.contains("is not in a cgroup v2 file system"), "{why}");
    }
}
