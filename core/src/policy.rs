//! Local policy: what this device allows a deployment to do, whatever the hub says. Deny by
//! default: every container setting Outpost passes to the engine is either checked here or
//! fixed by the agent. A deployment that breaks the policy is refused as a whole, before
//! anything changes, and each refusal names the field and the policy key that would allow it.
//!
//! Host paths are resolved on the device, component by component, and refused when any
//! component is a symbolic link. That check alone races a module that plants a link between
//! the check and the engine's mount, so the real control is the layout: read-only binds come
//! from prefixes no module can write (`allowed_host_paths`), and the only writable host paths
//! are each module's own `PREFIX/<module>` (`writable_host_paths`), never a path below it.
//! No module can therefore write anywhere a later bind resolves through.

use std::path::{Path, PathBuf};

use crate::manifest::validate::{Bind, registry_of};
use crate::manifest::{
    Arch, Deployment, ImageRef, Issue, Module, NetworkMode, RuntimeKind, pointer,
};
use crate::signing::TrustedKeys;

/// What this device lets a deployment do, whatever the hub says: deny by default. The default
/// trusts no keys (unsigned deployments accepted), allows any registry, and no privileged
/// containers, host network, host paths, devices, added capabilities, shared volumes or ports
/// outside 1024-65535 on loopback.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub trusted_key_files: Vec<PathBuf>,
    /// Loaded at start-up so a bad key file is a configuration error, not a refused deployment.
    pub trusted_keys: TrustedKeys,
    /// Empty means any registry.
    pub allowed_registries: Vec<String>,
    pub allow_privileged: bool,
    pub allow_host_network: bool,
    /// Prefixes a read-only bind's host path must be under; empty allows no host paths. No
    /// module can write under them (they may not overlap `writable_host_paths`), so no module
    /// can plant a link that a later bind would follow.
    pub allowed_host_paths: Vec<PathBuf>,
    /// Each module may bind `PREFIX/<module name>` itself (read-write), and nothing else under
    /// these prefixes.
    pub writable_host_paths: Vec<PathBuf>,
    /// Capabilities a module may add (`CapAdd`), without the `CAP_` prefix.
    pub allowed_capabilities: Vec<String>,
    /// Device nodes a module may be given, exactly.
    pub allowed_devices: Vec<PathBuf>,
    /// Engine volumes a module may mount by their own name; any other volume name is scoped
    /// to this device (`outpost.<device>.<name>`).
    pub allowed_volumes: Vec<String>,
    /// Host port ranges a module may publish, inclusive.
    pub allowed_host_ports: Vec<(u16, u16)>,
    /// Host addresses a published port may bind; a port binding without one binds the first
    /// (loopback unless configured otherwise).
    pub allowed_host_ips: Vec<std::net::IpAddr>,
    /// The memory limit of a module that sets none; `None`: no limit.
    pub default_memory_mb: Option<u64>,
    /// The highest memory limit a module may ask for; `None`: any.
    pub max_memory_mb: Option<u64>,
    pub default_pids_limit: u64,
    pub max_pids_limit: u64,
    /// With trusted keys, images must be pinned by digest unless this is set (labs).
    pub allow_image_tags: bool,
    /// Host paths no bind may reach, whatever the prefixes say: the agent's state and
    /// configuration, the engine's socket, the API socket, /proc, /sys, /dev, /boot.
    pub forbidden_host_paths: Vec<PathBuf>,
    /// Executables a process module may run: exact paths, or folders (ending in `/`) whose
    /// files it may run. Empty: no process module runs on this device. A process module runs
    /// outside any container, as the agent's user: each entry is root's trust.
    pub allowed_executables: Vec<PathBuf>,
}

/// Paths no bind may reach on any device.
pub const SYSTEM_PATHS: &[&str] = &["/proc", "/sys", "/dev", "/boot", "/var/run/docker.sock"];

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            trusted_key_files: Vec::new(),
            trusted_keys: TrustedKeys::default(),
            allowed_registries: Vec::new(),
            allow_privileged: false,
            allow_host_network: false,
            allowed_host_paths: Vec::new(),
            writable_host_paths: Vec::new(),
            allowed_capabilities: Vec::new(),
            allowed_devices: Vec::new(),
            allowed_volumes: Vec::new(),
            allowed_host_ports: vec![(1024, 65535)],
            allowed_host_ips: vec![
                std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::Ipv6Addr::LOCALHOST.into(),
            ],
            default_memory_mb: Some(512),
            max_memory_mb: None,
            default_pids_limit: 1024,
            max_pids_limit: 8192,
            allow_image_tags: false,
            forbidden_host_paths: SYSTEM_PATHS.iter().map(PathBuf::from).collect(),
            allowed_executables: Vec::new(),
        }
    }
}

