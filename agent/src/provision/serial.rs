//! The device's serial: the one thing that tells boards flashed from the same image apart.

use std::time::Duration;

use outpost_core::wire::provisioning::is_valid_serial;

use crate::config::SerialSource;

/// How long a serial command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot read the serial from {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serial command `{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error(
        "the serial `{serial}` from {from} is not usable: 1 to 128 letters, digits, `.`, `_` or `-`"
    )]
    Invalid { serial: String, from: String },
}

/// Reads the serial from its source: trimmed of whitespace and the NULs device-tree files end
/// with.
pub async fn read(source: &SerialSource) -> Result<String, SerialError> {
    let (text, from) = match source {
        SerialSource::File(path) => (
            tokio::fs::read(path)
                .await
                .map_err(|source| SerialError::Read {
                    path: path.clone(),
                    source,
                })?,
            path.display().to_string(),
        ),
        SerialSource::Command(command) => {
            let run = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(command)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(COMMAND_TIMEOUT, run)
                .await
                .map_err(|_| SerialError::Command {
                    command: command.clone(),
                    message: format!("no answer in {} s", COMMAND_TIMEOUT.as_secs()),
                })?
                .map_err(|e| SerialError::Command {
                    command: command.clone(),
                    message: e.to_string(),
                })?;
            if !out.status.success() {
                return Err(SerialError::Command {
                    command: command.clone(),
                    message: format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
            (out.stdout, format!("`{command}`"))
        }
    };
    let serial = String::from_utf8_lossy(&text)
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_string();
    if !is_valid_serial(&serial) {
        return Err(SerialError::Invalid { serial, from });
    }
    Ok(serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serials_come_from_files_and_commands() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("serial-number");
        // Device-tree strings end with a NUL.
        std::fs::write(&file, b"00000000c0ffee42\0").unwrap();
        assert_eq!(
            read(&SerialSource::File(file.clone())).await.unwrap(),
            "00000000c0ffee42"
        );
        assert_eq!(
            read(&SerialSource::Command("echo ' SN-7 '".into()))
                .await
                .unwrap(),
            "SN-7"
        );
        std::fs::write(&file, "a/b\n").unwrap();
        let err = read(&SerialSource::File(file)).await.unwrap_err();
        assert!(err.to_string().contains("`a/b`"), "{err}");
        let err = read(&SerialSource::Command("exit 3".into()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("exit status: 3"), "{err}");
    }
}
