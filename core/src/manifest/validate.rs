//! The rules of a manifest that its schema cannot express. Each rule adds an [`Issue`] with the
//! JSON path of the field and a sentence saying what to change; all rules always run.
//!
//! Device-dependent checks (local policy, requirements, the version history) are not here: they
//! belong to intake on the device, which knows the device.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::image::{DEFAULT_REGISTRY, ImageRef};
use super::{Deployment, HostConfig, Issue, Module, SCHEMA_VERSION, pointer};

/// Most modules one deployment may hold.
pub const MAX_MODULES: usize = 100;
/// Most artifacts one deployment may name: each is a file fetched, stored and linked.
pub const MAX_ARTIFACTS: usize = 64;
/// Most environment variables per module, and the largest value.
pub const MAX_ENV: usize = 256;
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Environment names the agent sets for every module; a manifest may not override them.
pub const RESERVED_ENV_PREFIX: &str = "OUTPOST_";
/// Upstream streams the agent writes itself: a module's route may not write into them (it
/// could pass its records off as the agent's metrics). Names starting with `_` are refused by
/// the name rule already.
pub const RESERVED_STREAMS: &[&str] = &["metrics", "agent", "state"];
/// Label prefix the agent uses to recognise its own containers.
pub const RESERVED_LABEL_PREFIX: &str = "io.outpost.";

/// Whether `name` (without `CAP_`) is a Linux capability.
pub fn is_capability(name: &str) -> bool {
    CAPABILITIES.contains(&name)
}

/// Linux capabilities a module may add or drop (without the `CAP_` prefix).
const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// Checks every rule; an empty result means the manifest is valid.
pub fn validate(d: &Deployment) -> Vec<Issue> {
    let mut v = Validator::default();
    v.deployment(d);
    v.issues
}

#[derive(Default)]
struct Validator {
    issues: Vec<Issue>,
}

impl Validator {
    fn agent(&mut self, a: &super::AgentSpec) {
        if !crate::version::is_valid(&a.version)
            || a.version.len() > crate::version::MAX_VERSION_BYTES
        {
            self.push(
                "/agent/version",
                format!(
                    "`{}` is not a version such as `1.4.2` or `1.5.0-rc.1` (MAJOR.MINOR.PATCH, \
                     an optional -pre-release and +build, at most {} bytes)",
                    a.version,
                    crate::version::MAX_VERSION_BYTES
                ),
            );
        }
        if a.artifacts.is_empty() {
            self.push(
                "/agent/artifacts",
                "name at least one build, by platform (`linux/arm64`: {url, sha256, size})",
            );
        }
        for (platform, artifact) in &a.artifacts {
            let at = pointer("/agent/artifacts", platform);
            match crate::platform::Platform::parse(platform) {
                Err(e) => self.push(at.clone(), e),
                Ok(p) if p.to_string() != *platform => self.push(
                    at.clone(),
                    format!(
                        "write the platform as `{p}`: a device looks its build up by that name"
                    ),
                ),
                Ok(_) => {}
            }
            self.artifact(&at, artifact);
        }
    }

