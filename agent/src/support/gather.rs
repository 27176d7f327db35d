//! What the bundle is made of, each piece gathered with a timeout and a size cap: the agent's
//! journal, the state (from the running agent or the store), module logs, engine facts.

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::api::{self, ApiEvent, ApiRequest};
use crate::config::Config;
use crate::runtime::{DockerRuntime, LogOptions, Runtime as _};

/// Lines of the agent's journal taken.
pub const AGENT_LOG_LINES: usize = 2000;
/// Lines of each module's log taken, before the byte cap.
pub const MODULE_LOG_LINES: usize = 2000;
/// How long one source (journalctl, the API, the engine) may take.
pub const SOURCE_TIMEOUT: Duration = Duration::from_secs(5);

/// The last `max` bytes of `text`, cut at a line start where one is near, and whether it was cut.
pub fn tail(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_string(), false);
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let rest = &text[start..];
    let rest = rest.find('\n').map_or(rest, |i| &rest[i + 1..]);
    (rest.to_string(), true)
}

/// `journalctl -u outpost -n N`, or a note saying why there is none.
pub async fn agent_log() -> Result<String, String> {
    let mut command = tokio::process::Command::new("journalctl");
    command
        .args(["-u", "outpost", "-n", &AGENT_LOG_LINES.to_string()])
        .args(["--no-pager", "-q", "-o", "short-iso"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(SOURCE_TIMEOUT, command.output()).await {
        Err(_) => return Err("journalctl did not answer within 5 s".into()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(
                "absent: journalctl is not installed; the agent's log is wherever its standard error goes".into(),
            );
        }
        Ok(Err(e)) => return Err(format!("absent: journalctl failed to start: {e}")),
        Ok(Ok(o)) => o,
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() || text.trim().is_empty() {
        return Err(format!(
            "absent: no journal entries for the unit `outpost` (not run by systemd here, or no access to the journal){}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .next()
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        ));
    }
    Ok(text)
}

/// The state: the running agent's (through its local API), or a summary from the store.
pub async fn state(config: &Config) -> Value {
    if let Some(state) = api::running_state(&config.api_socket, Duration::from_secs(2)).await {
        return json!({"from": "the running agent's local API", "state": state});
    }
    json!({"from": "the store (the agent is not running)", "store": store_summary(config)})
}

/// What the store says, without anything that could hold a secret: ids, versions, digests,
/// statuses (the stored manifests carry registry passwords and are left out).
fn store_summary(config: &Config) -> Value {
    if !config.state_dir.join("outpost.redb").exists() {
        return json!({"absent": format!("no store in {}", config.state_dir.display())});
    }
    let (store, _) =
        match crate::store::Store::open(&config.state_dir, config.disk.store_reserve_bytes) {
            Ok(s) => s,
            Err(e) => return json!({"error": e.to_string()}),
        };
    let brief = |d: Option<crate::store::StoredDeployment>| {
        d.map(|d| {
            json!({
                "id": d.deployment.id,
                "version": d.deployment.version,
                "source": d.source,
                "digest": d.digest,
                "acceptedAtMs": d.accepted_at,
                "modules": d.deployment.modules.keys().collect::<Vec<_>>(),
            })
        })
    };
    json!({
        "desired": brief(store.desired().ok().flatten()),
        "lastGood": brief(store.last_good().ok().flatten()),
        "lastReport": store.report().ok().flatten(),
        "versions": store.versions().ok(),
    })
}

/// A module's recent log through the running agent's API (redacted by the agent).
pub async fn module_log_via_api(config: &Config, module: &str) -> Option<String> {
    let mut text = String::new();
    let mut failed = false;
    let request = ApiRequest::Logs {
        module: module.to_string(),
        tail: Some(MODULE_LOG_LINES),
        follow: false,
        since: None,
    };
    let asked = api::call(&config.api_socket, &request, |event| match event {
        ApiEvent::Log { text: t } => text.push_str(&t),
        ApiEvent::Error { .. } => failed = true,
        _ => {}
    });
    match tokio::time::timeout(SOURCE_TIMEOUT, asked).await {
        Ok(Ok(())) if !failed => Some(text),
        _ => None,
    }
}

/// A container's recent log straight from the engine (the caller redacts it).
pub async fn container_log(rt: &DockerRuntime, id: &str) -> Result<String, String> {
    let options = LogOptions {
        tail: Some(MODULE_LOG_LINES),
        follow: false,
        since: None,
        timestamps: true,
    };
    let read = async {
        let mut lines = std::pin::pin!(rt.logs(id, options));
        let mut text = String::new();
        while let Some(line) = lines.next().await {
            text.push_str(&line.map_err(|e| e.to_string())?);
        }
        Ok(text)
    };
    tokio::time::timeout(SOURCE_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err("the engine did not send the log within 5 s".into()))
}

/// The environment values of a container (what a module printing its configuration would
/// leak), to redact from its log when the agent is not there to do it.
pub async fn container_secrets(rt: &DockerRuntime, id: &str) -> Vec<String> {
    let inspected =
        tokio::time::timeout(SOURCE_TIMEOUT, rt.docker().inspect_container(id, None)).await;
    let env = match inspected {
        Ok(Ok(info)) => info.config.and_then(|c| c.env).unwrap_or_default(),
        _ => Vec::new(),
    };
    env.iter()
        .filter_map(|kv| kv.split_once('=').map(|(_, v)| v.to_string()))
        .filter(|v| v.len() >= 4)
        .collect()
}

/// The engine's facts: version, the parts of `info` that matter for support, and the images
/// this device's containers run.
pub async fn engine_facts(rt: &DockerRuntime, device: &str) -> Value {
    let docker = rt.docker();
    let facts = async {
        let version = docker.version().await.map_err(|e| e.to_string())?;
        let info = docker.info().await.map_err(|e| e.to_string())?;
        let containers = rt.list(device).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((version, info, containers))
    };
    match tokio::time::timeout(SOURCE_TIMEOUT, facts).await {
        Err(_) => json!({"error": "the engine did not answer within 5 s"}),
        Ok(Err(e)) => json!({"error": e}),
        Ok(Ok((version, info, containers))) => json!({
            "version": version.version,
            "apiVersion": version.api_version,
            "os": version.os,
            "arch": version.arch,
            "kernel": version.kernel_version,
            "info": {
                "storageDriver": info.driver,
                "loggingDriver": info.logging_driver,
                "cgroupDriver": info.cgroup_driver,
                "cgroupVersion": info.cgroup_version,
                "dockerRootDir": info.docker_root_dir,
                "operatingSystem": info.operating_system,
                "ncpu": info.ncpu,
                "memTotal": info.mem_total,
                "containers": info.containers,
                "images": info.images,
                "warnings": info.warnings,
            },
            "modules": containers.iter().map(|c| json!({
                "module": c.module,
                "container": c.name,
                "state": format!("{:?}", c.state),
                "image": c.image,
                "imageId": c.image_id,
            })).collect::<Vec<_>>(),
        }),
    }
}
