//! The container engine: does it answer on `runtime.docker_socket`, with which API version,
//! and does it rotate container logs.

use std::net::IpAddr;

use super::{Finding, STEP_TIMEOUT};
use crate::config::Config;
use crate::runtime::{DockerRuntime, Runtime as _};

/// Where Docker's daemon settings are, log options among them.
pub const DAEMON_JSON: &str = "/etc/docker/daemon.json";

/// What the engine checks found; the bridge's gateway for the bus check (`None` when the
/// engine did not answer, `Some(None)` when it has no bridge).
pub struct EngineOutcome {
    pub findings: Vec<Finding>,
    pub bridge_gateway: Option<Option<IpAddr>>,
}

/// Connects as the agent does, each step within [`STEP_TIMEOUT`].
pub async fn connect(config: &Config) -> Result<DockerRuntime, String> {
    let socket = &config.runtime.docker_socket;
    if !socket.exists() {
        return Err(format!("no socket at {}", socket.display()));
    }
    match tokio::time::timeout(STEP_TIMEOUT, DockerRuntime::connect(socket)).await {
        Ok(Ok(rt)) => Ok(rt),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "{} did not answer within {} s",
            socket.display(),
            STEP_TIMEOUT.as_secs()
        )),
    }
}

pub async fn check(config: &Config) -> EngineOutcome {
    let socket = config.runtime.docker_socket.display().to_string();
    let rt = match connect(config).await {
        Ok(rt) => rt,
        Err(e) => {
            return EngineOutcome {
                findings: vec![Finding::error(
                    "engine",
                    e,
                    format!(
                        "start Docker (systemctl start docker), or set runtime.docker_socket to its socket; the agent's user needs access to {socket} (the docker group)"
                    ),
                )],
                bridge_gateway: None,
            };
        }
    };
    let docker = rt.docker();
    let facts = tokio::time::timeout(STEP_TIMEOUT, async {
        let version = docker.version().await.map_err(|e| e.to_string())?;
        let info = docker.info().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((version, info))
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {} s", STEP_TIMEOUT.as_secs())));
    let (version, info) = match facts {
        Ok(f) => f,
        Err(e) => {
            return EngineOutcome {
                findings: vec![Finding::error(
                    "engine",
                    format!("{socket}: {e}"),
                    "check the engine (systemctl status docker; journalctl -u docker)",
                )],
                bridge_gateway: None,
            };
        }
    };
    let mut findings = vec![Finding::ok(
        "engine",
        format!(
            "Docker {} (API {}, storage driver {}) at {socket}",
            version.version.unwrap_or_default(),
            version.api_version.unwrap_or_default(),
            info.driver.clone().unwrap_or_default()
        ),
    )];
    let daemon_json = std::fs::read_to_string(DAEMON_JSON).ok();
    findings.push(log_rotation(
        info.logging_driver.as_deref().unwrap_or(""),
        daemon_json.as_deref(),
    ));
    let gateway = tokio::time::timeout(STEP_TIMEOUT, rt.bridge_gateway())
        .await
        .ok()
        .and_then(Result::ok);
    EngineOutcome {
        findings,
        bridge_gateway: gateway,
    }
}

/// Whether the engine's default log driver rotates: `json-file` without `max-size` grows a
/// container's log until the disk is full. The agent caps its own modules' logs; this is
/// about every other container, and the engine's default.
pub fn log_rotation(driver: &str, daemon_json: Option<&str>) -> Finding {
    let opts = daemon_json
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .and_then(|v| v.get("log-opts").cloned());
    let opt = |k: &str| {
        opts.as_ref()
            .and_then(|o| o.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    match driver {
        "json-file" | "" => match opt("max-size") {
            Some(size) => Finding::ok(
                "log-rotation",
                format!(
                    "json-file, max-size {size}, max-file {}",
                    opt("max-file").unwrap_or_else(|| "1".into())
                ),
            ),
            None => Finding::warning(
                "log-rotation",
                format!(
                    "the engine's default log driver is json-file without max-size ({}): containers not started by Outpost keep their whole log until the disk is full (Outpost's modules are capped by the agent)",
                    if daemon_json.is_some() {
                        format!("no log-opts.max-size in {DAEMON_JSON}")
                    } else {
                        format!("{DAEMON_JSON} not found or not readable")
                    }
                ),
                format!(
                    "add \"log-opts\": {{\"max-size\": \"10m\", \"max-file\": \"3\"}} to {DAEMON_JSON} and restart Docker (or use \"log-driver\": \"local\")"
                ),
            ),
        },
        "local" => Finding::ok("log-rotation", "local driver (rotates by default)"),
        "none" => Finding::warning(
            "log-rotation",
            "log driver `none`: containers' output is not kept",
            format!("set \"log-driver\": \"local\" in {DAEMON_JSON}, or json-file with max-size"),
        ),
        other => Finding::ok(
            "log-rotation",
            format!("log driver `{other}`: the logs leave the engine, its own limits apply"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    #[test]
    fn json_file_without_max_size_is_a_warning_with_the_fix() {
        let f = log_rotation("json-file", Some(r#"{"log-driver":"json-file"}"#));
        assert_eq!(f.level, Level::Warning);
        assert!(f.fix.unwrap().contains("max-size"));
        assert_eq!(log_rotation("json-file", None).level, Level::Warning);
        let ok = log_rotation(
            "json-file",
            Some(r#"{"log-opts": {"max-size": "10m", "max-file": "3"}}"#),
        );
        assert_eq!(ok.level, Level::Ok, "{ok:?}");
        assert_eq!(log_rotation("local", None).level, Level::Ok);
    }
}
