//! `[maintenance]`: the update windows (docs/configuration.md#maintenance). Entries are parsed
//! by `outpost_core::window`; the zone is the device's (TZ, /etc/localtime) unless
//! `timezone` names one.

use serde::{Deserialize, Deserializer};

use super::raw::RawMaintenance;
use super::types::MaintenanceConfig;
use super::validate::Issues;
use outpost_core::window::Windows;

pub(super) fn maintenance(m: RawMaintenance, issues: &mut Issues) -> MaintenanceConfig {
    let entries = m.windows.unwrap_or_default();
    let windows = match Windows::parse(&entries) {
        Ok(w) => w,
        Err(errors) => {
            for (i, e) in errors {
                issues.push(&format!("maintenance.windows[{i}]"), e.to_string());
            }
            Windows::default()
        }
    };
    let timezone = m.timezone.and_then(|name| {
        match jiff::tz::TimeZone::get(&name) {
            Ok(tz) => Some(tz),
            Err(e) => {
                issues.push(
                    "maintenance.timezone",
                    format!("`{name}` is not a time zone this device knows (an IANA name such as `Europe/Berlin` or `UTC`): {e}"),
                );
                None
            }
        }
    });
    MaintenanceConfig {
        windows,
        entries,
        timezone,
    }
}

/// `windows` as a TOML list, or as one string (from `OUTPOST__MAINTENANCE__WINDOWS`) with
/// entries separated by `;` (a comma belongs to a day list, `sat,sun`).
pub(super) fn windows<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|w| match w {
        OneOrMany::Many(v) => v,
        OneOrMany::One(s) => s
            .split(';')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{issues, load};

    #[test]
    fn no_windows_is_always_open_in_the_system_zone() {
        let c = load("device_id = \"d\"\n", &[]).unwrap();
        assert!(c.maintenance.windows.always_open());
        assert!(c.maintenance.timezone.is_none());
    }

    #[test]
    fn windows_and_a_zone_are_read_from_the_file_and_the_environment() {
        let c = load(
            "device_id = \"d\"\n[maintenance]\nwindows = [\"mon-fri 02:00-04:00\", \"sat,sun 00:00-24:00\"]\ntimezone = \"Europe/Berlin\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.maintenance.entries.len(), 2);
        assert!(!c.maintenance.windows.always_open());
        assert!(c.maintenance.timezone.is_some());
        let c = load(
            "device_id = \"d\"\n",
            &[
                (
                    "OUTPOST__MAINTENANCE__WINDOWS",
                    "sat,sun 00:00-24:00; daily 22:30-23:00",
                ),
                ("OUTPOST__MAINTENANCE__TIMEZONE", "UTC"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.maintenance.entries,
            ["sat,sun 00:00-24:00", "daily 22:30-23:00"]
        );
    }

    #[test]
    fn mistakes_name_the_key_and_the_entry() {
        let found = issues(load(
            "device_id = \"d\"\n[maintenance]\nwindows = [\"daily 01:00-02:00\", \"weekdays 02:00-04:00\", \"mon 9:00-10:00\"]\ntimezone = \"Mars/Olympus\"\n",
            &[],
        ));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with(
                "maintenance.windows[1]: `weekdays 02:00-04:00`: `weekdays` is not a day"
            ),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("maintenance.windows[2]: `mon 9:00-10:00`: `9:00` is not a time"),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("maintenance.timezone: `Mars/Olympus`"),
            "{found:?}"
        );
    }
}