/// Capabilities that hand a container the host (or its kernel, or its network): each needs its
/// own entry in `policy.allowed_capabilities`, and a refusal says why it is dangerous.
const DANGEROUS_CAPABILITIES: &[(&str, &str)] = &[
    ("SYS_ADMIN", "mounts, namespaces and most of root"),
    ("SYS_MODULE", "loads kernel modules"),
    ("SYS_RAWIO", "raw access to memory and devices"),
    ("SYS_PTRACE", "reads and controls other processes"),
    ("SYS_BOOT", "reboots the host"),
    ("SYS_TIME", "sets the host's clock"),
    (
        "DAC_READ_SEARCH",
        "reads any host file by handle (open_by_handle_at)",
    ),
    ("DAC_OVERRIDE", "ignores file permissions"),
    ("BPF", "loads BPF programs into the kernel"),
    ("PERFMON", "observes the kernel and other processes"),
    ("NET_ADMIN", "reconfigures the network"),
    ("MAC_ADMIN", "changes the security modules' policy"),
    ("MAC_OVERRIDE", "overrides the security modules"),
    ("LINUX_IMMUTABLE", "changes immutable files"),
    ("SYSLOG", "reads and clears the kernel log"),
    ("CHECKPOINT_RESTORE", "restores processes with chosen state"),
];

/// The module's `requires` against the device's facts.
fn requirements(at: &str, m: &Module, device: DeviceFacts, issues: &mut Vec<Issue>) {
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

/// The engine volume a manifest's volume name stands for: scoped to this device, unless the
/// policy lists the name (a volume the device's owner shares on purpose).
pub fn volume_name(policy: &PolicyConfig, device: &str, name: &str) -> String {
    if policy.allowed_volumes.iter().any(|v| v == name) {
        name.to_string()
    } else {
        format!("outpost.{device}.{name}")
    }
}

/// What the device is, for `requires`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFacts {
    pub arch: Option<Arch>,
    pub memory_mb: u64,
    /// Whether a container engine runs docker modules here (`runtime.kind = "docker"`).
    pub engine: bool,
}

/// Whether `exe` is one of the policy's executables (exactly, or a file under a folder entry
/// ending in `/`).
pub fn executable_allowed(policy: &PolicyConfig, exe: &str) -> bool {
    let path = Path::new(exe);
    policy.allowed_executables.iter().any(|allowed| {
        let text = allowed.to_string_lossy();
        if text.ends_with('/') {
            path.parent() == Some(allowed.as_path()) || path.starts_with(allowed)
        } else {
            path == allowed
        }
    })
}