    /// The rules of a downloadable file, at `at`.
    fn artifact(&mut self, at: &str, a: &super::Artifact) {
        if let Err(e) = check_artifact_url(&a.url) {
            self.push(format!("{at}/url"), e);
        }
        if a.sha256.len() != 64
            || !a
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            self.push(
                format!("{at}/sha256"),
                format!(
                    "`{}` is not a SHA-256 digest: 64 lowercase hex digits (`sha256sum FILE`)",
                    a.sha256
                ),
            );
        }
        if a.size == 0 {
            self.push(
                format!("{at}/size"),
                "the size is the file's length in bytes, at least 1",
            );
        }
    }

    /// The deployment's artifacts and the modules' references to them: names are file names
    /// on the device, every reference resolves, every artifact is read by some module (like
    /// registry credentials: an unused one is a typo or a leftover), and one digest has one
    /// size (the device stores it once).
    fn artifacts(&mut self, d: &Deployment) {
        if d.artifacts.len() > MAX_ARTIFACTS {
            self.push(
                "/artifacts",
                format!(
                    "{} artifacts is more than the {MAX_ARTIFACTS} a deployment may name",
                    d.artifacts.len()
                ),
            );
        }
        let mut sizes: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
        for (name, artifact) in &d.artifacts {
            let at = pointer("/artifacts", name);
            if !is_dns_label(name) {
                self.push(
                    at.clone(),
                    format!(
                        "artifact name `{name}` is not valid: use 1 to 63 lowercase letters, \
                         digits and `-`, starting and ending with a letter or digit (it is the \
                         file's name in the module's artifact folder)"
                    ),
                );
            }
            self.artifact(&at, artifact);
            match sizes.get(artifact.sha256.as_str()) {
                Some((other, size)) if *size != artifact.size => self.push(
                    format!("{at}/size"),
                    format!(
                        "artifact `{other}` has the same SHA-256 with {size} bytes: one file \
                         has one size"
                    ),
                ),
                Some(_) => {}
                None => {
                    sizes.insert(&artifact.sha256, (name, artifact.size));
                }
            }
            if !d.modules.values().any(|m| m.artifacts.contains(name)) {
                self.push(
                    at,
                    format!(
                        "artifact `{name}` is not read by any module; remove it or name it in \
                         a module's `artifacts`"
                    ),
                );
            }
        }
        for (module, m) in &d.modules {
            let path = format!("{}/artifacts", pointer("/modules", module));
            for (i, name) in m.artifacts.iter().enumerate() {
                if !d.artifacts.contains_key(name) {
                    self.push(
                        format!("{path}/{i}"),
                        format!("artifact `{name}` is not defined in the deployment's `artifacts`"),
                    );
                } else if m.artifacts[..i].contains(name) {
                    self.push(
                        format!("{path}/{i}"),
                        format!("artifact `{name}` is listed twice; keep one"),
                    );
                }
            }
            if m.artifacts.is_empty() {
                continue;
            }
            let binds = m
                .create_options
                .as_ref()
                .and_then(|o| o.host_config.as_ref())
                .map_or(&[][..], |h| &h.binds[..]);
            for (i, bind) in binds.iter().enumerate() {
                if let Ok(b) = Bind::parse(bind)
                    && (b.target.trim_end_matches('/') == crate::spec::ARTIFACTS_MOUNT
                        || b.target
                            .starts_with(&format!("{}/", crate::spec::ARTIFACTS_MOUNT)))
                {
                    self.push(
                        format!(
                            "{}/createOptions/HostConfig/Binds/{i}",
                            pointer("/modules", module)
                        ),
                        format!(
                            "`{}` is where the agent mounts the module's artifacts; bind \
                             elsewhere",
                            crate::spec::ARTIFACTS_MOUNT
                        ),
                    );
                }
            }
        }
    }

    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue::new(path, message));
    }

    fn deployment(&mut self, d: &Deployment) {
        if d.schema_version != SCHEMA_VERSION {
            self.push(
                "/schemaVersion",
                format!(
                    "schema version `{}` is not supported; this agent reads \"{SCHEMA_VERSION}\"",
                    d.schema_version
                ),
            );
        }
        if !is_identifier(&d.id, 128) {
            self.push(
                "/id",
                format!(
                    "deployment id `{}` is not valid: 1 to 128 letters, digits, `.`, `_` or `-`, \
                     starting with a letter or digit",
                    d.id
                ),
            );
        }
        match &d.target {
            Some(super::Target::Device(name)) if !is_topic_level(name) => self.push(
                "/target/device",
                format!("device `{name}` is not a valid device id: 1 to 128 letters, digits, `.`, `_` or `-`"),
            ),
            Some(super::Target::Group(name)) if !is_topic_level(name) => self.push(
                "/target/group",
                format!("group `{name}` is not a valid group name: 1 to 128 letters, digits, `.`, `_` or `-`"),
            ),
            _ => {}
        }
        if let Some(at) = &d.expires_at
            && crate::time::parse_rfc3339(at).is_none()
        {
            self.push(
                "/expiresAt",
                format!("`{at}` is not an RFC 3339 time such as `2026-12-31T00:00:00Z`"),
            );
        }
        if d.modules.len() > MAX_MODULES {
            self.push(
                "/modules",
                format!(
                    "{} modules is more than the {MAX_MODULES} a deployment may hold",
                    d.modules.len()
                ),
            );
        }
        if let Some(agent) = &d.agent {
            self.agent(agent);
        }
        self.artifacts(d);
        let mut used_registries = BTreeSet::new();
        for (name, module) in &d.modules {
            let path = pointer("/modules", name);
            if !is_dns_label(name) {
                self.push(
                    path.clone(),
                    format!(
                        "module name `{name}` is not valid: use 1 to 63 lowercase letters, digits \
                         and `-`, starting and ending with a letter or digit"
                    ),
                );
            }
            if let Some(registry) = self.module(&path, module) {
                used_registries.insert(registry);
            }
        }
        // The engine keeps one image per reference: one platform per image.
        let mut platforms: BTreeMap<&str, (&str, Option<&str>)> = BTreeMap::new();
        for (name, module) in d
            .modules
            .iter()
            .filter(|(_, m)| m.runtime == super::RuntimeKind::Docker)
        {
            let platform = module.platform.as_deref();
            match platforms.get(module.image.as_str()) {
                Some((other, theirs)) if *theirs != platform => self.push(
                    format!("{}/platform", pointer("/modules", name)),
                    format!(
                        "module `{other}` runs the same image for {}; the engine keeps one platform per image reference, so pin the same platform or use another tag",
                        theirs.unwrap_or("the engine's platform")
                    ),
                ),
                Some(_) => {}
                None => {
                    platforms.insert(&module.image, (name, platform));
                }
            }
        }
        for (i, route) in d.routes.iter().enumerate() {
            let path = format!("/routes/{i}");
            self.route_from(&format!("{path}/from"), &route.from, d);
            self.route_to(&format!("{path}/to"), &route.to, d);
            if route.priority.is_some() && !route.to.starts_with("$upstream/") {
                self.push(
                    format!("{path}/priority"),
                    "`priority` applies to routes to `$upstream/STREAM` only",
                );
            }
            if d.routes[..i].contains(route) {
                self.push(path, "this route is listed twice; keep one");
            }
        }
        for (registry, credentials) in &d.registries {
            let path = pointer("/registries", registry);
            if !used_registries.contains(registry.as_str()) {
                self.push(
                    path.clone(),
                    format!(
                        "credentials for registry `{registry}` are not used by any module's \
                         image; remove them or fix the image names (images name the registry \
                         before the first `/`)"
                    ),
                );
            }
            if credentials.username.trim().is_empty() {
                self.push(format!("{path}/username"), "username is empty");
            }
            if credentials.password.expose().is_empty() {
                self.push(format!("{path}/password"), "password is empty");
            }
        }
    }

    /// Checks one module; returns the registry its image comes from when the image is valid.
    /// A process module's own rules: a command with an absolute executable, no image, none
    /// of the container-only settings.
    fn process_module(&mut self, path: &str, m: &Module) {
        if !m.image.is_empty() {
            self.push(
                format!("{path}/image"),
                "a process module runs its `command`, not an image: leave `image` out (or use runtime `docker`)",
            );
        }
        match m.command.first() {
            None => self.push(
                format!("{path}/command"),
                "a process module needs a `command`: the executable's absolute path, then its arguments",
            ),
            Some(exe) if !exe.starts_with('/') || exe.split('/').any(|c| c == "..") => self.push(
                format!("{path}/command/0"),
                format!("`{exe}` is not an absolute path without `..`: name the executable by its full path"),
            ),
            Some(_) => {}
        }
        for (i, arg) in m.command.iter().enumerate() {
            if arg.contains('\0') {
                self.push(format!("{path}/command/{i}"), "contains a NUL character");
            }
        }
        if let Some(dir) = &m.working_dir
            && (!dir.starts_with('/') || dir.split('/').any(|c| c == ".."))
        {
            self.push(
                format!("{path}/workingDir"),
                format!("`{dir}` is not an absolute path without `..`"),
            );
        }
        for (field, set) in [
            ("createOptions", m.create_options.is_some()),
            ("platform", m.platform.is_some()),
        ] {
            if set {
                self.push(
                    format!("{path}/{field}"),
                    format!("`{field}` is for docker modules; a process module has none"),
                );
            }
        }
    }

    fn module(&mut self, path: &str, m: &Module) -> Option<String> {
        let registry = match m.runtime {
            super::RuntimeKind::Process => {
                self.process_module(path, m);
                None
            }
            super::RuntimeKind::Docker => {
                if !m.command.is_empty() || m.working_dir.is_some() {
                    let field = if m.command.is_empty() {
                        "workingDir"
                    } else {
                        "command"
                    };
                    self.push(
                        format!("{path}/{field}"),
                        format!(
                            "`{field}` is for process modules; a docker module's is createOptions.{}",
                            if field == "command" { "Cmd" } else { "WorkingDir" }
                        ),
                    );
                }
                if m.image.is_empty() {
                    self.push(
                        format!("{path}/image"),
                        "required field `image` is missing: a docker module names its image",
                    );
                    None
                } else {
                    match ImageRef::parse(&m.image) {
                        Ok(image) => Some(image.registry),
                        Err(e) => {
                            self.push(format!("{path}/image"), e);
                            None
                        }
                    }
                }
            }
        };
        if let Some(platform) = &m.platform
            && let Err(e) = crate::platform::Platform::parse(platform)
        {
            self.push(format!("{path}/platform"), e);
        }
        if m.env.len() > MAX_ENV {
            self.push(
                format!("{path}/env"),
                format!(
                    "{} variables is more than the {MAX_ENV} allowed",
                    m.env.len()
                ),
            );
        }
        for (name, value) in &m.env {
            let at = pointer(&format!("{path}/env"), name);
            if !is_env_name(name) {
                self.push(
                    at.clone(),
                    format!(
                        "environment variable name `{name}` is not valid: use letters, digits \
                         and `_`, not starting with a digit"
                    ),
                );
            } else if name.starts_with(RESERVED_ENV_PREFIX) && !is_user_outpost_env(name) {
                self.push(
                    at.clone(),
                    format!(
                        "`{name}` is set by the agent (names starting with \
                         `{RESERVED_ENV_PREFIX}BUS_`, `{RESERVED_ENV_PREFIX}MODULE` or \
                         `{RESERVED_ENV_PREFIX}ARTIFACTS` are reserved); choose another name"
                    ),
                );
            }
            if value.contains('\0') {
                self.push(at.clone(), "value contains a NUL character");
            }
            if value.len() > MAX_ENV_VALUE_BYTES {
                self.push(
                    at,
                    format!(
                        "value is longer than {MAX_ENV_VALUE_BYTES} bytes; mount a file instead"
                    ),
                );
            }
        }
        if let Some(requires) = &m.requires {
            let mut seen = BTreeSet::new();
            for (i, arch) in requires.arch.iter().enumerate() {
                if !seen.insert(arch) {
                    self.push(
                        format!("{path}/requires/arch/{i}"),
                        format!("`{arch}` is listed twice"),
                    );
                }
            }
        }
        if let Some(options) = &m.create_options {
            let at = format!("{path}/createOptions");
            for (field, args) in [("Cmd", &options.cmd), ("Entrypoint", &options.entrypoint)] {
                for (i, arg) in args.iter().flatten().enumerate() {
                    if arg.contains('\0') {
                        self.push(
                            format!("{at}/{field}/{i}"),
                            "argument contains a NUL character",
                        );
                    }
                }
            }
            if let Some(user) = &options.user
                && !is_user(user)
            {
                self.push(
                    format!("{at}/User"),
                    format!("user `{user}` is not valid: `uid`, `uid:gid` or a user name"),
                );
            }
            if let Some(dir) = &options.working_dir
                && !dir.starts_with('/')
            {
                self.push(
                    format!("{at}/WorkingDir"),
                    format!("working directory `{dir}` must be an absolute path"),
                );
            }
            for key in options.labels.keys() {
                if key.starts_with(RESERVED_LABEL_PREFIX) {
                    self.push(
                        pointer(&format!("{at}/Labels"), key),
                        format!(
                            "labels under `{RESERVED_LABEL_PREFIX}` are the agent's own; \
                             choose another key"
                        ),
                    );
                }
            }
            if let Some(host) = &options.host_config {
                self.host_config(&format!("{at}/HostConfig"), host);
            }
        }
        registry
    }

    fn host_config(&mut self, at: &str, h: &HostConfig) {
        for (i, bind) in h.binds.iter().enumerate() {
            if let Err(e) = Bind::parse(bind) {
                self.push(format!("{at}/Binds/{i}"), e);
            }
        }
        for (port, bindings) in &h.port_bindings {
            let path = pointer(&format!("{at}/PortBindings"), port);
            if !is_container_port(port) {
                self.push(
                    path.clone(),
                    format!(
                        "`{port}` is not a container port: use `PORT/tcp`, `PORT/udp`, `PORT/sctp` or `PORT`"
                    ),
                );
            }
            for (i, b) in bindings.iter().enumerate() {
                if !b.host_port.parse::<u16>().is_ok_and(|p| p > 0) {
                    self.push(
                        format!("{path}/{i}/HostPort"),
                        format!("host port `{}` is not a port number (1-65535)", b.host_port),
                    );
                }
                if let Some(ip) = &b.host_ip
                    && !ip.is_empty()
                    && ip.parse::<IpAddr>().is_err()
                {
                    self.push(
                        format!("{path}/{i}/HostIp"),
                        format!("`{ip}` is not an IP address"),
                    );
                }
            }
        }
        for (i, device) in h.devices.iter().enumerate() {
            let path = format!("{at}/Devices/{i}");
            if !device.path_on_host.starts_with("/dev/") || device.path_on_host.contains("..") {
                self.push(
                    format!("{path}/PathOnHost"),
                    format!(
                        "`{}` must be a device path under /dev/",
                        device.path_on_host
                    ),
                );
            }
            if let Some(p) = &device.path_in_container
                && !p.starts_with('/')
            {
                self.push(
                    format!("{path}/PathInContainer"),
                    format!("`{p}` must be an absolute path"),
                );
            }
            if let Some(perms) = &device.cgroup_permissions
                && (perms.is_empty() || !perms.chars().all(|c| matches!(c, 'r' | 'w' | 'm')))
            {
                self.push(
                    format!("{path}/CgroupPermissions"),
                    format!("`{perms}` must be made of `r`, `w` and `m`"),
                );
            }
        }
        for (field, caps) in [("CapAdd", &h.cap_add), ("CapDrop", &h.cap_drop)] {
            for (i, cap) in caps.iter().enumerate() {
                let name = cap.strip_prefix("CAP_").unwrap_or(cap);
                let ok = CAPABILITIES.contains(&name) || (field == "CapDrop" && name == "ALL");
                if !ok {
                    let hint = if name == "ALL" {
                        "adding every capability is what `Privileged` does; use that, which \
                         the device policy controls"
                    } else {
                        "use a Linux capability name such as `NET_ADMIN`"
                    };
                    self.push(
                        format!("{at}/{field}/{i}"),
                        format!("`{cap}` is not allowed: {hint}"),
                    );
                }
            }
        }
        for (i, entry) in h.extra_hosts.iter().enumerate() {
            let ok = entry.split_once(':').is_some_and(|(host, ip)| {
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
                    && ip.parse::<IpAddr>().is_ok()
            });
            if !ok {
                self.push(
                    format!("{at}/ExtraHosts/{i}"),
                    format!("`{entry}` must be `hostname:IP`"),
                );
            }
        }
    }

    fn route_from(&mut self, at: &str, from: &str, d: &Deployment) {
        let levels: Vec<&str> = from.split('/').collect();
        let shape_ok = levels.len() >= 4 && levels[0] == "modules" && levels[2] == "outputs";
        if !shape_ok {
            self.push(
                at,
                format!(
                    "route source `{from}` must be `modules/NAME/outputs/...` (a topic filter)"
                ),
            );
            return;
        }
        if let Err(e) = check_topic(from, true) {
            self.push(at, format!("route source `{from}`: {e}"));
        }
        let module = levels[1];
        if module != "+" && !d.modules.contains_key(module) {
            self.push(
                at,
                format!("route source names module `{module}`, which is not in this deployment"),
            );
        }
    }

    fn route_to(&mut self, at: &str, to: &str, d: &Deployment) {
        if let Some(stream) = to.strip_prefix("$upstream/") {
            if !is_identifier(stream, 64) {
                self.push(
                    at,
                    format!(
                        "upstream stream `{stream}` is not valid: 1 to 64 letters, digits, `.`, \
                         `_` or `-`"
                    ),
                );
            } else if RESERVED_STREAMS.contains(&stream) {
                self.push(
                    at,
                    format!(
                        "upstream stream `{stream}` is the agent's own (reserved: {}); name the module's stream otherwise",
                        RESERVED_STREAMS.join(", ")
                    ),
                );
            }
            return;
        }
        let levels: Vec<&str> = to.split('/').collect();
        if levels.len() < 4 || levels[0] != "modules" || levels[2] != "inputs" {
            self.push(
                at,
                format!(
                    "route target `{to}` must be `$upstream/STREAM` or `modules/NAME/inputs/TOPIC`"
                ),
            );
            return;
        }
        if let Err(e) = check_topic(to, false) {
            self.push(at, format!("route target `{to}`: {e}"));
        }
        if !d.modules.contains_key(levels[1]) {
            self.push(
                at,
                format!(
                    "route target names module `{}`, which is not in this deployment",
                    levels[1]
                ),
            );
        }
    }
}

