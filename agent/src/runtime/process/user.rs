//! Which user process modules run as (`runtime.process_user`).
//!
//! A process module runs outside any container, with the rights of its user. The agent runs
//! as root (it manages the engine, cgroups and its own updates), so a module started as the
//! agent would be root on the host: anything a deployment may run could then read the
//! device's keys or lift its own limits. As Greengrass runs components as `ggc_user`, an agent
//! running as root starts process modules as an unprivileged user: `nobody` unless the device
//! names another. Root is only what the device's own configuration asks for by name.

use std::fmt;
use std::path::Path;

/// `runtime.process_user` as configured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Setting {
    /// Unset: `nobody` when the agent is root, else the agent's own user.
    #[default]
    Default,
    /// `name`, `uid` or `uid:gid`.
    Named(String),
}

impl Setting {
    /// Checks the syntax (names are looked up when the agent starts, on the device).
    pub fn parse(value: &str) -> Result<Setting, String> {
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                && !s.starts_with('-')
        };
        let ok = match value.split_once(':') {
            Some((u, g)) => u.parse::<u32>().is_ok() && g.parse::<u32>().is_ok(),
            None => valid_name(value),
        };
        if ok {
            Ok(Setting::Named(value.to_string()))
        } else {
            Err(format!(
                "`{value}` is not a user name, a uid or `uid:gid` (numbers)"
            ))
        }
    }
}

/// The user a module's process gets: `None` in [`resolve`]'s answer means the agent's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// `nobody`'s ids where `/etc/passwd` has no `nobody` (a minimal image): the kernel's overflow
/// ids, which Debian's `nobody:nogroup` also are.
const NOBODY: RunAs = RunAs {
    uid: 65534,
    gid: 65534,
};

/// Resolves `setting` for an agent running as `agent_uid`, names looked up in `passwd` (the
/// text of `/etc/passwd`). `Ok(None)`: modules run as the agent.
pub fn resolve(setting: &Setting, agent_uid: u32, passwd: &str) -> Result<Option<RunAs>, String> {
    let wanted = match setting {
        Setting::Default if agent_uid != 0 => return Ok(None),
        Setting::Default => lookup(passwd, "nobody").unwrap_or(NOBODY),
        Setting::Named(value) => match value.split_once(':') {
            Some((u, g)) => RunAs {
                uid: u.parse().map_err(|_| format!("`{value}`: not a number"))?,
                gid: g.parse().map_err(|_| format!("`{value}`: not a number"))?,
            },
            None => match value.parse::<u32>() {
                // A bare uid: its group from passwd, else the same number.
                Ok(uid) => RunAs {
                    uid,
                    gid: gid_of(passwd, uid).unwrap_or(uid),
                },
                Err(_) => lookup(passwd, value)
                    .ok_or_else(|| format!("there is no user `{value}` in /etc/passwd"))?,
            },
        },
    };
    if wanted.uid == agent_uid {
        return Ok(None);
    }
    if agent_uid != 0 {
        return Err(format!(
            "the agent runs as uid {agent_uid} and cannot start processes as {wanted}: run it as \
             root, or leave runtime.process_user out to run process modules as the agent's user"
        ));
    }
    Ok(Some(wanted))
}

/// The current process's effective uid.
pub fn agent_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// [`resolve`] for this agent, reading `/etc/passwd` (missing: no names known).
pub fn resolve_here(setting: &Setting) -> Result<Option<RunAs>, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    resolve(setting, agent_uid(), &passwd)
}

/// Gives a module's own working folder to its user. What is in it already (written when the
/// module ran as someone else: before an upgrade, or another `runtime.process_user`) goes to
/// it too, so the module can go on using its files. Links are changed, not followed.
pub fn hand_over(dir: &Path, to: RunAs) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(dir)?;
    if (meta.uid(), meta.gid()) == (to.uid, to.gid) {
        return Ok(());
    }
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(to.uid), Some(to.gid))?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// What to say after "Operation not permitted" when a module was to run as `user`.
pub fn not_permitted(user: RunAs) -> String {
    format!(
        " (running process modules as uid {} needs CAP_SETUID, CAP_SETGID and CAP_CHOWN; under \
         the packaged unit, see install.md \"Process modules' user\", or set \
         runtime.process_user = \"root\")",
        user.uid
    )
}