/// Every way `d` breaks the device's policy or requirements.
pub fn check(d: &Deployment, policy: &PolicyConfig, device: DeviceFacts) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (name, m) in &d.modules {
        let at = pointer("/modules", name);
        if m.runtime == RuntimeKind::Process {
            if let Some(exe) = m.command.first()
                && !executable_allowed(policy, exe)
            {
                issues.push(Issue::new(
                    format!("{at}/command/0"),
                    if policy.allowed_executables.is_empty() {
                        format!(
                            "this device runs no process modules: `{exe}` would run outside any container, \
                             as the agent's user (policy.allowed_executables lists what may run)"
                        )
                    } else {
                        format!("`{exe}` is not one of the executables this device allows (policy.allowed_executables)")
                    },
                ));
            }
            resources(&at, m, policy, &mut issues);
            requirements(&at, m, device, &mut issues);
            continue;
        }
        if !device.engine {
            issues.push(Issue::new(
                format!("{at}/runtime"),
                "this device has no container engine (runtime.kind = \"process\"): it runs process modules only",
            ));
            continue;
        }
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
        if !policy.trusted_keys.is_empty()
            && !policy.allow_image_tags
            && ImageRef::parse(&m.image).is_ok_and(|r| r.digest.is_none())
        {
            issues.push(Issue::new(
                format!("{at}/image"),
                format!(
                    "`{}` names a tag, which the registry can move: a signed deployment must pin \
                     images by digest (`…@sha256:…`), or set policy.allow_image_tags for a lab",
                    m.image
                ),
            ));
        }
        resources(&at, m, policy, &mut issues);
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
            for (i, cap) in host.cap_add.iter().enumerate() {
                let cap = cap.trim_start_matches("CAP_").to_ascii_uppercase();
                if policy.allowed_capabilities.contains(&cap) {
                    continue;
                }
                let why = DANGEROUS_CAPABILITIES
                    .iter()
                    .find(|(c, _)| *c == cap)
                    .map_or(String::new(), |(_, why)| {
                        format!(" — a dangerous capability: it {why}")
                    });
                issues.push(Issue::new(
                    format!("{hc}/CapAdd/{i}"),
                    format!(
                        "capability `{cap}` is not allowed on this device{why} \
                         (policy.allowed_capabilities must list it)"
                    ),
                ));
            }
            for (i, bind) in host.binds.iter().enumerate() {
                let Ok(b) = Bind::parse(bind) else { continue };
                if b.is_host_path()
                    && let Err(why) = host_path(name, &b, policy)
                {
                    issues.push(Issue::new(format!("{hc}/Binds/{i}"), why));
                }
            }
            for (i, dev) in host.devices.iter().enumerate() {
                if !policy
                    .allowed_devices
                    .iter()
                    .any(|d| d == Path::new(&dev.path_on_host))
                {
                    issues.push(Issue::new(
                        format!("{hc}/Devices/{i}/PathOnHost"),
                        format!(
                            "device `{}` is not allowed on this device (policy.allowed_devices must list it)",
                            dev.path_on_host
                        ),
                    ));
                }
            }
            if host.network_mode != Some(NetworkMode::Host) {
                for (port, bindings) in &host.port_bindings {
                    let path = pointer(&format!("{hc}/PortBindings"), port);
                    for (i, b) in bindings.iter().enumerate() {
                        if let Ok(p) = b.host_port.parse::<u16>()
                            && !policy
                                .allowed_host_ports
                                .iter()
                                .any(|(lo, hi)| (*lo..=*hi).contains(&p))
                        {
                            issues.push(Issue::new(
                                format!("{path}/{i}/HostPort"),
                                format!(
                                    "host port {p} is outside the ports this device allows \
                                     (policy.allowed_host_ports: {})",
                                    port_ranges(&policy.allowed_host_ports)
                                ),
                            ));
                        }
                        if let Some(ip) = b.host_ip.as_deref().filter(|ip| !ip.is_empty())
                            && let Ok(addr) = ip.parse::<std::net::IpAddr>()
                            && !policy.allowed_host_ips.contains(&addr)
                        {
                            let hint = if addr.is_unspecified() {
                                " — it binds every interface"
                            } else {
                                ""
                            };
                            issues.push(Issue::new(
                                format!("{path}/{i}/HostIp"),
                                format!(
                                    "host address `{ip}` is not allowed on this device{hint} \
                                     (policy.allowed_host_ips: {})",
                                    policy
                                        .allowed_host_ips
                                        .iter()
                                        .map(ToString::to_string)
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            ));
                        }
                    }
                }
            }
        }
        requirements(&at, m, device, &mut issues);
    }
    if d.agent.is_some() && policy.trusted_keys.is_empty() {
        // Replacing the agent is root on the device: only a signature may ask for it.
        issues.push(Issue::new(
            "/agent",
            "this device trusts no signing keys, so it takes no agent update: an agent update \
             must come in a deployment signed by a key in policy.trusted_keys",
        ));
    }
    issues
}

