//! The Debian package and the golden image (issue 15, parts 6 and 7), made by the scripts a
//! person uses — `scripts/package-deb` (cargo-deb, from this run's dev build of `outpost`:
//! no release build) and `scripts/golden-image` (debootstrap's minbase, cached per machine) —
//! and checked as they would be installed:
//!
//! - the package's control data and files, unpacked into a scratch root with `dpkg -x`; the
//!   unit passes `systemd-analyze verify`; the installed binary runs, and `config check` on
//!   the shipped default says what is missing (exit 78) rather than crash;
//! - the maintainer scripts in a Debian tree (chroot, no systemd running): a first install
//!   on the default config neither enables nor starts the agent and says why; a configured
//!   reinstall enables it; remove keeps /var/lib/outpost and masks the unit; purge removes
//!   them;
//! - the golden image's x86_64 tree: the agent, unit, configuration and claim files in
//!   place, the unit enabled, no machine id or state baked in, and the agent runs inside it.
//!   Running it through provisioning is the provisioning test's (`golden_tree` in
//!   tests/support/image.rs).
//!
//! Needs dpkg-deb, systemd-analyze and cargo-deb; the tree tests also root and debootstrap
//! (scripts/setup installs them all). With `CI=true` a missing one fails the test.

use std::path::Path;
use std::process::Command;

use outpost_e2e::*;

const DEFAULT_CONFIG: &str = "etc/outpost/config.toml";
const UNIT: &str = "lib/systemd/system/outpost.service";
const WANTS: &str = "etc/systemd/system/multi-user.target.wants/outpost.service";

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    run(Command::new("dpkg-deb").args(args).arg(deb))
}

#[test]
fn the_package_holds_the_agent_unit_and_config_and_its_unit_verifies() {
    let cargo_deb = cargo_deb().display().to_string();
    if !have_tools(
        "package",
        &["dpkg-deb", "systemd-analyze", &cargo_deb],
        false,
    ) {
        return;
    }
    let deb = package_deb();

    // Control data: the name, architecture, dependencies, and the maintainer scripts.
    let info = dpkg_deb(&["-I"], &deb);
    for line in [
        "Package: outpost",
        "Architecture: amd64",
        "Section: admin",
        "Recommends: docker.io | docker-ce",
    ] {
        assert!(
            info.contains(line),
            "no `{line}` in the control data:\n{info}"
        );
    }
    let depends = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"));
    assert!(
        depends.starts_with("libc6"),
        "the dynamic amd64 build depends on libc6:\n{info}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(script), "no {script} in the package:\n{info}");
    }
    let conffiles = run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --ctrl-tarfile '{}' | tar -xOf - ./conffiles",
        deb.display()
    )));
    assert_eq!(conffiles.trim(), "/etc/outpost/config.toml", "conffiles");

    // The files, with their modes.
    let list = dpkg_deb(&["-c"], &deb);
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/outpost"),
        ("-rw-r--r--", "./lib/systemd/system/outpost.service"),
        ("-rw-r--r--", "./etc/outpost/config.toml"),
        ("-rw-r--r--", "./usr/share/doc/outpost/install.md"),
    ] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "no {path} ({mode}) in the package:\n{list}"
        );
    }

    // Unpacked into a scratch root.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(root));
    let bin = root.join("usr/bin/outpost");

    // The unit verifies, and keeps the hardening the docs describe.
    let said = verify_unit(&root.join(UNIT), &bin);
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warns:\n{said}"
    );
    let unit = std::fs::read_to_string(root.join(UNIT)).unwrap();
    for line in [
        "StateDirectory=outpost",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "RestartPreventExitStatus=78",
        "CapabilityBoundingSet=\n",
        "ExecStart=/usr/bin/outpost --config /etc/outpost/config.toml run",
    ] {
        assert!(unit.contains(line), "the unit has no `{}`", line.trim());
    }

    // The installed binary runs...
    let version = run(Command::new(&bin).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("outpost {}", env!("CARGO_PKG_VERSION")),
        "--version"
    );
    // ...and on the shipped default, `config check` names what is missing, with the
    // configuration error's exit code (the postinst relies on it to leave the agent off).
    let out = output(
        Command::new(&bin)
            .arg("--config")
            .arg(root.join(DEFAULT_CONFIG))
            .args(["config", "check"]),
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(78), "config check:\n{said}");
    assert!(
        said.contains("device_id") && said.contains("is required"),
        "config check names the missing device_id:\n{said}"
    );
}

fn chroot(root: &Path, script: &str) -> std::process::Output {
    output(
        Command::new("chroot")
            .arg(root)
            .args(["/bin/sh", "-c", script]),
    )
}

