//! `outpost shim DIR`: what stands between a process module and the agent, as containerd's
//! shim does for a container. The agent starts one per start of the module, in a process group
//! of its own; the shim applies the limits, starts the module (in its own group as well, so a
//! stop reaches its children), writes `run.json`, copies its output into the rotated log,
//! waits for it, and writes `exit.json`. The agent can stop, restart or `kill -9` itself
//! meanwhile: the module and its shim run on, and the next agent reads their files.
//!
//! Plain threads, no async runtime: the shim is small and lives as long as its module.

use std::io::{BufRead as _, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use super::files::{self, EXIT, Exit, RECORD, RUN, Record, Run};
use super::logs::LogWriter;

/// The `PATH` a module gets when its environment names none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts the shim for `dir` in a process group of its own and returns at once (its exit
/// code: 0 when started): the shim's parent is then not the agent, which `wait`s for this.
pub fn detach(dir: &Path) -> u8 {
    use std::os::unix::process::CommandExt as _;
    let Ok(me) = std::env::current_exe() else {
        return 1;
    };
    let started = Command::new(me)
        .arg("shim")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group: a signal to the agent's group (a terminal's Ctrl-C) is not the
        // module's.
        .process_group(0)
        .spawn();
    match started {
        // Not waited for: it is handed to init (or the service's subreaper) when this exits.
        Ok(_) => 0,
        Err(e) => {
            fail(dir, format!("cannot start its shim: {e}"));
            1
        }
    }
}

/// Runs the module whose record is in `dir` until it exits; returns the shim's exit code.
pub fn run(dir: &Path) -> u8 {
    let record: Record = match files::read(&dir.join(RECORD)) {
        Ok(Some(r)) => r,
        other => {
            eprintln!("outpost shim: no record in {}: {other:?}", dir.display());
            return 1;
        }
    };
    let log = match LogWriter::open(dir, record.log_max_bytes, record.log_max_files) {
        Ok(l) => Arc::new(Mutex::new(l)),
        Err(e) => {
            fail(
                dir,
                format!("cannot open its log in {}: {e}", dir.display()),
            );
            return 1;
        }
    };
    let (limits, join) = apply_limits(&record);
    let ooms_before = join.as_ref().map(|j| super::cgroup::oom_kills(&j.dir));
    let mut command = Command::new(&record.executable);
    command
        .args(&record.args)
        .env_clear()
        .current_dir(&record.working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !record.env.iter().any(|e| e.starts_with("PATH=")) {
        command.env("PATH", DEFAULT_PATH);
    }
    for pair in &record.env {
        if let Some((k, v)) = pair.split_once('=') {
            command.env(k, v);
        }
    }
    {
        use std::os::unix::process::CommandExt as _;
        command.process_group(0);
        // Set in the child between fork and exec: the module never runs as root, not even
        // for a moment; std also drops the shim's supplementary groups.
        if let Some(user) = record.user {
            command.uid(user.uid).gid(user.gid);
        }
    }
    let spawned = command.spawn();
    // The module is in its cgroup from its fork on; the shim goes back where it was, so its
    // own memory and threads are not the module's.
    if let Some(joined) = &join {
        joined.leave();
    }
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let mut why = format!("cannot start {}: {e}", record.executable);
            if let (Some(user), Some(1)) = (record.user, e.raw_os_error()) {
                why.push_str(&super::user::not_permitted(user));
            }
            if let Ok(mut l) = log.lock() {
                let _ = l.line("stderr", format!("outpost: {why}").as_bytes());
            }
            fail(dir, why);
            return 1;
        }
    };
    // Known right after the spawn: the child exists until it is waited for.
    let pid = child.id() as i32;
    let run = Run {
        pid,
        start_ticks: files::start_ticks(pid).unwrap_or_default(),
        boot_id: files::boot_id(),
        started_at: outpost_core::time::unix_now(),
        limits,
    };
    if let Err(e) = files::write(&dir.join(RUN), &run) {
        eprintln!("outpost shim: cannot write {RUN}: {e}");
    }
    let pumps: Vec<_> = [
        child.stdout.take().map(|o| pump(o, "stdout", log.clone())),
        child.stderr.take().map(|e| pump(e, "stderr", log.clone())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let status = child.wait();
    // What the module left behind goes with it, as a container's processes go with its first
    // one: its cgroup, or else its process group. Left running, they would hold its output
    // open (the shim waiting on them, its exit never written) and its pids limit taken.
    if let Some(joined) = &join {
        super::cgroup::kill_all(&joined.dir);
    }
    super::signal_group(pid, rustix::process::Signal::KILL);
    for p in pumps {
        let _ = p.join();
    }
    let exit = match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt as _;
            Exit {
                code: status
                    .code()
                    .map(i64::from)
                    .or_else(|| status.signal().map(|s| 128 + i64::from(s)))
                    .unwrap_or(-1),
                signal: status.signal(),
                finished_at: outpost_core::time::unix_now(),
                error: None,
                oom_killed: match (&join, ooms_before) {
                    (Some(j), Some(before)) => super::cgroup::oom_kills(&j.dir) > before,
                    _ => false,
                },
            }
        }
        Err(e) => Exit {
            code: -1,
            signal: None,
            finished_at: outpost_core::time::unix_now(),
            error: Some(format!("cannot wait for it: {e}")),
            oom_killed: false,
        },
    };
    if let Err(e) = files::write(&dir.join(EXIT), &exit) {
        eprintln!("outpost shim: cannot write {EXIT}: {e}");
        return 1;
    }
    0
}

