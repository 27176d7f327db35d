//! Artifacts on the real engine: files a deployment pins by URL, SHA-256 and size, served over
//! HTTP by the test's file server, fetched and verified by the real agent, and read by busybox
//! modules at `/outpost/artifacts/NAME`.
//!
//! - A new digest reaches a running module as a swapped link: it reads the new content with
//!   the same container (no restart).
//! - A wrong digest fails the module with a reason naming SHA-256; the running container and
//!   the content it reads are left as they were.
//! - An artifact two modules read is stored once; one no deployment names any more is removed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// `sha256sum` of `content`, through the agent's own digest code.
fn sha256(dir: &Path, content: &[u8]) -> String {
    let file = dir.join("digest-input");
    std::fs::write(&file, content).expect("write");
    outpost_agent::fetch::digest_of(&file).expect("digest").0
}

/// Writes `content` into the test's folder and serves it at `/name`; returns the artifact.
fn artifact(server: &FileServer, dir: &Path, name: &str, content: &[u8]) -> Value {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write the artifact");
    json!({ "url": server.serve(name, path), "sha256": sha256(dir, content), "size": content.len() })
}

fn manifest(version: u64, artifacts: Value, modules: Value) -> Value {
    json!({ "schemaVersion": "1.0", "id": "artifacts", "version": version,
            "artifacts": artifacts, "modules": modules })
}

/// A busybox module that prints its `model` artifact every 200 ms.
fn reader(image: &str, artifact: &str) -> Value {
    json!({ "image": image, "artifacts": [artifact], "createOptions": { "Cmd": ["sh", "-c",
        format!("while true; do cat /outpost/artifacts/{artifact}; echo; sleep 0.2; done")] } })
}

fn container_id(device: &str, module: &str) -> Option<String> {
    containers(device)
        .into_iter()
        .find(|(m, _, state, _)| m == module && state == "running")
        .map(|(_, id, _, _)| id)
}