#[test]
fn maintainer_scripts_leave_an_unconfigured_agent_off_and_purge_its_state() {
    let cargo_deb = cargo_deb().display().to_string();
    if !have_tools(
        "maintainer scripts",
        &["dpkg-deb", "debootstrap", "chroot", &cargo_deb],
        true,
    ) {
        return;
    }
    let deb = package_deb();
    let tree = base_tree("amd64");
    let root = &tree.root;
    std::fs::copy(&deb, root.join("tmp/outpost.deb")).unwrap();

    // A first install on the default config: installed, not enabled, told why.
    let out = chroot(root, "dpkg -i /tmp/outpost.deb");
    let said = text(&out);
    assert!(out.status.success(), "dpkg -i:\n{said}");
    assert!(
        said.contains("not enabled or started") && said.contains("device_id"),
        "the postinst says why the agent is off, and what is missing:\n{said}"
    );
    assert!(
        root.join("usr/bin/outpost").is_file() && !root.join(WANTS).exists(),
        "installed, and not enabled"
    );
    let state = root.join("var/lib/outpost");
    assert!(state.is_dir(), "the postinst makes /var/lib/outpost");
    let mode = std::os::unix::fs::PermissionsExt::mode(&state.metadata().unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "/var/lib/outpost is private");

    // Configured (a device with its own name, local deployments only), then reinstalled:
    // now the postinst enables it (systemd is not running here, so nothing starts).
    let config = root.join(DEFAULT_CONFIG);
    let text_config = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("device_id = \"pkg-test\"\n{text_config}")).unwrap();
    let out = chroot(root, "dpkg -i /tmp/outpost.deb");
    let said = text(&out);
    assert!(out.status.success(), "dpkg -i (configured):\n{said}");
    assert!(!said.contains("not enabled"), "configured now:\n{said}");
    assert!(
        root.join(WANTS).is_symlink(),
        "a configured install enables the unit:\n{said}"
    );
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .starts_with("device_id = \"pkg-test\""),
        "the admin's config survives a reinstall (conffile)"
    );

    // Some state, as a running agent would leave it.
    std::fs::write(state.join("outpost.redb"), b"state").unwrap();

    // Remove: the binary goes; the state, the config and the enablement stay, masked.
    let out = chroot(root, "dpkg -r outpost");
    assert!(out.status.success(), "dpkg -r:\n{}", text(&out));
    assert!(!root.join("usr/bin/outpost").exists(), "removed");
    assert!(
        state.join("outpost.redb").is_file(),
        "remove keeps /var/lib/outpost"
    );
    assert!(config.is_file(), "remove keeps the configuration");
    let mask = root.join("etc/systemd/system/outpost.service");
    assert_eq!(
        std::fs::read_link(&mask).ok().as_deref(),
        Some(Path::new("/dev/null")),
        "remove masks the unit"
    );

    // Purge: state, configuration, enablement and mask all go.
    let out = chroot(root, "dpkg -P outpost");
    assert!(out.status.success(), "dpkg -P:\n{}", text(&out));
    for gone in [
        state.as_path(),
        config.as_path(),
        &root.join(WANTS),
        mask.as_path(),
    ] {
        assert!(
            !gone.exists() && !gone.is_symlink(),
            "{} is left after purge",
            gone.display()
        );
    }
}

#[test]
fn the_golden_tree_has_the_agent_enabled_with_a_provisioning_config() {
    let cargo_deb = cargo_deb().display().to_string();
    if !have_tools(
        "golden image",
        &[
            "dpkg-deb",
            "debootstrap",
            "chroot",
            "systemd-analyze",
            &cargo_deb,
        ],
        true,
    ) {
        return;
    }
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path(), "claim-batch-1").unwrap();
    let tree = golden_tree(
        "amd64",
        &Golden {
            hub_url: "mqtts://127.0.0.1:8883".into(),
            ca_file: pki.ca.clone(),
            claim_cert: pki.client_cert.clone(),
            claim_key: pki.client_key.clone(),
            serial_file: None,
        },
    );
    let root = &tree.root;

    // In place: the agent, its unit (enabled for first boot), the claim files.
    assert!(root.join("usr/bin/outpost").is_file());
    assert!(root.join(WANTS).is_symlink(), "the unit is enabled");
    verify_unit(&root.join(UNIT), &root.join("usr/bin/outpost"));
    let etc = root.join("etc/outpost");
    assert_eq!(
        std::fs::read(etc.join("claim.key")).unwrap(),
        std::fs::read(&pki.client_key).unwrap()
    );
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &etc.join("claim.key").metadata().unwrap().permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the claim key is private");
    assert!(etc.join("claim.pem").is_file() && etc.join("hub-ca.pem").is_file());

    // The configuration: hub and provisioning, no device_id (each device gets its own).
    let config = std::fs::read_to_string(etc.join("config.toml")).unwrap();
    for line in [
        "[hub]\nurl = \"mqtts://127.0.0.1:8883\"\nca_file = \"hub-ca.pem\"",
        "[provisioning]\nclaim_cert_file = \"claim.pem\"\nclaim_key_file = \"claim.key\"\nserial_file = \"/etc/machine-id\"",
    ] {
        assert!(config.contains(line), "no `{line}` in:\n{config}");
    }
    assert!(
        !config
            .lines()
            .any(|l| l.trim_start().starts_with("device_id")),
        "no device_id:\n{config}"
    );

    // Nothing that must differ per board is baked in.
    assert_eq!(
        std::fs::read(root.join("etc/machine-id")).unwrap(),
        b"",
        "an empty machine id: systemd makes one at first boot"
    );
    assert_eq!(
        std::fs::read_dir(root.join("var/lib/outpost"))
            .unwrap()
            .count(),
        0,
        "no agent state in the image"
    );

    // The agent runs inside the tree.
    let version = run(tree.outpost().arg("--version"));
    assert!(version.starts_with("outpost "), "{version}");
    tree.first_boot_machine_id("0123456789abcdef0123456789abcdef");
    let out = output(tree.outpost().args(["config", "check"]));
    let said = text(&out);
    assert!(
        out.status.success(),
        "config check in the golden tree:\n{said}"
    );
    assert!(said.contains("given at first boot"), "{said}");
}
