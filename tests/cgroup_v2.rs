//! Process modules' limits in cgroup v2, on a real kernel that offers it.
//!
//! This machine's kernel binds every controller to cgroup v1, so the test boots a small VM
//! (QEMU, Debian's cloud kernel, an initramfs made here of busybox and the agent binary with
//! its libraries) whose init mounts cgroup v2, runs `outpost run` with the process runtime,
//! deploys three process modules with limits and prints what the agent and the kernel say. The
//! VM is emulated (TCG): nested KVM on this machine fails with "KVM internal error".
//!
//! What it asserts: the agent finds cgroup v2 and says so (and `outpost check` too); each
//! module runs in a cgroup of its own with `memory.max`, `pids.max` and `cpu.max` from its
//! manifest and its process alone in it, and stays there, adopted, across a `kill -9` of the
//! agent and its restart; a module past its memory limit is killed by the kernel (exit 137,
//! `oomKilled`, `lastError` out of memory); a module that forks past its pids limit is held at
//! it (20 forks asked, at most 5 processes), and what a run left behind goes with it.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_e2e::*;

/// The kernel the VM boots: `OUTPOST_VM_KERNEL`, or the one scripts/setup unpacks.
fn kernel() -> Option<PathBuf> {
    let path = std::env::var_os("OUTPOST_VM_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/outpost-vm/vmlinuz"));
    path.is_file().then_some(path)
}

/// Copies `bin` into `root` at the same path, with the shared libraries `ldd` names.
fn install_with_libraries(root: &Path, bin: &Path, at: &str) {
    let target = root.join(at.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().expect("a folder")).expect("mkdir");
    // Without its debug information: a smaller initramfs boots faster under emulation.
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin)
        .arg(&target)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(bin, &target).expect("copy the binary");
    }
    let ldd = run(Command::new("ldd").arg(bin));
    for lib in ldd.lines().filter_map(|l| {
        let l = l.trim();
        let path = l
            .split("=>")
            .nth(1)
            .unwrap_or(l)
            .split_whitespace()
            .next()?;
        path.starts_with('/').then(|| PathBuf::from(path))
    }) {
        let to = root.join(lib.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(to.parent().expect("a folder")).expect("mkdir");
        std::fs::copy(&lib, &to).expect("copy a library");
    }
}

const CONFIG: &str = r#"device_id = "vm"
state_dir = "/var/lib/outpost"
log_level = "info"
[api]
socket = "/run/outpost.sock"
[runtime]
kind = "process"
stop_grace_secs = 2
[policy]
allowed_executables = ["/bin/"]
[bus]
listen = "127.0.0.1:1884"
"#;

/// Three modules: one held under a memory limit it goes past, one with every limit that
/// sleeps, one that forks past its pids limit.
const MANIFEST: &str = r#"{
  "schemaVersion": "1.0", "id": "limits", "version": 1,
  "modules": {
    "hog": {
      "runtime": "process", "restartPolicy": "never",
      "command": ["/bin/sh", "-c", "echo hog up; exec /bin/dd if=/dev/zero of=/dev/null bs=96M count=2"],
      "resources": { "memoryMb": 32 }
    },
    "capped": {
      "runtime": "process",
      "command": ["/bin/sleep", "600"],
      "resources": { "memoryMb": 64, "cpus": 0.5, "pidsLimit": 8 }
    },
    "forker": {
      "runtime": "process",
      "command": ["/bin/sh", "-c", "i=0; while [ $i -lt 20 ]; do /bin/sleep 600 & i=$((i+1)); done; wait"],
      "resources": { "pidsLimit": 5 }
    }
  }
}"#;

