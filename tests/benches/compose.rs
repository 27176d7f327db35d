//! Benchmark: Outpost against docker-compose (Debian's 1.29.2) deploying, updating and
//! removing 10 modules, for two kinds of module:
//!
//! - 10 that **ignore SIGTERM** (Debian's static busybox running `sleep 3600` as PID 1), the
//!   common real-world case: every stop waits out the whole grace period;
//! - 10 that **exit on SIGTERM** (the test module), where stopping is cheap.
//!
//! Operations: **deploy** (images already on the engine; Outpost: `outpost deploy --local` until
//! it answers `applied`; compose: `docker-compose up -d`), **update** all 10 (an environment
//! change: Outpost's next manifest version; compose: the file edited, `up -d` again) and
//! **remove** all 10 (Outpost: a deployment with no modules; compose: `down`). Both have the
//! same stop grace (agent `stop_grace_secs = 10`, compose `stop_grace_period: 10s`); compose
//! runs with its own defaults otherwise (its own project name and network) and nothing waits on
//! its side: each operation is timed from the command's start to its exit, for both peers.
//! Both peers run in the same run, the one going first alternating from round to round; every
//! round starts clean (a fresh agent and device id, a fresh compose project) and cleans up.
//!
//! Prints the median of `BENCH_RUNS` rounds (default 3) per kind and operation, and the ratio
//! Outpost / compose.
//!
//! ```sh
//! cargo build --release -p outpost-agent
//! OUTPOST_BIN=$CARGO_TARGET_DIR/release/outpost cargo bench -p outpost-e2e --bench compose
//! ```
//! Needs the Docker engine, `docker-compose` and `busybox-static` (scripts/setup installs them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use outpost_e2e::*;
use serde_json::json;

const MODULES: usize = 10;
const GRACE_SECS: u64 = 10;
/// Outpost's deploy waits at most this long for `applied` (ten serial 10 s stops fit).
const WAIT_SECS: u64 = 600;
const OPS: [&str; 3] = ["deploy", "update", "remove"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    IgnoresSigterm,
    ExitsOnSigterm,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::IgnoresSigterm => "ignore SIGTERM",
            Kind::ExitsOnSigterm => "exit on SIGTERM",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Kind::IgnoresSigterm => "ign",
            Kind::ExitsOnSigterm => "exit",
        }
    }
    fn image(self) -> &'static str {
        match self {
            Kind::IgnoresSigterm => "outpost-bench/busybox-sleep:1",
            Kind::ExitsOnSigterm => "outpost-bench/testmod:1",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Outpost,
    Compose,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let started = Instant::now();
    let out = f();
    (started.elapsed().as_secs_f64(), out)
}

/// One Outpost round: a fresh agent, v1 (10 modules), v2 (every module's environment
/// changed), v3 (no modules). Seconds per operation.
fn outpost_round(kind: Kind, round: usize) -> [f64; 3] {
    let device = format!(
        "bench-compose-{}-{}-{round}",
        std::process::id(),
        kind.short()
    );
    let agent =
        Agent::start_configured(&device, "", &format!("stop_grace_secs = {GRACE_SECS}"), "");
    let manifest = |version: u64, modules: usize| {
        let modules: serde_json::Map<String, serde_json::Value> = (0..modules)
            .map(|i| {
                let env = json!({ "ROUND": version.to_string() });
                (
                    format!("m{i}"),
                    json!({ "image": kind.image(), "env": env }),
                )
            })
            .collect();
        json!({ "schemaVersion": "1.0", "id": "bench-compose", "version": version, "modules": modules })
    };
    let running = |device: &str| -> BTreeSet<String> {
        containers(device)
            .into_iter()
            .filter(|(_, _, state, _)| state == "running")
            .map(|(_, id, _, _)| id)
            .collect()
    };
    let mut times = [0.0; 3];
    for (op, version, modules) in [(0, 1, MODULES), (1, 2, MODULES), (2, 3, 0)] {
        let before = running(&device);
        let (secs, (code, output)) = timed(|| agent.deploy(&manifest(version, modules), WAIT_SECS));
        assert_eq!(code, 0, "outpost {} (v{version}) failed: {output}", OPS[op]);
        let after = running(&device);
        assert_eq!(after.len(), modules, "outpost {}: {after:?}", OPS[op]);
        if op == 1 {
            assert!(
                before.is_disjoint(&after),
                "outpost update replaced every container"
            );
        }
        times[op] = secs;
    }
    assert!(
        containers(&device).is_empty(),
        "outpost remove left containers"
    );
    times
}