/// `name:x:uid:gid:...` lines.
fn entries(passwd: &str) -> impl Iterator<Item = (&str, u32, u32)> {
    passwd.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some((name, uid, gid))
    })
}

fn lookup(passwd: &str, name: &str) -> Option<RunAs> {
    entries(passwd)
        .find(|(n, _, _)| *n == name)
        .map(|(_, uid, gid)| RunAs { uid, gid })
}

fn gid_of(passwd: &str, uid: u32) -> Option<u32> {
    entries(passwd)
        .find(|(_, u, _)| *u == uid)
        .map(|(_, _, gid)| gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        sensor:x:1001:20:sensor,,,:/home/sensor:/bin/sh\n\
        broken line\n";

    #[test]
    fn a_root_agent_runs_modules_as_nobody_unless_told() {
        assert_eq!(
            resolve(&Setting::Default, 0, PASSWD),
            Ok(Some(RunAs {
                uid: 65534,
                gid: 65534
            }))
        );
        // No passwd (a minimal image): the overflow ids.
        assert_eq!(resolve(&Setting::Default, 0, ""), Ok(Some(NOBODY)));
        let named = |v: &str| resolve(&Setting::parse(v).unwrap(), 0, PASSWD);
        assert_eq!(named("sensor"), Ok(Some(RunAs { uid: 1001, gid: 20 })));
        assert_eq!(named("1001"), Ok(Some(RunAs { uid: 1001, gid: 20 })));
        assert_eq!(
            named("4242"),
            Ok(Some(RunAs {
                uid: 4242,
                gid: 4242
            }))
        );
        assert_eq!(named("7:8"), Ok(Some(RunAs { uid: 7, gid: 8 })));
        // Root only when asked for by name: then no switch at all.
        assert_eq!(named("root"), Ok(None));
        assert_eq!(named("0"), Ok(None));
        let missing = named("camera").unwrap_err();
        assert!(missing.contains("no user `camera`"), "{missing}");
    }

    #[test]
    fn an_unprivileged_agent_runs_modules_as_itself() {
        assert_eq!(resolve(&Setting::Default, 1001, PASSWD), Ok(None));
        assert_eq!(
            resolve(&Setting::parse("sensor").unwrap(), 1001, PASSWD),
            Ok(None)
        );
        let e = resolve(&Setting::parse("nobody").unwrap(), 1001, PASSWD).unwrap_err();
        assert!(e.contains("runs as uid 1001"), "{e}");
    }

    #[test]
    fn a_modules_folder_is_handed_over_with_what_is_in_it() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(work.join("sub")).unwrap();
        std::fs::write(work.join("sub/data"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", work.join("link")).unwrap();
        let to = RunAs {
            uid: 65534,
            gid: 65534,
        };
        let result = hand_over(&work, to);
        if agent_uid() != 0 {
            // Only root may give files away: the error is the kernel's.
            assert!(result.is_err());
            return;
        }
        result.unwrap();
        for p in ["", "sub", "sub/data"] {
            let m = std::fs::metadata(work.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{p}");
        }
        // The link itself, never what it points at.
        assert_eq!(std::fs::metadata("/etc/passwd").unwrap().uid(), 0);
        let link = std::fs::symlink_metadata(work.join("link")).unwrap();
        assert_eq!(link.uid(), 65534);
    }

    #[test]
    fn the_setting_is_a_name_a_uid_or_two_numbers() {
        for good in ["nobody", "outpost-module", "1001", "1001:20", "svc.cam_1"] {
            assert!(Setting::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "a:b", "1001:", ":20", "-x", "a b", "../root", "1:2:3"] {
            assert!(Setting::parse(bad).is_err(), "{bad:?}");
        }
    }
}