/// Records a start that did not happen.
fn fail(dir: &Path, error: String) {
    let _ = files::write(
        &dir.join(EXIT),
        &Exit {
            code: 127,
            signal: None,
            finished_at: outpost_core::time::unix_now(),
            error: Some(error),
            oom_killed: false,
        },
    );
}

/// Copies one output stream into the log, line by line.
fn pump(
    out: impl Read + Send + 'static,
    stream: &'static str,
    log: Arc<Mutex<LogWriter>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if let Ok(mut l) = log.lock() {
                        let _ = l.line(stream, &line);
                    }
                }
            }
        }
    })
}

/// Applies the module's limits: in its cgroup v2 when it has one ([`super::cgroup`]);
/// otherwise (or for a limit its cgroup could not take) the memory limit as `RLIMIT_DATA`
/// (heap and private writable mappings) on the shim, which the module inherits, and CPU and
/// pids not at all. Returns what applied, said for the log and the operator, and the cgroup
/// the shim has entered so that the module it forks starts there.
fn apply_limits(record: &Record) -> (String, Option<super::cgroup::Joined>) {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let mut applied = Vec::new();
    let mut not = Vec::new();
    let mut join = None;
    let mut cgroup_failed: Vec<(&str, String)> = Vec::new();
    if let Some(dir) = &record.cgroup {
        let done = super::cgroup::apply(
            dir,
            &super::cgroup::Limits {
                memory_bytes: record.memory_bytes,
                nano_cpus: record.nano_cpus,
                pids: record.pids_limit,
            },
        );
        match super::cgroup::Joined::enter(dir, record.pids_limit) {
            Ok(joined) => {
                applied.extend(done.set);
                cgroup_failed = done.failed;
                join = Some(joined);
            }
            // Not in it, none of its limits hold: the fallbacks below say so.
            Err(e) => {
                for what in ["memory", "pids", "cpus"] {
                    cgroup_failed.push((what, format!("cannot join {}: {e}", dir.display())));
                }
            }
        }
    }
    let failed = |what: &str| {
        cgroup_failed
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, why)| why.clone())
    };
    let no_cgroup = record.cgroup.is_none();
    if let Some(bytes) = record.memory_bytes
        && (no_cgroup || failed("memory").is_some())
    {
        let limit = Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        };
        let why = failed("memory")
            .map(|w| format!("; cgroup: {w}"))
            .unwrap_or_default();
        match setrlimit(Resource::Data, limit) {
            Ok(()) => applied.push(format!("memory {} MiB (RLIMIT_DATA{why})", bytes >> 20)),
            Err(e) => not.push(format!("memory (setrlimit: {e}{why})")),
        }
    }
    for (what, asked) in [
        ("cpus", record.nano_cpus.is_some()),
        ("pids", record.pids_limit.is_some()),
    ] {
        if !asked {
            continue;
        }
        if no_cgroup {
            not.push(format!("{what} (needs cgroup v2: runtime.process_cgroup)"));
        } else if let Some(why) = failed(what) {
            not.push(format!("{what} (cgroup: {why})"));
        }
    }
    let limits = match (applied.is_empty(), not.is_empty()) {
        (true, true) => "none asked".to_string(),
        (false, true) => format!("applied: {}", applied.join(", ")),
        (true, false) => format!("not enforced: {}", not.join(", ")),
        (false, false) => format!(
            "applied: {}; not enforced: {}",
            applied.join(", "),
            not.join(", ")
        ),
    };
    (limits, join)
}