/// The last line the module printed.
fn last_line(id: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", "--tail", "2", id])
        .output()
        .expect("docker logs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string()
}

fn inspect(id: &str, format: &str) -> String {
    run(Command::new("docker").args(["inspect", "--format", format, id]))
        .trim()
        .to_string()
}

fn stored(agent: &Agent) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(agent.state_dir().join("artifacts/sha256"))
        .map(|d| d.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn a_new_model_is_swapped_into_the_running_module_and_a_wrong_digest_changes_nothing() {
    let image = "outpost-test/busybox:artifacts-swap";
    busybox_image(image);
    let server = FileServer::start();
    let dir = tempfile::tempdir().expect("dir");
    let device = format!("art-swap-{}", std::process::id());
    let agent = Agent::start(&device, "");

    let model_a = artifact(&server, dir.path(), "model-a", b"model A");
    let v1 = manifest(
        1,
        json!({ "model": model_a }),
        json!({ "reader": reader(image, "model") }),
    );
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "{out}");
    let id = wait_for("the module", MINUTE, || container_id(&device, "reader"));
    wait_for("the module to read model A", MINUTE, || {
        (last_line(&id) == "model A").then_some(())
    });
    let started = inspect(&id, "{{.State.StartedAt}}");
    assert!(
        inspect(&id, "{{json .Config.Env}}").contains("OUTPOST_ARTIFACTS_DIR=/outpost/artifacts")
    );
    let mounts = inspect(&id, "{{json .Mounts}}");
    assert!(
        mounts.contains(r#""Destination":"/outpost/artifacts","Mode":"ro""#)
            && mounts.contains(r#""RW":false"#),
        "a read-only folder bind: {mounts}"
    );

    // A new model: a new digest under the same name.
    let model_b = artifact(&server, dir.path(), "model-b", b"model B");
    let v2 = manifest(
        2,
        json!({ "model": model_b }),
        json!({ "reader": reader(image, "model") }),
    );
    let (code, out) = agent.deploy(&v2, 120);
    assert_eq!(code, 0, "{out}");
    wait_for("the module to read model B", MINUTE, || {
        (last_line(&id) == "model B").then_some(())
    });
    assert_eq!(
        container_id(&device, "reader").as_deref(),
        Some(id.as_str()),
        "the same container"
    );
    assert_eq!(
        inspect(&id, "{{.State.StartedAt}}"),
        started,
        "not restarted"
    );
    assert_eq!(inspect(&id, "{{.RestartCount}}"), "0");
    // Model A is no longer named by the deployment in force nor the last good one.
    let b_digest = model_b["sha256"].as_str().expect("digest").to_string();
    wait_for("model A to be collected", MINUTE, || {
        (stored(&agent) == [agent.state_dir().join("artifacts/sha256").join(&b_digest)])
            .then_some(())
    });

    // A deployment pinning a digest the server's file does not have.
    let mut wrong = artifact(&server, dir.path(), "model-c", b"model C");
    wrong["sha256"] = json!(sha256(dir.path(), b"what the operator meant"));
    let v3 = manifest(
        3,
        json!({ "model": wrong }),
        json!({ "reader": reader(image, "model") }),
    );
    let (code, out) = agent.deploy(&v3, 60);
    assert_ne!(code, 0, "a wrong digest was applied: {out}");
    assert!(
        out.contains("SHA-256"),
        "the reason names the digest: {out}"
    );
    let state = agent.state();
    assert_eq!(state["deployment"]["version"], 3);
    assert_eq!(state["deployment"]["status"], "failed", "{state:#}");
    let module = &state["modules"]["reader"];
    assert_eq!(module["status"], "failed", "{state:#}");
    let error = module["lastError"].as_str().unwrap_or_default();
    assert!(
        error.contains("SHA-256") && error.contains("artifact `model`"),
        "{error}"
    );
    let reasons = state["deployment"]["reasons"].to_string();
    assert!(reasons.contains("/modules/reader"), "{reasons}");
    // Nothing running was touched: the same container reads model B still.
    assert_eq!(
        container_id(&device, "reader").as_deref(),
        Some(id.as_str())
    );
    assert_eq!(inspect(&id, "{{.State.StartedAt}}"), started);
    assert_eq!(last_line(&id), "model B");
    assert_eq!(
        std::fs::read(agent.state_dir().join("artifacts/modules/reader/model")).expect("link"),
        b"model B"
    );
    assert!(
        !stored(&agent)
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".part")),
        "the wrong file is not kept"
    );
}

#[test]
fn a_shared_artifact_is_stored_once_and_an_unused_one_is_collected() {
    use std::os::unix::fs::MetadataExt as _;

    let image = "outpost-test/busybox:artifacts-shared";
    busybox_image(image);
    let server = FileServer::start();
    let dir = tempfile::tempdir().expect("dir");
    let device = format!("art-shared-{}", std::process::id());
    let agent = Agent::start(&device, "");

    let labels = artifact(&server, dir.path(), "labels-v1", b"cat,dog");
    let detector = artifact(&server, dir.path(), "detector-v1", b"detector v1");
    let v1 = manifest(
        1,
        json!({ "labels": labels, "detector": detector }),
        json!({ "left": reader(image, "labels"), "right": reader(image, "labels"),
                "infer": reader(image, "detector") }),
    );
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "{out}");
    for module in ["left", "right"] {
        let id = wait_for(module, MINUTE, || container_id(&device, module));
        wait_for("the labels", MINUTE, || {
            (last_line(&id) == "cat,dog").then_some(())
        });
    }
    // One file for the two modules: the store's name and two links share an inode.
    let store = agent.state_dir().join("artifacts/sha256");
    let labels_file = store.join(labels["sha256"].as_str().expect("digest"));
    let meta = labels_file.metadata().expect("stored");
    assert_eq!(meta.nlink(), 3);
    for module in ["left", "right"] {
        let link = agent
            .state_dir()
            .join("artifacts/modules")
            .join(module)
            .join("labels");
        assert_eq!(link.metadata().expect("linked").ino(), meta.ino());
    }
    assert_eq!(stored(&agent).len(), 2);

    // `infer` leaves: its detector is named by nobody once this deployment is applied.
    let v2 = manifest(
        2,
        json!({ "labels": labels }),
        json!({ "left": reader(image, "labels"), "right": reader(image, "labels") }),
    );
    let (code, out) = agent.deploy(&v2, 120);
    assert_eq!(code, 0, "{out}");
    wait_for("the detector to be collected", MINUTE, || {
        (stored(&agent) == [labels_file.clone()]).then_some(())
    });
    assert!(
        !agent.state_dir().join("artifacts/modules/infer").exists(),
        "the leaving module's folder goes too"
    );
    assert_eq!(labels_file.metadata().expect("kept").nlink(), 3);
}
