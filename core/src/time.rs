//! Wall-clock time as people and wire formats write it: RFC 3339 and Unix milliseconds.
//! Deciding *when* something happens is the agent's clock's job (monotonic, see the agent's
//! `clock`); this module only reads and writes timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// The earliest wall-clock time this build can run at (2026-11-01T00:00:00Z): a clock that
/// reads earlier has not been set yet.
pub const PLAUSIBLE_AFTER_MS: u64 = 1_793_491_200_000;

/// Unix milliseconds by the wall clock (0 before 1970).
pub fn wall_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix seconds by the wall clock.
pub fn unix_now() -> u64 {
    wall_now_ms() / 1000
}

/// Unix seconds of an RFC 3339 timestamp as Docker writes it (`2026-11-27T13:50:01.123Z`);
/// `None` for Docker's zero time `0001-01-01T00:00:00Z`.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    if y < 1970 {
        return None;
    }
    let time = &rest[..rest.find(['Z', '+', '-']).unwrap_or(rest.len())];
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec = t.next()?.split('.').next()?.parse::<i64>().ok()?;
    let offset = match rest.rfind(['+', '-']) {
        Some(i) if rest[i..].len() == 6 => {
            let sign = if &rest[i..i + 1] == "-" { -1 } else { 1 };
            let oh = rest[i + 1..i + 3].parse::<i64>().ok()?;
            let om = rest[i + 4..i + 6].parse::<i64>().ok()?;
            sign * (oh * 3600 + om * 60)
        }
        _ => 0,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + min * 60 + sec - offset).ok()
}

/// `unix_secs` as RFC 3339 in UTC (`2026-11-28T19:18:46Z`).
pub fn format_rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for t in [0, 1_795_787_401, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t), "{t}");
        }
        assert_eq!(format_rfc3339(1_795_787_401), "2026-11-27T13:50:01Z");
    }
}
