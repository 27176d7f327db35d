//! `[policy]`: what modules may ask of the device (trusted keys, registries, host paths,
//! capabilities, devices, ports, limits), checked into a [`PolicyConfig`]. The paths the agent
//! itself needs are forbidden afterwards, once every section is read.

use std::path::{Path, PathBuf};

use super::PolicyConfig;
use super::raw::RawPolicy;
use super::validate::Issues;
use crate::signing::TrustedKeys;

/// A port range is `N` or `N-M`.
fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let (lo, hi) = (
        lo.trim().parse::<u16>().ok()?,
        hi.trim().parse::<u16>().ok()?,
    );
    (lo >= 1 && lo <= hi).then_some((lo, hi))
}

/// `[policy]`, with `forbidden_host_paths` left empty.
pub(super) fn policy(p: RawPolicy, base: &Path, issues: &mut Issues) -> PolicyConfig {
    let trusted_key_files: Vec<PathBuf> = p
        .trusted_keys
        .iter()
        .enumerate()
        .map(|(i, f)| issues.file(&format!("policy.trusted_keys[{i}]"), f, base))
        .collect();
    let trusted_keys = if trusted_key_files.iter().all(|f| f.is_file()) {
        TrustedKeys::load(&trusted_key_files).unwrap_or_else(|e| {
            issues.push("policy.trusted_keys", e.to_string());
            TrustedKeys::default()
        })
    } else {
        TrustedKeys::default()
    };
    for (key, prefixes) in [
        ("allowed_host_paths", &p.allowed_host_paths),
        ("writable_host_paths", &p.writable_host_paths),
        ("allowed_devices", &p.allowed_devices),
        ("allowed_executables", &p.allowed_executables),
    ] {
        for (i, prefix) in prefixes.iter().enumerate() {
            if prefix.is_relative()
                || prefix
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                issues.push(
                    &format!("policy.{key}[{i}]"),
                    format!(
                        "`{}` must be an absolute path without `..`",
                        prefix.display()
                    ),
                );
            }
        }
    }
    // A module writes under a writable prefix: if a read-only prefix could reach into it (or
    // it into one), a module could plant a link there that a later bind follows.
    for (i, w) in p.writable_host_paths.iter().enumerate() {
        for r in &p.allowed_host_paths {
            if w.starts_with(r) || r.starts_with(w) {
                issues.push(
                    &format!("policy.writable_host_paths[{i}]"),
                    format!(
                        "`{}` overlaps the read-only prefix `{}`: modules could plant links \
                         where read-only binds resolve; keep them apart",
                        w.display(),
                        r.display()
                    ),
                );
            }
        }
    }
    for (i, registry) in p.allowed_registries.iter().enumerate() {
        if registry.is_empty() || registry.contains('/') {
            issues.push(
                &format!("policy.allowed_registries[{i}]"),
                format!("`{registry}` must be a registry host[:port], such as `registry.example.com:5000`"),
            );
        }
    }
    let defaults = PolicyConfig::default();
    let mut allowed_capabilities = Vec::new();
    for (i, cap) in p.allowed_capabilities.iter().enumerate() {
        let upper = cap.to_ascii_uppercase();
        let name = upper.trim_start_matches("CAP_").to_string();
        if !crate::manifest::validate::is_capability(&name) {
            issues.push(
                &format!("policy.allowed_capabilities[{i}]"),
                format!("`{cap}` is not a Linux capability name such as `NET_BIND_SERVICE`"),
            );
        }
        allowed_capabilities.push(name);
    }
    for (i, v) in p.allowed_volumes.iter().enumerate() {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            issues.push(
                &format!("policy.allowed_volumes[{i}]"),
                format!("`{v}` is not a volume name"),
            );
        }
    }
    let allowed_host_ports = match p.allowed_host_ports {
        None => defaults.allowed_host_ports.clone(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let parsed = parse_port_range(r);
                if parsed.is_none() {
                    issues.push(
                        &format!("policy.allowed_host_ports[{i}]"),
                        format!(
                            "`{r}` must be a port (`8080`) or a range (`8000-8099`) within 1-65535"
                        ),
                    );
                }
                parsed
            })
            .collect(),
    };
    let allowed_host_ips = match p.allowed_host_ips {
        None => defaults.allowed_host_ips.clone(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, ip)| {
                let parsed = ip.parse::<std::net::IpAddr>().ok();
                if parsed.is_none() {
                    issues.push(
                        &format!("policy.allowed_host_ips[{i}]"),
                        format!("`{ip}` is not an IP address"),
                    );
                }
                parsed
            })
            .collect(),
    };
    let default_memory_mb = match p.default_memory_mb {
        None => defaults.default_memory_mb,
        Some(0) => None,
        Some(mb) if mb < 6 => {
            issues.push(
                "policy.default_memory_mb",
                "must be at least 6 (the engine's minimum), or 0 for no limit",
            );
            None
        }
        Some(mb) => Some(mb),
    };
    let max_memory_mb = p.max_memory_mb.filter(|mb| *mb > 0);
    if let (Some(d), Some(m)) = (default_memory_mb, max_memory_mb)
        && d > m
    {
        issues.push(
            "policy.default_memory_mb",
            format!("{d} is above policy.max_memory_mb ({m})"),
        );
    }
    let default_pids_limit = p.default_pids_limit.unwrap_or(defaults.default_pids_limit);
    let max_pids_limit = p.max_pids_limit.unwrap_or(defaults.max_pids_limit);
    if default_pids_limit == 0 || default_pids_limit > max_pids_limit {
        issues.push(
            "policy.default_pids_limit",
            format!("must be between 1 and policy.max_pids_limit ({max_pids_limit})"),
        );
    }
    PolicyConfig {
        trusted_key_files,
        trusted_keys,
        allowed_registries: p.allowed_registries,
        allow_privileged: p.allow_privileged,
        allow_host_network: p.allow_host_network,
        allowed_host_paths: p.allowed_host_paths,
        writable_host_paths: p.writable_host_paths,
        allowed_capabilities,
        allowed_devices: p.allowed_devices,
        allowed_volumes: p.allowed_volumes,
        allowed_host_ports,
        allowed_host_ips,
        default_memory_mb,
        max_memory_mb,
        default_pids_limit,
        max_pids_limit,
        allow_image_tags: p.allow_image_tags,
        forbidden_host_paths: Vec::new(),
        allowed_executables: p.allowed_executables,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{issues, load};
    use std::path::PathBuf;

    #[test]
    fn policy_keys_are_checked_and_default_to_deny() {
        let c = load("device_id = \"cam-1\"\n", &[]).unwrap();
        let p = &c.policy;
        assert!(p.allowed_capabilities.is_empty() && p.allowed_devices.is_empty());
        assert_eq!(p.allowed_host_ports, [(1024, 65535)]);
        assert!(p.allowed_host_ips.iter().all(|ip| ip.is_loopback()));
        assert_eq!(
            (p.default_memory_mb, p.default_pids_limit),
            (Some(512), 1024)
        );
        assert!(!p.allow_image_tags);
        for forbidden in ["/var/lib/outpost", "/var/run/docker.sock", "/proc", "/sys"] {
            assert!(
                p.forbidden_host_paths.contains(&PathBuf::from(forbidden)),
                "{forbidden} is not forbidden"
            );
        }
        let found = issues(load(
            "device_id = \"cam-1\"\n[policy]\nallowed_host_paths = [\"/srv\"]\n\
             writable_host_paths = [\"/srv/data\"]\nallowed_capabilities = [\"CAP_SYS_ADMIN\", \"FLY\"]\n\
             allowed_host_ports = [\"80\", \"90-70\"]\nallowed_host_ips = [\"lan\"]\n\
             default_memory_mb = 2048\nmax_memory_mb = 1024\n",
            &[],
        ));
        let keys: Vec<&str> = found
            .iter()
            .map(|i| i.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "policy.writable_host_paths[0]",
                "policy.allowed_capabilities[1]",
                "policy.allowed_host_ports[1]",
                "policy.allowed_host_ips[0]",
                "policy.default_memory_mb",
            ],
            "{found:?}"
        );
        let c = load(
            "device_id = \"cam-1\"\n[policy]\nallowed_capabilities = [\"cap_net_admin\"]\n\
             default_memory_mb = 0\n",
            &[("OUTPOST__POLICY__ALLOWED_HOST_PORTS", "8000-8099,9000")],
        )
        .unwrap();
        assert_eq!(c.policy.allowed_capabilities, ["NET_ADMIN"]);
        assert_eq!(c.policy.default_memory_mb, None);
        assert_eq!(c.policy.allowed_host_ports, [(8000, 8099), (9000, 9000)]);
    }
}
