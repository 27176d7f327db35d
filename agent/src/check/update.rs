//! The agent's own updates: which build runs, whether an update was given up, whether the
//! record is readable (docs/operations.md#updating-the-agent).

use super::Finding;
use crate::config::Config;
use crate::state::UpdatePhase;
use crate::update::record::{Paths, Slot};

pub fn check(config: &Config) -> Finding {
    let paths = Paths::new(&config.state_dir);
    let record = match paths.read() {
        Ok(None) => {
            return Finding::ok(
                "agent-update",
                format!(
                    "the installed agent {} runs; it has never been updated from the hub",
                    outpost_core::version::current()
                ),
            );
        }
        Ok(Some(r)) => r,
        Err(e) => {
            return Finding::error(
                "agent-update",
                e.to_string(),
                format!(
                    "move {} aside: the installed agent then runs, and the next update writes it again",
                    paths.record().display()
                ),
            );
        }
    };
    let active = format!(
        "agent {} runs from {}",
        record.active.version,
        match record.active.slot {
            Slot::Installed => "the installed binary".to_string(),
            s => format!("update slot {}", s.name()),
        }
    );
    if let Some(t) = &record.trial {
        return Finding::warning(
            "agent-update",
            format!(
                "{active}; {} is on probation (started {} times)",
                t.build.version, t.starts
            ),
            "wait for its health gate: it is committed or rolled back by itself",
        );
    }
    match &record.last {
        Some(o) if matches!(o.phase, UpdatePhase::RolledBack | UpdatePhase::Failed) => {
            Finding::warning(
                "agent-update",
                format!(
                    "{active}; the update to {} was {}: {}",
                    o.version,
                    if o.phase == UpdatePhase::Failed {
                        "refused"
                    } else {
                        "rolled back"
                    },
                    o.reason.as_deref().unwrap_or("no reason recorded")
                ),
                "fix the build and deploy a new version: a version given up is not tried again",
            )
        }
        _ => Finding::ok("agent-update", active),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;
    use crate::update::record::{Build, Record, Trial};

    fn config(dir: &std::path::Path) -> Config {
        let path = dir.join("config.toml");
        std::fs::write(
            &path,
            format!("device_id = \"d\"\nstate_dir = \"{}\"\n", dir.display()),
        )
        .unwrap();
        Config::load(&path, []).unwrap()
    }

    #[test]
    fn the_finding_follows_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        assert_eq!(check(&c).level, Level::Ok);
        let paths = Paths::new(dir.path());
        let mut r = Record::installed("0.1.0");
        r.trial = Some(Trial {
            build: Build {
                slot: Slot::A,
                version: "0.2.0".into(),
                sha256: None,
            },
            starts: 1,
            replaces: "0.1.0".into(),
        });
        r.roll_back("it never connected".into(), 1);
        paths.write(&r).unwrap();
        let f = check(&c);
        assert_eq!(f.level, Level::Warning);
        assert!(
            f.message.contains("rolled back: it never connected"),
            "{}",
            f.message
        );
        std::fs::write(paths.record(), "{").unwrap();
        assert_eq!(check(&c).level, Level::Error);
    }
}