/// A compose project, taken down (without waiting) however the round ends.
struct Project {
    name: String,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Project {
    fn new(kind: Kind, round: usize) -> Project {
        let dir = tempfile::tempdir().expect("compose dir");
        Project {
            name: format!("outpostbench{}{}{round}", std::process::id(), kind.short()),
            file: dir.path().join("docker-compose.yml"),
            _dir: dir,
        }
    }

    /// The compose file: `MODULES` services, the stop grace, one environment value.
    fn write(&self, kind: Kind, round_value: &str) {
        let mut yaml = String::from("version: \"2.4\"\nservices:\n");
        for i in 0..MODULES {
            yaml.push_str(&format!(
                "  m{i}:\n    image: {}\n    stop_grace_period: {GRACE_SECS}s\n    environment:\n      ROUND: \"{round_value}\"\n",
                kind.image()
            ));
        }
        std::fs::write(&self.file, yaml).expect("write compose file");
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(&self.file)
            .args(args);
        cmd
    }

    /// Runs `docker-compose ARGS` and times it from start to exit.
    fn timed(&self, args: &[&str]) -> f64 {
        let mut cmd = self.command(args);
        let (secs, out) = timed(|| cmd.output().expect("run docker-compose"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Compose 1.29 sometimes fails to remove its network right after removing the
        // containers ("has active endpoints", a race in the engine): the containers are gone, so
        // the time stands; the network is removed by a second `down`, not timed.
        if !out.status.success() && args == ["down"] && stderr.contains("has active endpoints") {
            let _ = self.command(&["down"]).output();
            return secs;
        }
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed: {stderr}"
        );
        secs
    }

    fn running(&self) -> BTreeSet<String> {
        run(Command::new("docker").args([
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            "status=running",
        ]))
        .lines()
        .map(str::to_string)
        .collect()
    }

    fn all(&self) -> usize {
        run(Command::new("docker").args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
        ]))
        .lines()
        .count()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .command(&["down", "-t", "0", "--remove-orphans"])
            .output();
    }
}

/// One compose round: `up -d`, the file edited and `up -d`, `down`.
fn compose_round(kind: Kind, round: usize) -> [f64; 3] {
    let project = Project::new(kind, round);
    project.write(kind, "1");
    let deploy = project.timed(&["up", "-d"]);
    let first = project.running();
    assert_eq!(first.len(), MODULES, "compose up: {first:?}");
    project.write(kind, "2");
    let update = project.timed(&["up", "-d"]);
    let second = project.running();
    assert_eq!(second.len(), MODULES, "compose update: {second:?}");
    assert!(
        first.is_disjoint(&second),
        "compose update replaced every container"
    );
    let remove = project.timed(&["down"]);
    assert_eq!(project.all(), 0, "compose down left containers");
    [deploy, update, remove]
}

fn version(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    require_docker();
    require("docker-compose", "apt-get install docker-compose");
    let rounds: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    sigterm_ignoring_image(Kind::IgnoresSigterm.image());
    local_test_image(Kind::ExitsOnSigterm.image(), "");
    let outpost = outpost_bin();
    assert!(
        Path::new(&outpost).is_file(),
        "{} is missing",
        outpost.display()
    );
    eprintln!(
        "outpost: {}; docker-compose {}; engine {}; rounds: {rounds}",
        outpost.display(),
        version(Command::new("docker-compose").args(["version", "--short"])),
        version(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"])),
    );

    let kinds = [Kind::IgnoresSigterm, Kind::ExitsOnSigterm];
    // [kind][peer][op] -> seconds of each round.
    let mut times = vec![
        [
            [Vec::new(), Vec::new(), Vec::new()],
            [Vec::new(), Vec::new(), Vec::new()]
        ];
        kinds.len()
    ];
    let started = Instant::now();
    for round in 0..rounds {
        for (k, &kind) in kinds.iter().enumerate() {
            let order = if (round + k) % 2 == 0 {
                [Peer::Outpost, Peer::Compose]
            } else {
                [Peer::Compose, Peer::Outpost]
            };
            for peer in order {
                let t = match peer {
                    Peer::Outpost => outpost_round(kind, round),
                    Peer::Compose => compose_round(kind, round),
                };
                eprintln!(
                    "round {round}, {:<15} {:<8} deploy {:7.2} s  update {:7.2} s  remove {:7.2} s",
                    kind.label(),
                    format!("{peer:?}"),
                    t[0],
                    t[1],
                    t[2]
                );
                let p = usize::from(peer == Peer::Compose);
                for op in 0..3 {
                    times[k][p][op].push(t[op]);
                }
            }
        }
    }
    println!(
        "{MODULES} modules per kind, stop grace {GRACE_SECS} s, median of {rounds} rounds ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<16} {:<7} {:>12} {:>12} {:>16}",
        "modules", "op", "outpost", "compose", "outpost/compose"
    );
    for (k, kind) in kinds.iter().enumerate() {
        for (op, name) in OPS.iter().enumerate() {
            let (o, c) = (median(&times[k][0][op]), median(&times[k][1][op]));
            println!(
                "{:<16} {:<7} {:>10.2} s {:>10.2} s {:>16.2}",
                kind.label(),
                name,
                o,
                c,
                o / c
            );
        }
    }
}
