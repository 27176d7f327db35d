//! From a manifest module to the container the engine creates, and the hash that says whether a
//! running container still matches its module (adoption after a restart depends on it).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{ContainerSpec, labels};
use crate::intake::hex_sha256;
use crate::manifest::{Module, NetworkMode};

/// The inputs to a module's container that require recreating it when they change. Restart
/// policy, desired status and startup order are the agent's business and are left out, so
/// changing them never restarts a module.
#[derive(Serialize)]
struct HashInput<'a> {
    image: &'a str,
    env: &'a BTreeMap<String, String>,
    create_options: &'a Option<crate::manifest::CreateOptions>,
    resources: &'a Option<crate::manifest::Resources>,
    extra_env: &'a BTreeMap<String, String>,
}

/// A stable hash of what the module's container is made from.
pub fn config_hash(module: &Module, extra_env: &BTreeMap<String, String>) -> String {
    let input = HashInput {
        image: &module.image,
        env: &module.env,
        create_options: &module.create_options,
        resources: &module.resources,
        extra_env,
    };
    // Serializing plain data with string keys cannot fail.
    let bytes = serde_json::to_vec(&input).expect("hash input serializes");
    hex_sha256(&bytes)[..32].to_string()
}

/// The container name of a module: unique per device on a shared engine.
pub fn container_name(device: &str, module: &str) -> String {
    format!("outpost.{device}.{module}")
}

/// Everything the engine needs to create the module's container.
///
/// `extra_env` holds what the agent adds (bus address and credentials); it wins over nothing,
/// since validation refuses manifests that set those names.
pub fn container_spec(
    device: &str,
    deployment_id: &str,
    version: u64,
    name: &str,
    module: &Module,
    extra_env: &BTreeMap<String, String>,
) -> ContainerSpec {
    let mut env: Vec<String> = module.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend(extra_env.iter().map(|(k, v)| format!("{k}={v}")));
    let options = module.create_options.clone().unwrap_or_default();
    let host = options.host_config.unwrap_or_default();
    let mut all_labels = options.labels;
    for (k, v) in [
        (labels::MANAGED, "true".to_string()),
        (labels::DEVICE, device.to_string()),
        (labels::MODULE, name.to_string()),
        (labels::DEPLOYMENT, deployment_id.to_string()),
        (labels::VERSION, version.to_string()),
        (labels::CONFIG_HASH, config_hash(module, extra_env)),
        (
            labels::RESTART_POLICY,
            module.restart_policy.as_str().to_string(),
        ),
        (labels::STARTUP_ORDER, module.startup_order.to_string()),
    ] {
        all_labels.insert(k.to_string(), v);
    }
    let resources = module.resources.clone().unwrap_or_default();
    ContainerSpec {
        name: container_name(device, name),
        image: module.image.clone(),
        env,
        labels: all_labels,
        cmd: options.cmd,
        entrypoint: options.entrypoint,
        user: options.user,
        working_dir: options.working_dir,
        binds: host.binds,
        port_bindings: host
            .port_bindings
            .into_iter()
            .map(|(port, b)| {
                (
                    port,
                    b.into_iter().map(|b| (b.host_ip, b.host_port)).collect(),
                )
            })
            .collect(),
        privileged: host.privileged,
        network_mode: host.network_mode.map(|m| {
            match m {
                NetworkMode::Bridge => "bridge",
                NetworkMode::Host => "host",
                NetworkMode::None => "none",
            }
            .to_string()
        }),
        devices: host
            .devices
            .into_iter()
            .map(|d| {
                let inside = d
                    .path_in_container
                    .unwrap_or_else(|| d.path_on_host.clone());
                (
                    d.path_on_host,
                    inside,
                    d.cgroup_permissions.unwrap_or_else(|| "rwm".into()),
                )
            })
            .collect(),
        cap_add: host.cap_add,
        cap_drop: host.cap_drop,
        readonly_rootfs: host.readonly_rootfs,
        extra_hosts: host.extra_hosts,
        memory_bytes: resources.memory_mb.map(|mb| (mb * 1024 * 1024) as i64),
        nano_cpus: resources.cpus.map(|c| (c * 1e9) as i64),
        log_max_size: "10m".into(),
        log_max_files: 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> Module {
        serde_json::from_str(r#"{"image": "r.io/a:1", "env": {"A": "1"}}"#).unwrap()
    }

    #[test]
    fn hash_ignores_what_the_agent_manages() {
        let a = module();
        let mut b = module();
        b.restart_policy = crate::manifest::RestartPolicy::Never;
        b.startup_order = 9;
        b.status = crate::manifest::DesiredStatus::Stopped;
        let none = BTreeMap::new();
        assert_eq!(config_hash(&a, &none), config_hash(&b, &none));
        b.env.insert("B".into(), "2".into());
        assert_ne!(config_hash(&a, &none), config_hash(&b, &none));
    }

    #[test]
    fn spec_carries_labels_and_limits() {
        let mut m = module();
        m.resources = Some(crate::manifest::Resources {
            memory_mb: Some(64),
            cpus: Some(0.5),
        });
        let spec = container_spec("dev1", "d", 3, "app", &m, &BTreeMap::new());
        assert_eq!(spec.name, "outpost.dev1.app");
        assert_eq!(spec.labels[labels::MODULE], "app");
        assert_eq!(spec.labels[labels::VERSION], "3");
        assert_eq!(spec.memory_bytes, Some(64 << 20));
        assert_eq!(spec.nano_cpus, Some(500_000_000));
    }
}