/// Memory and pids limits against the policy's ceilings.
fn resources(at: &str, m: &Module, policy: &PolicyConfig, issues: &mut Vec<Issue>) {
    let Some(r) = &m.resources else { return };
    if let (Some(mb), Some(max)) = (r.memory_mb, policy.max_memory_mb)
        && mb > max
    {
        issues.push(Issue::new(
            format!("{at}/resources/memoryMb"),
            format!(
                "{mb} MiB is above what this device allows a module (policy.max_memory_mb: {max})"
            ),
        ));
    }
    if let Some(pids) = r.pids_limit
        && pids > policy.max_pids_limit
    {
        issues.push(Issue::new(
            format!("{at}/resources/pidsLimit"),
            format!(
                "{pids} is above what this device allows a module (policy.max_pids_limit: {})",
                policy.max_pids_limit
            ),
        ));
    }
}

fn port_ranges(ranges: &[(u16, u16)]) -> String {
    if ranges.is_empty() {
        return "none".into();
    }
    ranges
        .iter()
        .map(|(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "none".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether module `module` may bind host path `b.source`: resolved on this device without
/// following links, away from the agent's and the system's paths, read-only under
/// `allowed_host_paths`, or exactly the module's own folder under `writable_host_paths`.
fn host_path(module: &str, b: &Bind, policy: &PolicyConfig) -> Result<(), String> {
    let path = resolve_without_links(Path::new(b.source))?;
    for forbidden in &policy.forbidden_host_paths {
        // The forbidden path as the kernel sees it (`/var/run` is often a link to `/run`).
        let real = std::fs::canonicalize(forbidden).unwrap_or_else(|_| forbidden.clone());
        for f in [forbidden, &real] {
            if path.starts_with(f) || f.starts_with(&path) {
                return Err(format!(
                    "host path `{}` reaches `{}`, which no module may mount (the agent's state, \
                     keys and sockets, and /proc, /sys, /dev, /boot)",
                    b.source,
                    forbidden.display()
                ));
            }
        }
    }
    if let Some(prefix) = policy
        .writable_host_paths
        .iter()
        .find(|w| path.starts_with(w))
    {
        let own = prefix.join(module);
        return if path == own {
            Ok(())
        } else {
            Err(format!(
                "under `{}` a module may bind only its own folder `{}`: a module could plant \
                 links in anything else (policy.writable_host_paths)",
                prefix.display(),
                own.display()
            ))
        };
    }
    if policy
        .allowed_host_paths
        .iter()
        .any(|p| path.starts_with(p))
    {
        return if b.read_only {
            Ok(())
        } else {
            Err(format!(
                "host path `{}` may only be bound read-only (`:ro`); a module writes only to its \
                 own folder under policy.writable_host_paths ({})",
                b.source,
                list(&policy.writable_host_paths)
            ))
        };
    }
    Err(format!(
        "host path `{}` is not under a prefix this device allows (policy.allowed_host_paths: {}; \
         policy.writable_host_paths: {})",
        b.source,
        list(&policy.allowed_host_paths),
        list(&policy.writable_host_paths)
    ))
}

/// `path` (absolute, without `..`) as the kernel would resolve it, refusing any component that
/// is a symbolic link. Components that do not exist yet end the walk: the engine creates them
/// as directories.
pub fn resolve_without_links(path: &Path) -> Result<PathBuf, String> {
    let mut resolved = PathBuf::from("/");
    let mut exists = true;
    for c in path.components() {
        match c {
            std::path::Component::RootDir | std::path::Component::CurDir => continue,
            std::path::Component::Normal(part) => resolved.push(part),
            std::path::Component::ParentDir | std::path::Component::Prefix(_) => {
                return Err(format!(
                    "host path `{}` must be absolute without `..`",
                    path.display()
                ));
            }
        }
        if !exists {
            continue;
        }
        match std::fs::symlink_metadata(&resolved) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "host path `{}` goes through the symbolic link `{}`: links are refused, since \
                     a module may have planted them; bind the real path",
                    path.display(),
                    resolved.display()
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => exists = false,
            Err(e) => {
                return Err(format!(
                    "host path `{}` cannot be checked at `{}`: {e}",
                    path.display(),
                    resolved.display()
                ));
            }
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PolicyConfig {
        PolicyConfig {
            allowed_registries: vec!["127.0.0.1:5000".into()],
            allowed_host_paths: vec!["/srv/outpost/models".into()],
            writable_host_paths: vec!["/srv/outpost/data".into()],
            forbidden_host_paths: vec!["/var/lib/outpost".into(), "/proc".into()],
            ..PolicyConfig::default()
        }
    }

    fn facts() -> DeviceFacts {
        DeviceFacts {
            engine: true,
            arch: Some(Arch::X86_64),
            memory_mb: 1024,
        }
    }

    fn deployment(module: &str) -> Deployment {
        serde_json::from_str(&format!(
            r#"{{"schemaVersion":"1.0","id":"d","version":1,"modules":{{"a":{module}}}}}"#
        ))
        .unwrap()
    }

    fn refusals(module: &str, policy: &PolicyConfig) -> Vec<(String, String)> {
        check(&deployment(module), policy, facts())
            .into_iter()
            .map(|i| (i.path, i.message))
            .collect()
    }

    #[test]
    fn an_agent_update_needs_a_device_that_trusts_keys() {
        let mut d = deployment(
            r#"{"image":"ghcr.io/x/a@sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#,
        );
        d.agent = Some(crate::manifest::AgentSpec {
            version: "1.4.2".into(),
            artifacts: [(
                "linux/arm64".to_string(),
                crate::manifest::Artifact {
                    url: "https://dl.example.com/outpost".into(),
                    sha256: "ab".repeat(32),
                    size: 10,
                },
            )]
            .into(),
        });
        let refused = check(&d, &PolicyConfig::default(), facts());
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].path, "/agent");
        assert!(refused[0].message.contains("trusts no signing keys"));
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let signed = PolicyConfig {
            trusted_keys: crate::signing::TrustedKeys::new([key.verifying_key()]),
            ..PolicyConfig::default()
        };
        assert!(check(&d, &signed, facts()).is_empty());
    }

    #[test]
    fn each_rule_names_its_field() {
        let d = deployment(
            r#"{
            "image":"ghcr.io/x/a:1",
            "createOptions":{"HostConfig":{"Privileged":true,"NetworkMode":"host",
               "Binds":["/srv/outpost/models/m:/m:ro","/etc:/host-etc","/srv/outpost/models2:/x","vol:/v"]}},
            "requires":{"arch":["aarch64"],"minMemoryMb":4096}}"#,
        );
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
        let module = r#"{
            "image":"127.0.0.1:5000/a:1","requires":{"arch":["x86_64"]},
            "createOptions":{"HostConfig":{
                "Binds":["/srv/outpost/models/m:/m:ro","/srv/outpost/data/a:/data","state:/state"],
                "PortBindings":{"80/tcp":[{"HostPort":"8080"},{"HostIp":"127.0.0.1","HostPort":"8081"}]}}}}"#;
        assert_eq!(refusals(module, &policy()), []);
    }

    #[test]
    fn capabilities_are_added_only_when_listed_and_dangerous_ones_say_why() {
        let module = r#"{"image":"127.0.0.1:5000/a:1","createOptions":{"HostConfig":{
            "CapAdd":["DAC_READ_SEARCH","CAP_SYS_ADMIN","NET_BIND_SERVICE"]}}}"#;
        let found = refusals(module, &policy());
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/modules/a/createOptions/HostConfig/CapAdd/0",
                "/modules/a/createOptions/HostConfig/CapAdd/1",
                "/modules/a/createOptions/HostConfig/CapAdd/2",
            ]
        );
        assert!(found[0].1.contains("dangerous") && found[0].1.contains("open_by_handle_at"));
        assert!(found[1].1.contains("`SYS_ADMIN`") && found[1].1.contains("dangerous"));
        assert!(!found[2].1.contains("dangerous"));
        assert!(
            found
                .iter()
                .all(|(_, m)| m.contains("policy.allowed_capabilities"))
        );
        let allowing = PolicyConfig {
            allowed_capabilities: vec!["NET_BIND_SERVICE".into(), "SYS_ADMIN".into()],
            ..policy()
        };
        let found = refusals(module, &allowing);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].0.ends_with("CapAdd/0"));
    }

    #[test]
    fn writable_host_paths_give_each_module_only_its_own_folder() {
        let bind = |b: &str| {
            refusals(
                &format!(
                    r#"{{"image":"127.0.0.1:5000/a:1","createOptions":{{"HostConfig":{{"Binds":["{b}"]}}}}}}"#
                ),
                &policy(),
            )
        };
        assert_eq!(bind("/srv/outpost/data/a:/d"), []);
        assert_eq!(bind("/srv/outpost/data/a:/d:ro"), []);
        for refused in [
            "/srv/outpost/data/b:/d",
            "/srv/outpost/data/a/sub:/d",
            "/srv/outpost/data:/d:ro",
            "/srv/outpost/models/m:/m",
            "/srv/outpost:/d:ro",
            "/var/lib/outpost/keys:/k:ro",
            "/var/lib:/k:ro",
            "/proc/1:/p:ro",
            "/:/host:ro",
        ] {
            let found = bind(refused);
            assert_eq!(found.len(), 1, "{refused}: {found:?}");
            assert!(found[0].1.contains("policy.") || found[0].1.contains("no module may mount"));
        }
    }

    #[test]
    #[cfg(unix)]
    fn links_in_a_host_path_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("a")).unwrap();
        // What a module bound to data/a plants for its next version.
        std::os::unix::fs::symlink("/", data.join("a").join("root")).unwrap();
        let planted = data.join("a").join("root").join("etc");
        let err = resolve_without_links(&planted).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        // Paths that do not exist yet are fine: the engine creates them.
        let fresh = data.join("b").join("c");
        assert_eq!(resolve_without_links(&fresh).unwrap(), fresh);
        let p = PolicyConfig {
            allowed_host_paths: vec![dir.path().join("ro")],
            writable_host_paths: vec![data.clone()],
            ..PolicyConfig::default()
        };
        std::fs::create_dir_all(dir.path().join("ro")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("ro").join("etc")).unwrap();
        let module = format!(
            r#"{{"image":"127.0.0.1:5000/a:1","createOptions":{{"HostConfig":{{"Binds":["{}:/x:ro"]}}}}}}"#,
            dir.path().join("ro").join("etc").display()
        );
        let found = refusals(&module, &p);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.contains("symbolic link"), "{found:?}");
    }

    #[test]
    fn ports_devices_and_limits_follow_the_policy() {
        let module = r#"{"image":"127.0.0.1:5000/a:1",
            "resources":{"memoryMb":4096,"pidsLimit":100000},
            "createOptions":{"HostConfig":{
                "Devices":[{"PathOnHost":"/dev/video0"}],
                "PortBindings":{"80/tcp":[{"HostPort":"80"},{"HostIp":"0.0.0.0","HostPort":"8080"}]}}}}"#;
        let p = PolicyConfig {
            max_memory_mb: Some(1024),
            ..policy()
        };
        let found = refusals(module, &p);
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/modules/a/resources/memoryMb",
                "/modules/a/resources/pidsLimit",
                "/modules/a/createOptions/HostConfig/Devices/0/PathOnHost",
                "/modules/a/createOptions/HostConfig/PortBindings/80~1tcp/0/HostPort",
                "/modules/a/createOptions/HostConfig/PortBindings/80~1tcp/1/HostIp",
            ]
        );
        assert!(found[4].1.contains("every interface"));
        let open = PolicyConfig {
            max_memory_mb: Some(8192),
            max_pids_limit: 100_000,
            allowed_devices: vec!["/dev/video0".into()],
            allowed_host_ports: vec![(80, 80), (8000, 8999)],
            allowed_host_ips: vec!["127.0.0.1".parse().unwrap(), "0.0.0.0".parse().unwrap()],
            ..policy()
        };
        assert_eq!(refusals(module, &open), []);
    }

    #[test]
    fn with_keys_images_are_pinned_by_digest_unless_tags_are_allowed() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let keyed = PolicyConfig {
            trusted_keys: crate::signing::TrustedKeys::new([key.verifying_key()]),
            ..policy()
        };
        let tagged = r#"{"image":"127.0.0.1:5000/a:1"}"#;
        let found = refusals(tagged, &keyed);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.contains("digest") && found[0].1.contains("policy.allow_image_tags"));
        let pinned = format!(
            r#"{{"image":"127.0.0.1:5000/a@sha256:{}"}}"#,
            "ab".repeat(32)
        );
        assert_eq!(refusals(&pinned, &keyed), []);
        let lab = PolicyConfig {
            allow_image_tags: true,
            ..keyed
        };
        assert_eq!(refusals(tagged, &lab), []);
        assert_eq!(refusals(tagged, &policy()), []);
    }
}
