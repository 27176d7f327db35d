//! Local policy: what this device allows a deployment to do, whatever the hub says. A
//! deployment that breaks it is refused as a whole, before anything changes.

use std::path::Path;

use crate::config::PolicyConfig;
use crate::manifest::validate::{Bind, registry_of};
use crate::manifest::{Arch, Deployment, Issue, NetworkMode, pointer};

/// What the device is, for `requires`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFacts {
    pub arch: Option<Arch>,
    pub memory_mb: u64,
}

impl DeviceFacts {
    /// This machine's architecture and total memory (from /proc/meminfo).
    pub fn detect() -> DeviceFacts {
        let memory_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024);
        DeviceFacts {
            arch: Arch::current(),
            memory_mb,
        }
    }
}

/// Every way `d` breaks the device's policy or requirements.
pub fn check(d: &Deployment, policy: &PolicyConfig, device: DeviceFacts) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (name, m) in &d.modules {
        let at = pointer("/modules", name);
        let registry = registry_of(&m.image);
        if !policy.allowed_registries.is_empty() && !policy.allowed_registries.contains(&registry) {
            issues.push(Issue::new(
                format!("{at}/image"),
                format!(
                    "registry `{registry}` is not allowed on this device (policy.allowed_registries: {})",
                    policy.allowed_registries.join(", ")
                ),
            ));
        }
        if let Some(host) = m
            .create_options
            .as_ref()
            .and_then(|o| o.host_config.as_ref())
        {
            let hc = format!("{at}/createOptions/HostConfig");
            if host.privileged && !policy.allow_privileged {
                issues.push(Issue::new(
                    format!("{hc}/Privileged"),
                    "privileged containers are not allowed on this device (policy.allow_privileged)",
                ));
            }
            if host.network_mode == Some(NetworkMode::Host) && !policy.allow_host_network {
                issues.push(Issue::new(
                    format!("{hc}/NetworkMode"),
                    "host networking is not allowed on this device (policy.allow_host_network)",
                ));
            }
            for (i, bind) in host.binds.iter().enumerate() {
                let Ok(b) = Bind::parse(bind) else { continue };
                if b.is_host_path() && !host_path_allowed(b.source, &policy.allowed_host_paths) {
                    issues.push(Issue::new(
                        format!("{hc}/Binds/{i}"),
                        format!(
                            "host path `{}` is not under an allowed prefix (policy.allowed_host_paths: {})",
                            b.source,
                            if policy.allowed_host_paths.is_empty() {
                                "none".to_string()
                            } else {
                                policy
                                    .allowed_host_paths
                                    .iter()
                                    .map(|p| p.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    ));
                }
            }
            for (i, dev) in host.devices.iter().enumerate() {
                if !host_path_allowed(&dev.path_on_host, &policy.allowed_host_paths) {
                    issues.push(Issue::new(
                        format!("{hc}/Devices/{i}/PathOnHost"),
                        format!(
                            "device `{}` is not under an allowed prefix (policy.allowed_host_paths)",
                            dev.path_on_host
                        ),
                    ));
                }
            }
        }
        if let Some(req) = &m.requires {
            if !req.arch.is_empty() && !device.arch.is_some_and(|a| req.arch.contains(&a)) {
                issues.push(Issue::new(
                    format!("{at}/requires/arch"),
                    format!(
                        "this device is {}, the module runs on {}",
                        device
                            .arch
                            .map_or("an unknown architecture".to_string(), |a| a.to_string()),
                        req.arch
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            if let Some(min) = req.min_memory_mb
                && device.memory_mb < min
            {
                issues.push(Issue::new(
                    format!("{at}/requires/minMemoryMb"),
                    format!(
                        "this device has {} MiB of memory, the module needs {min}",
                        device.memory_mb
                    ),
                ));
            }
        }
    }
    issues
}

/// Whether `path` lies under one of `prefixes`, compared by path components (so `/data2` is
/// not under `/data`).
fn host_path_allowed(path: &str, prefixes: &[std::path::PathBuf]) -> bool {
    let path = Path::new(path);
    prefixes.iter().any(|p| path.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::TrustedKeys;

    fn policy() -> PolicyConfig {
        PolicyConfig {
            trusted_key_files: vec![],
            trusted_keys: TrustedKeys::default(),
            allowed_registries: vec!["127.0.0.1:5000".into()],
            allow_privileged: false,
            allow_host_network: false,
            allowed_host_paths: vec!["/var/lib/outpost".into()],
        }
    }

    fn facts() -> DeviceFacts {
        DeviceFacts {
            arch: Some(Arch::X86_64),
            memory_mb: 1024,
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let d: Deployment = serde_json::from_str(r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{
            "image":"ghcr.io/x/a:1",
            "createOptions":{"HostConfig":{"Privileged":true,"NetworkMode":"host",
               "Binds":["/var/lib/outpost/models:/m:ro","/etc:/host-etc","/var/lib/outpost2:/x","vol:/v"]}},
            "requires":{"arch":["aarch64"],"minMemoryMb":4096}}}}"#).unwrap();
        let paths: Vec<String> = check(&d, &policy(), facts())
            .into_iter()
            .map(|i| i.path)
            .collect();
        assert_eq!(
            paths,
            [
                "/modules/a/image",
                "/modules/a/createOptions/HostConfig/Privileged",
                "/modules/a/createOptions/HostConfig/NetworkMode",
                "/modules/a/createOptions/HostConfig/Binds/1",
                "/modules/a/createOptions/HostConfig/Binds/2",
                "/modules/a/requires/arch",
                "/modules/a/requires/minMemoryMb",
            ]
        );
    }

    #[test]
    fn a_conforming_deployment_passes() {
        let d: Deployment = serde_json::from_str(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{
            "image":"127.0.0.1:5000/a:1","requires":{"arch":["x86_64"]},
            "createOptions":{"HostConfig":{"Binds":["/var/lib/outpost/models:/m:ro"]}}}}}"#,
        )
        .unwrap();
        assert!(check(&d, &policy(), facts()).is_empty());
    }
}
