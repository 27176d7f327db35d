//! The device binary's exit codes for its configuration, through the real `outpost` binary.

use std::process::Command;

#[test]
fn a_bad_config_exits_with_the_config_code() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "device_id = \"a\"\nbogus = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("--config")
        .arg(&config)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `bogus`"));
}

#[test]
fn the_device_binary_has_no_operator_commands() {
    for command in ["hub", "keys"] {
        let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "`outpost {command}` should not exist"
        );
    }
}