/// A bind mount, `source:target[:ro|rw]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    /// An absolute host path, or a named volume.
    pub source: &'a str,
    pub target: &'a str,
    pub read_only: bool,
}

impl<'a> Bind<'a> {
    pub fn parse(bind: &'a str) -> Result<Bind<'a>, String> {
        let parts: Vec<&str> = bind.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [s, t] => (*s, *t, None),
            [s, t, m] => (*s, *t, Some(*m)),
            _ => {
                return Err(format!(
                    "bind `{bind}` must be `SOURCE:TARGET` or `SOURCE:TARGET:ro`"
                ));
            }
        };
        let read_only = match mode {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(m) => return Err(format!("bind mode `{m}` in `{bind}` must be `ro` or `rw`")),
        };
        if source.starts_with('/') {
            if source.split('/').any(|c| c == "..") {
                return Err(format!("bind source `{source}` must not contain `..`"));
            }
        } else if !is_identifier(source, 128) {
            return Err(format!(
                "bind source `{source}` must be an absolute host path or a volume name"
            ));
        }
        if !target.starts_with('/') || target.split('/').any(|c| c == "..") {
            return Err(format!(
                "bind target `{target}` must be an absolute path without `..`"
            ));
        }
        Ok(Bind {
            source,
            target,
            read_only,
        })
    }

