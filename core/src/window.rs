//! Update windows: when a device may switch to a new deployment, in its local time
//! (docs/configuration.md#maintenance).
//!
//! An entry is `DAYS HH:MM-HH:MM`: `DAYS` is `daily` or a comma-separated list of days and
//! ranges (`mon-fri`, `sat,sun`, `fri-mon`); the window opens on each listed day at the first
//! time and closes at the second, which may be `24:00` (the end of the day) or earlier than
//! the first (the window crosses midnight and closes on the next day). Times are civil times
//! in the device's zone, so a window follows daylight saving time: a start that falls in a
//! skipped hour opens at the first instant after the gap.
//!
//! Pure: the caller passes the instant and the zone (the agent reads its clock and zone).

use jiff::Timestamp;
use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MINUTES_PER_DAY: u16 = 24 * 60;

/// Why an entry is not a window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error(
        "`{entry}` is not `DAYS HH:MM-HH:MM` (e.g. `mon-fri 02:00-04:00`, `daily 22:30-23:00`)"
    )]
    Shape { entry: String },
    #[error(
        "`{entry}`: `{day}` is not a day (mon, tue, wed, thu, fri, sat, sun, a range such as mon-fri, or daily)"
    )]
    Day { entry: String, day: String },
    #[error(
        "`{entry}`: `{time}` is not a time of day (HH:MM from 00:00 to 23:59; 24:00 only as the end)"
    )]
    Time { entry: String, time: String },
    #[error("`{entry}` opens and closes at the same time; use 00:00-24:00 for a whole day")]
    Empty { entry: String },
}

/// One window: the days it opens on and its times, in minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Monday first.
    days: [bool; 7],
    start: u16,
    /// 1..=1440; at or before `start` means the next day.
    end: u16,
}

impl std::str::FromStr for Window {
    type Err = WindowError;

    fn from_str(entry: &str) -> Result<Window, WindowError> {
        let shape = || WindowError::Shape {
            entry: entry.to_string(),
        };
        let mut parts = entry.split_whitespace();
        let (Some(days), Some(times), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(shape());
        };
        let (start, end) = times.split_once('-').ok_or_else(shape)?;
        let window = Window {
            days: parse_days(entry, days)?,
            start: parse_time(entry, start, false)?,
            end: parse_time(entry, end, true)?,
        };
        if window.start == window.end {
            return Err(WindowError::Empty {
                entry: entry.to_string(),
            });
        }
        Ok(window)
    }
}

fn parse_days(entry: &str, text: &str) -> Result<[bool; 7], WindowError> {
    let mut days = [false; 7];
    if text.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let day = |name: &str| {
        DAY_NAMES
            .iter()
            .position(|d| d.eq_ignore_ascii_case(name))
            .ok_or_else(|| WindowError::Day {
                entry: entry.to_string(),
                day: name.to_string(),
            })
    };
    for item in text.split(',') {
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                // A range may wrap the week: `fri-mon` is fri, sat, sun, mon.
                let mut d = from;
                loop {
                    days[d] = true;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(item)?] = true,
        }
    }
    Ok(days)
}

/// Minutes after midnight; `24:00` (1440) only as an end.
fn parse_time(entry: &str, text: &str, end: bool) -> Result<u16, WindowError> {
    let bad = || WindowError::Time {
        entry: entry.to_string(),
        time: text.to_string(),
    };
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    match (h, m) {
        (24, 0) if end => Ok(MINUTES_PER_DAY),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

/// Whether the windows are open at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Openness {
    /// Open; `closes_at` is the end of the window now open (`None`: always open).
    Open { closes_at: Option<Timestamp> },
    /// Closed until `opens_at`.
    Closed { opens_at: Timestamp },
}

/// The device's windows; none configured means always open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Windows(Vec<Window>);

impl Windows {
    /// Parses every entry; the errors name the entry and its index.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Windows, Vec<(usize, WindowError)>> {
        let mut windows = Vec::new();
        let mut errors = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match e.as_ref().parse() {
                Ok(w) => windows.push(w),
                Err(err) => errors.push((i, err)),
            }
        }
        if errors.is_empty() {
            Ok(Windows(windows))
        } else {
            Err(errors)
        }
    }

    /// No window configured: every instant is open.
    pub fn always_open(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a window is open at `now` in `tz`, and when the next one opens if not.
    pub fn at(&self, now: Timestamp, tz: &TimeZone) -> Openness {
        if self.0.is_empty() {
            return Openness::Open { closes_at: None };
        }
        let today = tz.to_datetime(now).date();
        let mut closes_at: Option<Timestamp> = None;
        let mut opens_at: Option<Timestamp> = None;
        // Yesterday's window may cross into today; a week and a day ahead finds any opening.
        for offset in -1i64..=8 {
            let Ok(date) = today.checked_add(jiff::Span::new().days(offset)) else {
                continue;
            };
            let weekday = date.weekday().to_monday_zero_offset() as usize;
            for w in self.0.iter().filter(|w| w.days[weekday]) {
                let (Some(start), Some(end)) = (
                    instant(date, w.start, tz),
                    instant(
                        if w.end <= w.start {
                            date.tomorrow().ok()
                        } else {
                            Some(date)
                        },
                        w.end,
                        tz,
                    ),
                ) else {
                    continue;
                };
                if start <= now && now < end {
                    closes_at = Some(closes_at.map_or(end, |c| c.max(end)));
                } else if start > now {
                    opens_at = Some(opens_at.map_or(start, |o| o.min(start)));
                }
            }
        }
        match (closes_at, opens_at) {
            (Some(c), _) => Openness::Open { closes_at: Some(c) },
            (None, Some(o)) => Openness::Closed { opens_at: o },
            // Every window names at least one day, so one opens within a week; kept total.
            (None, None) => Openness::Open { closes_at: None },
        }
    }
}

