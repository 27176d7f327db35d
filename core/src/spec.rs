//! From a manifest module to the container the engine creates, and the hash that says whether a
//! running container still matches its module (adoption after a restart depends on it).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::container::{ContainerSpec, labels};
use crate::intake::hex_sha256;
use crate::manifest::validate::Bind;
use crate::manifest::{Module, NetworkMode};
use crate::policy::PolicyConfig;

/// Where a module's artifacts appear inside its container (read-only).
pub const ARTIFACTS_MOUNT: &str = "/outpost/artifacts";
/// The variable that tells a module where its artifacts are: [`ARTIFACTS_MOUNT`] in a
/// container, the host folder for a process.
pub const ARTIFACTS_ENV: &str = "OUTPOST_ARTIFACTS_DIR";

/// Raised when what the agent itself puts into every container changes, so that running
/// containers are recreated with it (version 2: the policy's hardening defaults).
const SPEC_VERSION: u32 = 2;

/// What the device's policy fills in or rewrites for a module: its limits, where its named
/// volumes live, the address its ports bind without one. Part of the config hash, so a
/// changed default reaches the modules already running.
#[derive(Serialize)]
struct Effective {
    spec_version: u32,
    binds: Vec<String>,
    memory_mb: Option<u64>,
    pids_limit: u64,
    default_host_ip: Option<String>,
}