    /// Whether the source is a host path (as opposed to a named volume).
    pub fn is_host_path(&self) -> bool {
        self.source.starts_with('/')
    }
}

/// Checks an MQTT topic (or a filter when `filter` is true): non-empty levels' characters, and
/// wildcards only where MQTT allows them.
/// Whether an artifact URL is one the agent can fetch: `https://host/…`, `http://host/…` (the
/// digest protects the content) or `file:///absolute/path`, without credentials in it (they
/// would be reported and logged with the URL).
pub fn check_artifact_url(url: &str) -> Result<(), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "`{url}` is not a URL: use https://…, http://… or file:///absolute/path"
        ));
    };
    match scheme {
        "https" | "http" => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if authority.is_empty() {
                return Err(format!("`{url}` names no host"));
            }
            if authority.contains('@') {
                return Err(format!(
                    "`{url}` carries credentials: they would show in logs and reported state; serve the file without them (its digest protects it)"
                ));
            }
            if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("`{url}` holds spaces or control characters"));
            }
            Ok(())
        }
        "file" => {
            if !rest.starts_with('/') {
                return Err(format!(
                    "`{url}` is not an absolute file URL: write file:///absolute/path"
                ));
            }
            if rest.split('/').any(|c| c == "..") {
                return Err(format!("`{url}` climbs out of its folder with `..`"));
            }
            Ok(())
        }
        other => Err(format!(
            "scheme `{other}` is not one the agent fetches: use https, http or file"
        )),
    }
}

