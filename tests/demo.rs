//! `outpost demo`, the README's first command, as a person runs it after `cargo build`: with
//! the Docker engine (the module as a container, its image built on the spot) and without one
//! (the agent pointed at no engine: the module as a process). Each time: the deployment is
//! applied through the hub, inferences answer, telemetry reaches the hub, and when it ends —
//! at Ctrl-C, or after `--once` — nothing of it is left running. Without a hub broker
//! (`--no-hub`, what happens without Mosquitto) the deployment goes through the local API.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outpost_e2e::*;

/// The demo's lines as they come, on a channel.
fn lines(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn until(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let done = line.contains(what);
            seen.push(line);
            if done {
                return;
            }
        }
    }
    panic!(
        "`{what}` not within {within:?}; the demo said:\n{}",
        seen.join("\n")
    );
}

/// Nothing of the demo runs: no process naming its folder, no container of its device.
fn nothing_left(device: &str, folder: &str) {
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(folder))
        .collect();
    assert!(procs.is_empty(), "left running: {procs:?}");
    assert!(
        containers(device).is_empty(),
        "containers left: {:?}",
        containers(device)
    );
}

fn device_and_folder(seen: &[String]) -> (String, String) {
    let line = seen
        .iter()
        .find(|l| l.contains("started as device"))
        .expect("the agent's line");
    let device = line
        .split("as device ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .expect("a device")
        .to_string();
    let folder = line
        .split("state in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("a folder")
        .trim_end_matches("/state")
        .to_string();
    (device, folder)
}

#[test]
fn without_an_engine_the_module_runs_as_a_process_until_ctrl_c() {
    require("mosquitto", "apt-get install mosquitto");
    infer_bin();
    let started = Instant::now();
    let mut demo = Command::new(outpost_bin())
        .args(["demo", "--runtime", "process"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("outpost demo");
    let rx = lines(&mut demo);
    let mut seen = Vec::new();
    until(
        &rx,
        &mut seen,
        "applied; module infer: running",
        Duration::from_secs(60),
    );
    until(
        &rx,
        &mut seen,
        "inference 3: score",
        Duration::from_secs(30),
    );
    until(
        &rx,
        &mut seen,
        "telemetry at the hub",
        Duration::from_secs(30),
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "inference results within a minute"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("no container") || l.contains("native process"))
    );
    let (device, folder) = device_and_folder(&seen);
    // Ctrl-C.
    run(Command::new("kill").args(["-INT", &demo.id().to_string()]));
    until(
        &rx,
        &mut seen,
        "nothing of the demo is left running",
        Duration::from_secs(30),
    );
    let status = demo.wait().expect("exit");
    assert!(status.success(), "{status}: {}", seen.join("\n"));
    nothing_left(&device, &folder);
}

#[test]
fn with_an_engine_the_module_runs_as_a_container() {
    require("mosquitto", "apt-get install mosquitto");
    require_docker();
    infer_bin();
    let out = Command::new(outpost_bin())
        .args(["demo", "--once"])
        .output()
        .expect("outpost demo");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<String> = text.lines().map(String::from).collect();
    for expected in [
        "the module runs as a container",
        "applied; module infer: running",
        "inference 1: score",
        "telemetry at the hub",
        "nothing of the demo is left running",
    ] {
        assert!(text.contains(expected), "no `{expected}` in:\n{text}");
    }
    let (device, folder) = device_and_folder(&seen);
    nothing_left(&device, &folder);
}

#[test]
fn without_a_hub_broker_the_deployment_goes_through_the_local_api() {
    infer_bin();
    let out = Command::new(outpost_bin())
        .args(["demo", "--runtime", "process", "--no-hub", "--once"])
        .output()
        .expect("outpost demo");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "hub: none",
        "accepted by the agent's local API",
        "deployment 1: applied",
        "inference 3: score",
        "nothing of the demo is left running",
    ] {
        assert!(text.contains(expected), "no `{expected}` in:\n{text}");
    }
    let seen: Vec<String> = text.lines().map(String::from).collect();
    let (device, folder) = device_and_folder(&seen);
    nothing_left(&device, &folder);
}