impl Effective {
    fn of(device: &str, module: &Module, policy: &PolicyConfig) -> Effective {
        let host = module
            .create_options
            .as_ref()
            .and_then(|o| o.host_config.as_ref());
        let binds = host
            .map(|h| {
                h.binds
                    .iter()
                    .map(|b| match Bind::parse(b) {
                        Ok(bind) if !bind.is_host_path() => {
                            let volume = crate::policy::volume_name(policy, device, bind.source);
                            format!("{volume}{}", &b[bind.source.len()..])
                        }
                        _ => b.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let resources = module.resources.clone().unwrap_or_default();
        Effective {
            spec_version: SPEC_VERSION,
            binds,
            memory_mb: resources.memory_mb.or(policy.default_memory_mb),
            pids_limit: resources.pids_limit.unwrap_or(policy.default_pids_limit),
            default_host_ip: policy.allowed_host_ips.first().map(ToString::to_string),
        }
    }
}

/// The inputs to a module's container that require recreating it when they change. Restart
/// policy, desired status and startup order are the agent's business and are left out, so
/// changing them never restarts a module.
#[derive(Serialize)]
struct HashInput<'a> {
    image: &'a str,
    /// Left out when not pinned, so that hashes from before pins existed stay the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: &'a Option<String>,
    env: &'a BTreeMap<String, String>,
    create_options: &'a Option<crate::manifest::CreateOptions>,
    resources: &'a Option<crate::manifest::Resources>,
    security: &'a Option<crate::manifest::Security>,
    extra_env: &'a BTreeMap<String, String>,
    effective: Effective,
    /// A process module's (left out for containers, whose hashes stay as they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<&'static str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    command: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    working_dir: &'a Option<String>,
    /// The names of the artifacts the module reads (sorted), not their digests: a new digest
    /// is a link swapped in the module's artifact folder, which the module sees without a
    /// restart; a new name changes the folder's promise and the environment, so it recreates.
    /// Left out when empty, so that hashes from before artifacts existed stay the same.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    artifacts: Vec<&'a str>,
}

/// A stable hash of what the module's container is made from.
pub fn config_hash(
    module: &Module,
    extra_env: &BTreeMap<String, String>,
    device: &str,
    policy: &PolicyConfig,
) -> String {
    let input = HashInput {
        image: &module.image,
        platform: &module.platform,
        env: &module.env,
        create_options: &module.create_options,
        resources: &module.resources,
        security: &module.security,
        extra_env,
        effective: Effective::of(device, module, policy),
        runtime: (module.runtime == crate::manifest::RuntimeKind::Process)
            .then_some(module.runtime.as_str()),
        command: &module.command,
        working_dir: &module.working_dir,
        artifacts: {
            let mut names: Vec<&str> = module.artifacts.iter().map(String::as_str).collect();
            names.sort_unstable();
            names.dedup();
            names
        },
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
    policy: &PolicyConfig,
) -> ContainerSpec {
    let effective = Effective::of(device, module, policy);
    let mut env: Vec<String> = module.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend(extra_env.iter().map(|(k, v)| format!("{k}={v}")));
    if !module.artifacts.is_empty() {
        // The folder itself is bound by the agent, which knows where it lives on the host
        // (`outpost_agent::artifacts`); the mount point is fixed, so it needs no hash of its own.
        env.push(format!("{ARTIFACTS_ENV}={ARTIFACTS_MOUNT}"));
    }
    let options = module.create_options.clone().unwrap_or_default();
    let host = options.host_config.unwrap_or_default();
    let mut all_labels = options.labels;
    for (k, v) in [
        (labels::MANAGED, "true".to_string()),
        (labels::DEVICE, device.to_string()),
        (labels::MODULE, name.to_string()),
        (labels::DEPLOYMENT, deployment_id.to_string()),
        (labels::VERSION, version.to_string()),
        (
            labels::CONFIG_HASH,
            config_hash(module, extra_env, device, policy),
        ),
        (
            labels::RESTART_POLICY,
            module.restart_policy.as_str().to_string(),
        ),
        (labels::STARTUP_ORDER, module.startup_order.to_string()),
    ] {
        all_labels.insert(k.to_string(), v);
    }
    let resources = module.resources.clone().unwrap_or_default();
    // A process module: the executable stands where the image does, its arguments where the
    // command does.
    let process = module.runtime == crate::manifest::RuntimeKind::Process;
    if process {
        all_labels.insert(
            labels::RUNTIME.to_string(),
            module.runtime.as_str().to_string(),
        );
    }
    let (image, cmd, working_dir) = if process {
        (
            module.command.first().cloned().unwrap_or_default(),
            Some(module.command.iter().skip(1).cloned().collect()),
            module.working_dir.clone(),
        )
    } else {
        (module.image.clone(), options.cmd, options.working_dir)
    };
    ContainerSpec {
        name: container_name(device, name),
        image,
        env,
        labels: all_labels,
        cmd,
        entrypoint: options.entrypoint,
        user: options.user,
        working_dir,
        binds: effective.binds,
        // A port binding without an address binds the policy's first one (loopback by
        // default), never every interface.
        port_bindings: host
            .port_bindings
            .into_iter()
            .map(|(port, b)| {
                let bindings = b
                    .into_iter()
                    .map(|b| {
                        let ip = b
                            .host_ip
                            .filter(|ip| !ip.is_empty())
                            .or_else(|| effective.default_host_ip.clone());
                        (ip, b.host_port)
                    })
                    .collect();
                (port, bindings)
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
        cap_drop: if module.security.as_ref().is_some_and(|s| s.cap_drop_all) {
            vec!["ALL".to_string()]
        } else {
            host.cap_drop
        },
        // A setuid binary in the image never gains more than the module started with.
        security_opt: vec!["no-new-privileges:true".to_string()],
        pids_limit: i64::try_from(effective.pids_limit).ok(),
        readonly_rootfs: host.readonly_rootfs,
        extra_hosts: host.extra_hosts,
        memory_bytes: effective
            .memory_mb
            .and_then(|mb| i64::try_from(mb.saturating_mul(1 << 20)).ok()),
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
        let p = PolicyConfig::default();
        assert_eq!(
            config_hash(&a, &none, "d", &p),
            config_hash(&b, &none, "d", &p)
        );
        b.env.insert("B".into(), "2".into());
        assert_ne!(
            config_hash(&a, &none, "d", &p),
            config_hash(&b, &none, "d", &p)
        );
        // A changed default of the policy recreates the module.
        let lower = PolicyConfig {
            default_memory_mb: Some(64),
            ..PolicyConfig::default()
        };
        assert_ne!(
            config_hash(&a, &none, "d", &p),
            config_hash(&a, &none, "d", &lower)
        );
    }

    #[test]
    fn hash_follows_artifact_names_not_digests() {
        let none = BTreeMap::new();
        let p = PolicyConfig::default();
        let plain = config_hash(&module(), &none, "d", &p);
        let mut m = module();
        m.artifacts = vec!["model".into(), "labels".into()];
        let named = config_hash(&m, &none, "d", &p);
        assert_ne!(plain, named, "a new name recreates");
        m.artifacts.reverse();
        assert_eq!(
            config_hash(&m, &none, "d", &p),
            named,
            "order does not matter"
        );
        // Digests live in the deployment's `artifacts`, which the hash never sees.
        let spec = container_spec("d", "x", 1, "app", &m, &none, &p);
        assert!(
            spec.env
                .contains(&format!("{ARTIFACTS_ENV}={ARTIFACTS_MOUNT}"))
        );
        let spec = container_spec("d", "x", 1, "app", &module(), &none, &p);
        assert!(!spec.env.iter().any(|e| e.starts_with(ARTIFACTS_ENV)));
    }

    #[test]
    fn spec_carries_labels_and_limits() {
        let mut m = module();
        m.resources = Some(crate::manifest::Resources {
            memory_mb: Some(64),
            cpus: Some(0.5),
            pids_limit: None,
        });
        let spec = container_spec(
            "dev1",
            "d",
            3,
            "app",
            &m,
            &BTreeMap::new(),
            &PolicyConfig::default(),
        );
        assert_eq!(spec.name, "outpost.dev1.app");
        assert_eq!(spec.labels[labels::MODULE], "app");
        assert_eq!(spec.labels[labels::VERSION], "3");
        assert_eq!(spec.memory_bytes, Some(64 << 20));
        assert_eq!(spec.nano_cpus, Some(500_000_000));
        assert_eq!(spec.pids_limit, Some(1024));
        assert_eq!(spec.security_opt, ["no-new-privileges:true"]);
    }

    #[test]
    fn defaults_fill_in_limits_scope_volumes_and_bind_loopback() {
        let m: Module = serde_json::from_str(
            r#"{"image": "r.io/a:1", "security": {"capDropAll": true},
                "createOptions": {"HostConfig": {
                    "Binds": ["data:/data", "shared:/shared:ro", "/srv/models:/m:ro"],
                    "PortBindings": {"80/tcp": [{"HostPort": "8080"}, {"HostIp": "::1", "HostPort": "8081"}]}}}}"#,
        )
        .unwrap();
        let policy = PolicyConfig {
            allowed_volumes: vec!["shared".into()],
            ..PolicyConfig::default()
        };
        let spec = container_spec("dev1", "d", 1, "app", &m, &BTreeMap::new(), &policy);
        assert_eq!(
            spec.binds,
            [
                "outpost.dev1.data:/data",
                "shared:/shared:ro",
                "/srv/models:/m:ro"
            ]
        );
        assert_eq!(
            spec.port_bindings["80/tcp"],
            [
                (Some("127.0.0.1".to_string()), "8080".to_string()),
                (Some("::1".to_string()), "8081".to_string())
            ]
        );
        assert_eq!(spec.memory_bytes, Some(512 << 20));
        assert_eq!(spec.cap_drop, ["ALL"]);
    }
}