/// The instant of `minutes` after midnight of `date` in `tz` (24:00 is the next midnight); a
/// civil time in a gap or fold resolves as `compatible` (after the gap, first of the fold).
fn instant(date: impl Into<Option<Date>>, minutes: u16, tz: &TimeZone) -> Option<Timestamp> {
    let mut date = date.into()?;
    let mut minutes = minutes;
    if minutes >= MINUTES_PER_DAY {
        date = date.tomorrow().ok()?;
        minutes -= MINUTES_PER_DAY;
    }
    let time = Time::new((minutes / 60) as i8, (minutes % 60) as i8, 0, 0).ok()?;
    tz.to_ambiguous_timestamp(DateTime::from_parts(date, time))
        .compatible()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(windows: &[&str], local: &str, tz: &str) -> Openness {
        let tz = TimeZone::get(tz).unwrap();
        let now = tz
            .to_ambiguous_timestamp(local.parse::<DateTime>().unwrap())
            .compatible()
            .unwrap();
        Windows::parse(windows).unwrap().at(now, &tz)
    }

    fn local(ts: Timestamp, tz: &str) -> String {
        TimeZone::get(tz)
            .unwrap()
            .to_datetime(ts)
            .strftime("%a %Y-%m-%dT%H:%M")
            .to_string()
    }

    fn opens(windows: &[&str], now: &str, tz: &str) -> String {
        match at(windows, now, tz) {
            Openness::Closed { opens_at } => local(opens_at, tz),
            open => panic!("expected closed at {now}, got {open:?}"),
        }
    }

    fn is_open(windows: &[&str], now: &str, tz: &str) -> bool {
        matches!(at(windows, now, tz), Openness::Open { .. })
    }

    #[test]
    fn entries_parse_and_mistakes_name_the_entry() {
        for ok in [
            "mon-fri 02:00-04:00",
            "sat,sun 00:00-24:00",
            "daily 22:30-23:00",
            "fri-mon 23:00-01:00",
            "Mon,wed,FRI 00:00-00:30",
            "daily 23:00-24:00",
        ] {
            ok.parse::<Window>().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let err = |s: &str| s.parse::<Window>().unwrap_err().to_string();
        assert!(err("mon 02:00").contains("is not `DAYS HH:MM-HH:MM`"));
        assert!(err("funday 02:00-03:00").contains("`funday` is not a day"));
        assert!(err("mon-xyz 02:00-03:00").contains("`xyz` is not a day"));
        assert!(err("mon 25:00-26:00").contains("`25:00` is not a time"));
        assert!(err("mon 24:00-02:00").contains("`24:00` is not a time"));
        assert!(err("mon 2:00-03:00").contains("`2:00` is not a time"));
        assert!(err("mon 02:60-03:00").contains("`02:60`"));
        assert!(err("mon 03:00-03:00").contains("same time"));
        assert!(err("mon 02:00-03:00 extra").contains("is not `DAYS"));
        let errors = Windows::parse(&["daily 01:00-02:00", "bad", "mon 9:00-10:00"]).unwrap_err();
        assert_eq!(errors.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn no_windows_is_always_open() {
        assert_eq!(
            at(&[], "2026-12-01T12:00", "UTC"),
            Openness::Open { closes_at: None }
        );
        assert!(Windows::default().always_open());
    }

    #[test]
    fn day_lists_and_ranges() {
        // 2026-12-07 is a Monday.
        let w = ["mon-fri 02:00-04:00"];
        assert!(is_open(&w, "2026-12-07T02:00", "UTC"));
        assert!(is_open(&w, "2026-12-11T03:59", "UTC"));
        assert!(!is_open(&w, "2026-12-07T04:00", "UTC"));
        assert_eq!(opens(&w, "2026-12-07T04:00", "UTC"), "Tue 2026-12-08T02:00");
        // Friday after the window: the next is Monday's.
        assert_eq!(opens(&w, "2026-12-11T05:00", "UTC"), "Mon 2026-12-14T02:00");
        let weekend = ["sat,sun 00:00-24:00"];
        assert!(is_open(&weekend, "2026-12-12T00:00", "UTC"));
        assert!(is_open(&weekend, "2026-12-13T23:59", "UTC"));
        assert_eq!(
            opens(&weekend, "2026-12-14T00:00", "UTC"),
            "Sat 2026-12-19T00:00"
        );
        let wrap = ["fri-mon 12:00-13:00"];
        assert!(is_open(&wrap, "2026-12-13T12:30", "UTC"));
        assert!(is_open(&wrap, "2026-12-14T12:30", "UTC"));
        assert!(!is_open(&wrap, "2026-12-15T12:30", "UTC"));
    }

    #[test]
    fn windows_cross_midnight_into_the_next_day() {
        // Friday 22:00 to Saturday 02:00 only.
        let w = ["fri 22:00-02:00"];
        assert!(is_open(&w, "2026-12-11T23:00", "UTC"));
        assert!(is_open(&w, "2026-12-12T01:59", "UTC"));
        assert!(!is_open(&w, "2026-12-12T02:00", "UTC"));
        // Saturday 22:00 is not a window: it opens on Fridays.
        assert_eq!(opens(&w, "2026-12-12T22:00", "UTC"), "Fri 2026-12-18T22:00");
        // The end of the open window is reported.
        match at(&w, "2026-12-11T23:00", "UTC") {
            Openness::Open { closes_at } => {
                assert_eq!(local(closes_at.unwrap(), "UTC"), "Sat 2026-12-12T02:00")
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn windows_are_local_time_and_follow_daylight_saving() {
        // 02:00-04:00 in Berlin is 01:00-03:00 UTC in winter.
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let windows = Windows::parse(&["daily 02:00-04:00"]).unwrap();
        let utc = |s: &str| s.parse::<Timestamp>().unwrap();
        assert!(matches!(
            windows.at(utc("2026-12-07T01:30:00Z"), &tz),
            Openness::Open { .. }
        ));
        assert!(matches!(
            windows.at(utc("2026-12-07T03:30:00Z"), &tz),
            Openness::Closed { .. }
        ));
        // 2027-03-28: Berlin skips 02:00-03:00. The window opens at 03:00 local (01:00 UTC)
        // and closes at 04:00 local (02:00 UTC): one hour that day.
        match windows.at(utc("2027-03-28T00:30:00Z"), &tz) {
            Openness::Closed { opens_at } => assert_eq!(opens_at, utc("2027-03-28T01:00:00Z")),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            windows.at(utc("2027-03-28T01:30:00Z"), &tz),
            Openness::Open { .. }
        ));
        assert!(matches!(
            windows.at(utc("2027-03-28T02:00:00Z"), &tz),
            Openness::Closed { .. }
        ));
        // 2027-10-31: 02:00-03:00 happens twice; the window opens at the first 02:00
        // (00:00 UTC) and lasts three hours.
        match windows.at(utc("2027-10-30T23:30:00Z"), &tz) {
            Openness::Closed { opens_at } => assert_eq!(opens_at, utc("2027-10-31T00:00:00Z")),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            windows.at(utc("2027-10-31T02:30:00Z"), &tz),
            Openness::Open { .. }
        ));
    }

    #[test]
    fn overlapping_windows_report_the_latest_close() {
        let w = ["daily 01:00-03:00", "mon 02:00-05:00"];
        match at(&w, "2026-12-07T02:30", "UTC") {
            Openness::Open { closes_at } => {
                assert_eq!(local(closes_at.unwrap(), "UTC"), "Mon 2026-12-07T05:00")
            }
            c => panic!("{c:?}"),
        }
    }

    proptest::proptest! {
        /// Closed means no window contains `now` and none opens before `opens_at`; the
        /// opening is itself open; open means a window starts at or before now.
        #[test]
        fn the_next_opening_is_the_first_open_minute(
            day in 0usize..7, start in 0u16..1440, len in 1u16..1440, minute in 0i64..(14 * 1440),
        ) {
            let entry = format!(
                "{} {:02}:{:02}-{:02}:{:02}",
                DAY_NAMES[day], start / 60, start % 60,
                ((start + len) % 1440) / 60, ((start + len) % 1440) % 60,
            );
            let windows = Windows::parse(&[entry.as_str()]).unwrap();
            let tz = TimeZone::UTC;
            let base: Timestamp = "2026-12-07T00:00:00Z".parse().unwrap();
            let now = base + jiff::SignedDuration::from_mins(minute);
            match windows.at(now, &tz) {
                Openness::Closed { opens_at } => {
                    proptest::prop_assert!(opens_at > now);
                    let open = matches!(windows.at(opens_at, &tz), Openness::Open { .. });
                    proptest::prop_assert!(open, "closed at its own opening");
                    let before = opens_at - jiff::SignedDuration::from_mins(1);
                    let closed = matches!(windows.at(before, &tz), Openness::Closed { .. });
                    proptest::prop_assert!(closed, "open a minute before its opening");
                }
                Openness::Open { closes_at } => {
                    let closes_at = closes_at.unwrap();
                    proptest::prop_assert!(closes_at > now);
                    proptest::prop_assert!(closes_at - now <= jiff::SignedDuration::from_mins(i64::from(len)));
                }
            }
        }
    }
}