pub fn check_topic(topic: &str, filter: bool) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 1024 {
        return Err("a topic must be 1 to 1024 bytes".into());
    }
    if topic.contains('\0') {
        return Err("a topic must not contain NUL".into());
    }
    let levels: Vec<&str> = topic.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wildcard = level.contains('+') || level.contains('#');
        if !wildcard {
            continue;
        }
        if !filter {
            return Err("wildcards `+` and `#` are only allowed in filters".into());
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err("`#` is only allowed as the last level".into());
        }
        if *level != "#" && *level != "+" {
            return Err("`+` and `#` must stand alone in their level".into());
        }
    }
    Ok(())
}

/// Module names are DNS labels: 1 to 63 lowercase letters, digits and `-`.
pub fn is_module_name(s: &str) -> bool {
    is_dns_label(s)
}

/// A device id or group name: one MQTT topic level of safe characters.
pub fn is_topic_level(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Letters, digits, `.`, `_`, `-`, starting with a letter or digit, at most `max` bytes.
fn is_identifier(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `OUTPOST_*` names the agent does not set itself stay free for modules (e.g. `OUTPOST_MODEL`).
fn is_user_outpost_env(name: &str) -> bool {
    let rest = &name[RESERVED_ENV_PREFIX.len()..];
    !(rest.starts_with("BUS_") || rest.starts_with("MODULE") || rest.starts_with("ARTIFACTS"))
}

fn is_user(s: &str) -> bool {
    let numeric = |p: &str| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit());
    let name = |p: &str| {
        !p.is_empty()
            && p.len() <= 32
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    match s.split_once(':') {
        Some((u, g)) => (numeric(u) || name(u)) && (numeric(g) || name(g)),
        None => numeric(s) || name(s),
    }
}

fn is_container_port(s: &str) -> bool {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    port.parse::<u16>().is_ok_and(|p| p > 0) && matches!(proto, "tcp" | "udp" | "sctp")
}

/// The registry an image is pulled from, as credentials and policy name it.
pub fn registry_of(image: &str) -> String {
    ImageRef::parse(image).map_or_else(|_| DEFAULT_REGISTRY.to_string(), |i| i.registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters() {
        assert!(check_topic("modules/a/outputs/#", true).is_ok());
        assert!(check_topic("modules/+/outputs/x", true).is_ok());
        assert!(check_topic("modules/a/outputs/#/x", true).is_err());
        assert!(check_topic("modules/a/out+/x", true).is_err());
        assert!(check_topic("modules/a/inputs/+", false).is_err());
    }

    #[test]
    fn binds() {
        let b = Bind::parse("/var/lib/outpost/models:/models:ro").unwrap();
        assert!(b.read_only && b.is_host_path());
        assert!(Bind::parse("data:/data").is_ok());
        assert!(Bind::parse("/a/../etc:/x").is_err());
        assert!(Bind::parse("/a:rel").is_err());
        assert!(Bind::parse("/a:/b:z").is_err());
        assert!(Bind::parse("/a").is_err());
    }

    fn issues_of(json: &str) -> Vec<(String, String)> {
        let d: Deployment = serde_json::from_str(json).unwrap();
        validate(&d)
            .into_iter()
            .map(|i| (i.path, i.message))
            .collect()
    }

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn artifacts_are_named_used_and_resolved() {
        let ok = format!(
            r#"{{"schemaVersion":"1.0","id":"d","version":1,
            "artifacts":{{"model":{{"url":"https://h/m.onnx","sha256":"{DIGEST}","size":5}}}},
            "modules":{{"a":{{"image":"r.io/a:1","artifacts":["model"]}},
                        "b":{{"image":"r.io/b:1","artifacts":["model"]}}}}}}"#
        );
        assert_eq!(issues_of(&ok), [], "one artifact shared by two modules");

        let bad = format!(
            r#"{{"schemaVersion":"1.0","id":"d","version":1,
            "artifacts":{{
                "model":{{"url":"https://h/m.onnx","sha256":"{DIGEST}","size":5}},
                "Bad_Name":{{"url":"ftp://h/x","sha256":"sha256:00","size":0}},
                "spare":{{"url":"https://h/s","sha256":"{DIGEST}","size":6}}}},
            "modules":{{"a":{{"image":"r.io/a:1","artifacts":["model","labels","model","Bad_Name","spare"],
                "createOptions":{{"HostConfig":{{"Binds":["/srv/x:/outpost/artifacts:ro"]}}}}}}}}}}"#
        );
        let issues = issues_of(&bad);
        let has = |path: &str, fragment: &str| {
            assert!(
                issues
                    .iter()
                    .any(|(p, m)| p == path && m.contains(fragment)),
                "no `{fragment}` at {path}: {issues:#?}"
            );
        };
        has("/artifacts/Bad_Name", "is not valid");
        has("/artifacts/Bad_Name/url", "scheme `ftp`");
        has("/artifacts/Bad_Name/sha256", "64 lowercase hex digits");
        has("/artifacts/Bad_Name/size", "at least 1");
        has("/artifacts/spare/size", "same SHA-256");
        has("/modules/a/artifacts/1", "`labels` is not defined");
        has("/modules/a/artifacts/2", "listed twice");
        has(
            "/modules/a/createOptions/HostConfig/Binds/0",
            "mounts the module's artifacts",
        );

        let unused = format!(
            r#"{{"schemaVersion":"1.0","id":"d","version":1,
            "artifacts":{{"model":{{"url":"file:///srv/m","sha256":"{DIGEST}","size":5}}}},
            "modules":{{"a":{{"image":"r.io/a:1"}}}}}}"#
        );
        assert_eq!(
            issues_of(&unused),
            [(
                "/artifacts/model".to_string(),
                "artifact `model` is not read by any module; remove it or name it in a \
                 module's `artifacts`"
                    .to_string()
            )]
        );
    }

    #[test]
    fn artifacts_are_capped() {
        let artifacts: Vec<String> = (0..=MAX_ARTIFACTS)
            .map(|i| format!(r#""a{i}":{{"url":"file:///m{i}","sha256":"{DIGEST}","size":5}}"#))
            .collect();
        let names: Vec<String> = (0..=MAX_ARTIFACTS).map(|i| format!(r#""a{i}""#)).collect();
        let json = format!(
            r#"{{"schemaVersion":"1.0","id":"d","version":1,"artifacts":{{{}}},
            "modules":{{"a":{{"image":"r.io/a:1","artifacts":[{}]}}}}}}"#,
            artifacts.join(","),
            names.join(",")
        );
        let issues = issues_of(&json);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].0, "/artifacts");
    }

    #[test]
    fn names() {
        assert!(is_dns_label("infer-2"));
        assert!(!is_dns_label("Infer"));
        assert!(!is_dns_label("-a"));
        assert!(is_env_name("OUTPOST_MODEL"));
        assert!(!is_env_name("1X"));
        assert!(is_user_outpost_env("OUTPOST_MODEL"));
        assert!(!is_user_outpost_env("OUTPOST_BUS_URL"));
        assert!(!is_user_outpost_env("OUTPOST_ARTIFACTS_DIR"));
        assert!(is_user("1000:1000") && is_user("nobody") && !is_user("a b"));
    }
}