/// The VM's init: mounts, the agent, the deployment, then what the agent and the kernel say,
/// between markers the test reads.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /var/lib/outpost
mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
echo "== controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
/bin/outpost --config /etc/outpost/config.toml run > /tmp/agent.log 2>&1 &
agent=$!
i=0; while [ ! -S /run/outpost.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
/bin/outpost --config /etc/outpost/config.toml deploy --local /manifest.json > /tmp/deploy.log 2>&1
# The hog ends (killed); the forker reaches its limit (its shell gives up on a fork it cannot
# make, and is restarted by its policy).
i=0
while [ $i -lt 600 ]; do
  grep -q oomKilled /var/lib/outpost/processes/proc-*/exit.json 2>/dev/null && grep -q "can't fork" /var/lib/outpost/processes/proc-*/log 2>/dev/null && break
  sleep 0.1; i=$((i+1))
done
echo "== check"
/bin/outpost --config /etc/outpost/config.toml check --json
echo "== end check"
echo "== list"
/bin/outpost --config /etc/outpost/config.toml list --json
echo "== end list"
for d in /var/lib/outpost/processes/proc-*; do
  id=$(basename $d); cg=/sys/fs/cgroup/outpost/$id
  echo "== module $id"
  echo "record $(cat $d/record.json | tr '\n' ' ')"
  echo "run $(cat $d/run.json 2>/dev/null | tr '\n' ' ')"
  echo "exit $(cat $d/exit.json 2>/dev/null | tr '\n' ' ')"
  echo "forks $(grep -c "can't fork" $d/log 2>/dev/null)"
  for f in memory.max pids.max pids.current cpu.max cgroup.procs; do
    echo "$f $(cat $cg/$f 2>/dev/null | tr '\n' ' ')"
  done
done
# The agent killed with -9 and started again: its modules run on in their cgroups, adopted.
capped=$(grep -l '"outpost.vm.capped"' /var/lib/outpost/processes/proc-*/record.json | head -1 | xargs dirname)
echo "capped before kill: $(grep '"pid"' $capped/run.json | tr -dc 0-9)"
kill -9 $agent
rm -f /run/outpost.sock
/bin/outpost --config /etc/outpost/config.toml run >> /tmp/agent.log 2>&1 &
i=0; while [ ! -S /run/outpost.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
i=0
while [ $i -lt 600 ]; do
  /bin/outpost --config /etc/outpost/config.toml list --json 2>/dev/null | grep -q '"applied"' && break
  sleep 0.1; i=$((i+1))
done
echo "capped after restart: $(grep '"pid"' $capped/run.json | tr -dc 0-9) in $(cat /sys/fs/cgroup/outpost/$(basename $capped)/cgroup.procs | tr '\n' ' ')"
echo "== agent log"
cat /tmp/agent.log /tmp/deploy.log
echo "== done"
poweroff -f
"#;

/// The VM's output between `== NAME` and `== end NAME`.
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    out.split(&format!("== {name}\n"))
        .nth(1)
        .and_then(|s| s.split(&format!("== end {name}")).next())
        .unwrap_or_else(|| panic!("no `{name}` in the VM's output:\n{out}"))
        .trim()
}

/// One module's lines of the VM's report: `key value` after `== module ID`.
fn module_report(out: &str, name: &str) -> std::collections::BTreeMap<String, String> {
    out.split("== module ")
        .skip(1)
        .map(|section| {
            section
                .lines()
                .skip(1)
                .take_while(|l| !l.starts_with("=="))
                .filter_map(|l| l.split_once(' '))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        })
        .find(|m| {
            m.get("record").is_some_and(|r| {
                r.contains(&format!("\"outpost.module\":\"{name}\""))
                    || r.contains(&format!("outpost.vm.{name}\""))
            })
        })
        .unwrap_or_else(|| panic!("no report of module {name} in:\n{out}"))
}

#[test]
fn process_modules_get_cgroup_v2_limits_where_the_kernel_offers_them() {
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("the cgroup v2 VM test boots an x86_64 kernel; skipped on this architecture");
        return;
    }
    let Some(kernel) = kernel() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no kernel for the cgroup v2 VM at /var/tmp/outpost-vm/vmlinuz: scripts/setup fetches it"
        );
        eprintln!("no kernel for the cgroup v2 VM (scripts/setup fetches it); skipped");
        return;
    };
    let qemu = require("qemu-system-x86_64", "apt-get install qemu-system-x86");
    let busybox = require("busybox", "apt-get install busybox-static");
    let dir = tempfile::tempdir().expect("a temporary folder");
    let root = dir.path().join("root");
    for d in [
        "bin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "var/lib",
        "etc/outpost",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy(&busybox, root.join("bin/busybox")).expect("busybox");
    install_with_libraries(&root, &outpost_bin(), "/bin/outpost");
    std::fs::write(root.join("etc/outpost/config.toml"), CONFIG).expect("config");
    std::fs::write(root.join("manifest.json"), MANIFEST).expect("manifest");
    std::fs::write(root.join("init"), INIT).expect("init");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let initramfs = dir.path().join("initramfs.cpio");
    run(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | {} cpio -o -H newc > {} 2>/dev/null",
            busybox.display(),
            initramfs.display()
        ))
        .current_dir(&root));

    let started = std::time::Instant::now();
    let out = Command::new("timeout")
        .arg("600")
        .arg(&qemu)
        .args(["-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .output()
        .expect("run qemu");
    let out = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    eprintln!("the VM ran for {:?}:\n{out}", started.elapsed());
    assert!(out.contains("== done"), "the VM did not finish:\n{out}");

    // The agent found cgroup v2 and said so, at both starts (the second found it in place).
    let log = out.split("== agent log").nth(1).unwrap_or_default();
    assert_eq!(
        log.matches("process modules' limits limits=cgroup v2 under /sys/fs/cgroup/outpost (memory, pids, cpu)")
            .count(),
        2,
        "{out}"
    );

    // `outpost check` says so too, before and after (it only reads).
    let check: serde_json::Value =
        serde_json::from_str(section(&out, "check")).expect("check --json");
    let finding = check["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["check"] == "process-limits"))
        .unwrap_or_else(|| panic!("no process-limits finding: {check}"));
    assert_eq!(finding["level"], "ok", "{finding}");
    assert!(
        finding["message"]
            .as_str()
            .is_some_and(|m| m.contains("cgroup v2 under /sys/fs/cgroup/outpost")),
        "{finding}"
    );

    let capped = module_report(&out, "capped");
    assert_eq!(
        capped["memory.max"],
        (64u64 << 20).to_string(),
        "{capped:?}"
    );
    assert_eq!(capped["pids.max"], "8", "{capped:?}");
    assert_eq!(capped["cpu.max"], "50000 100000", "{capped:?}");
    let run_json: serde_json::Value = serde_json::from_str(&capped["run"]).expect("run.json");
    let limits = run_json["limits"].as_str().unwrap_or_default();
    for said in [
        "memory 64 MiB (cgroup v2 memory.max)",
        "pids 8 (cgroup v2 pids.max)",
        "cpus 0.50 (cgroup v2 cpu.max)",
    ] {
        assert!(limits.contains(said), "{limits}");
    }
    assert!(!limits.contains("not enforced"), "{limits}");
    // The same process before the agent's kill -9 and after its restart: adopted, not
    // restarted, and still alone in its cgroup.
    let line = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in the VM's output:\n{out}"))
            .trim()
            .to_string()
    };
    let before = line("capped before kill: ");
    assert_eq!(run_json["pid"].to_string(), before, "{capped:?}");
    assert_eq!(
        line("capped after restart: "),
        format!("{before} in {before}"),
        "{out}"
    );
    // The module's process is in its cgroup (and its shim is not).
    let procs: Vec<&str> = capped["cgroup.procs"].split_whitespace().collect();
    assert_eq!(
        procs,
        [run_json["pid"].to_string().as_str()],
        "the module alone in its cgroup: {capped:?}"
    );

    // Past its memory limit: killed by the kernel, and the agent knows why.
    let hog = module_report(&out, "hog");
    let exit: serde_json::Value = serde_json::from_str(&hog["exit"]).expect("the hog's exit.json");
    assert_eq!(exit["code"], 137, "{hog:?}");
    assert_eq!(exit["oomKilled"], true, "{hog:?}");

    // Forking past its pids limit: held at it (its shell says it cannot fork).
    let forker = module_report(&out, "forker");
    let current: u32 = forker["pids.current"].parse().expect("pids.current");
    assert!(current <= 5, "{forker:?}");
    assert_eq!(forker["pids.max"], "5", "{forker:?}");
    assert_ne!(forker["forks"], "0", "{forker:?}");
    // What a run left behind went with it: the forker's cgroup holds only its latest run's
    // processes (pids in this VM only grow), not every earlier run's sleeps.
    let run_json: serde_json::Value =
        serde_json::from_str(&forker["run"]).expect("the forker's run.json");
    let latest = run_json["pid"].as_u64().expect("a pid");
    for pid in forker["cgroup.procs"].split_whitespace() {
        let pid: u64 = pid.parse().expect("a pid");
        assert!(
            pid >= latest,
            "pid {pid} is from an earlier run than {latest}: {forker:?}"
        );
    }

    // The reported state: the hog ended by the kernel, and why; the capped module runs.
    let state: serde_json::Value =
        serde_json::from_str(section(&out, "list")).expect("list --json");
    assert_eq!(state["modules"]["hog"]["exitCode"], 137, "{state}");
    assert!(
        state["modules"]["hog"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("out of memory")),
        "{state}"
    );
    assert_eq!(state["modules"]["capped"]["status"], "running", "{state}");
}
