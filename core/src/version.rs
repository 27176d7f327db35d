//! The agent's version: the crate's, unless the binary was stamped with another after the build.
//!
//! A release is built once and stamped with its version afterwards (`outpost-ctl agent stamp`),
//! as Go's `-ldflags -X` does: the version lives in a fixed 64-byte record in the binary's
//! read-only data, found by its marker. That lets the self-update tests make two agents that
//! report different versions from one build, and lets anyone read a binary's version without
//! running it — a build for another architecture included.
//!
//! Versions are `MAJOR.MINOR.PATCH` with an optional `-pre-release` and `+build` (SemVer 2.0);
//! [`compare`] orders them as SemVer does, build metadata ignored.

use std::cmp::Ordering;
use std::sync::OnceLock;

/// Bytes of the record: the marker, one length byte, the version.
const RECORD: usize = 64;
const MARKER: usize = 16;
/// The longest version a stamp holds.
pub const MAX_VERSION_BYTES: usize = RECORD - MARKER - 1;

/// The record. Its first 16 bytes are the marker; a length of 0 means "not stamped". The
/// marker is written out nowhere else, so that it occurs once in a binary: the stamping code
/// reads it from here.
#[used]
static STAMP: [u8; RECORD] = {
    let mut r = [0u8; RECORD];
    let marker = *b"\x7fOUTPOST-STAMP\x7f\x00";
    let mut i = 0;
    while i < MARKER {
        r[i] = marker[i];
        i += 1;
    }
    r
};

/// The version this binary reports: its stamp, or the crate version when it has none.
pub fn current() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        // Read through an opaque reference: the compiler must not fold the record's initial
        // (unstamped) bytes into the code, since the stamp changes them in the file.
        let record: &[u8; RECORD] = std::hint::black_box(&STAMP);
        parse_record(record).unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
    })
}

fn parse_record(record: &[u8]) -> Option<String> {
    let len = usize::from(*record.get(MARKER)?);
    if len == 0 || len > MAX_VERSION_BYTES {
        return None;
    }
    let v = std::str::from_utf8(record.get(MARKER + 1..MARKER + 1 + len)?).ok()?;
    is_valid(v).then(|| v.to_string())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StampError {
    #[error("this file holds no version record: it is not an Outpost agent built from this tree")]
    NoRecord,
    #[error("this file holds {0} version records; an agent binary holds one")]
    Ambiguous(usize),
    #[error(
        "`{0}` is not a version such as `1.4.2` or `1.5.0-rc.1` (at most {MAX_VERSION_BYTES} bytes)"
    )]
    BadVersion(String),
}

fn records(binary: &[u8]) -> Vec<usize> {
    let marker = &STAMP[..MARKER];
    binary
        .windows(MARKER)
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .map(|(i, _)| i)
        .filter(|i| i + RECORD <= binary.len())
        .collect()
}

fn the_record(binary: &[u8]) -> Result<usize, StampError> {
    match records(binary)[..] {
        [] => Err(StampError::NoRecord),
        [at] => Ok(at),
        ref many => Err(StampError::Ambiguous(many.len())),
    }
}

/// The version stamped into an agent binary's bytes; `None` when it was never stamped (it
/// reports its crate version, which the bytes do not say).
pub fn read_stamp(binary: &[u8]) -> Result<Option<String>, StampError> {
    let at = the_record(binary)?;
    Ok(parse_record(&binary[at..at + RECORD]))
}

/// Stamps `version` into an agent binary's bytes (in place).
pub fn stamp(binary: &mut [u8], version: &str) -> Result<(), StampError> {
    if !is_valid(version) || version.len() > MAX_VERSION_BYTES {
        return Err(StampError::BadVersion(version.to_string()));
    }
    let at = the_record(binary)?;
    let record = &mut binary[at + MARKER..at + RECORD];
    record.fill(0);
    // At most MAX_VERSION_BYTES (47): fits a byte.
    record[0] = version.len() as u8;
    record[1..1 + version.len()].copy_from_slice(version.as_bytes());
    Ok(())
}

/// A parsed version: numbers, then pre-release identifiers (empty for a release).
#[derive(Debug, PartialEq, Eq)]
struct Parsed<'a> {
    core: [u64; 3],
    pre: Vec<&'a str>,
}

fn parse(v: &str) -> Option<Parsed<'_>> {
    let v = v.split_once('+').map_or(v, |(v, build)| {
        // Build metadata is checked, then ignored.
        if build.is_empty() || !build.split('.').all(is_identifier) {
            ""
        } else {
            v
        }
    });
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let mut numbers = [0u64; 3];
    let mut parts = core.split('.');
    for n in &mut numbers {
        let part = parts.next()?;
        if part.is_empty()
            || !part.bytes().all(|b| b.is_ascii_digit())
            || (part.len() > 1 && part.starts_with('0'))
        {
            return None;
        }
        *n = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    let pre = match pre {
        None => Vec::new(),
        Some(p) => {
            let ids: Vec<&str> = p.split('.').collect();
            if !ids.iter().all(|i| is_identifier(i)) {
                return None;
            }
            ids
        }
    };
    Some(Parsed { core: numbers, pre })
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Whether `v` is a version this format accepts (`1.4.2`, `1.5.0-rc.1`, `2.0.0+build.7`).
pub fn is_valid(v: &str) -> bool {
    v.len() <= 64 && parse(v).is_some()
}

/// SemVer precedence; `None` when either is not a version.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    let (a, b) = (parse(a)?, parse(b)?);
    Some(a.core.cmp(&b.core).then_with(|| pre_cmp(&a.pre, &b.pre)))
}

fn pre_cmp(a: &[&str], b: &[&str]) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => return Ordering::Equal,
        // A release ranks above its pre-releases.
        (true, false) => return Ordering::Greater,
        (false, true) => return Ordering::Less,
        _ => {}
    }
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstamped_build_reports_its_crate_version() {
        assert_eq!(current(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn a_stamp_is_found_written_and_read_back() {
        let mut file = b"some code".to_vec();
        file.extend_from_slice(&STAMP);
        file.extend_from_slice(b"more");
        assert_eq!(read_stamp(&file), Ok(None));
        stamp(&mut file, "1.2.3-rc.1").unwrap();
        assert_eq!(read_stamp(&file), Ok(Some("1.2.3-rc.1".into())));
        stamp(&mut file, "1.2.4").unwrap();
        assert_eq!(read_stamp(&file), Ok(Some("1.2.4".into())));
        assert!(
            file.ends_with(b"more"),
            "nothing outside the record changes"
        );
        assert_eq!(
            stamp(&mut file, "1.2"),
            Err(StampError::BadVersion("1.2".into()))
        );
        let long = format!("1.2.3-{}", "a".repeat(50));
        assert!(matches!(
            stamp(&mut file, &long),
            Err(StampError::BadVersion(_))
        ));
    }

    #[test]
    fn a_file_without_one_record_is_refused() {
        assert_eq!(read_stamp(b"not a binary"), Err(StampError::NoRecord));
        let mut two = STAMP.to_vec();
        two.extend_from_slice(&STAMP);
        assert_eq!(read_stamp(&two), Err(StampError::Ambiguous(2)));
    }

    #[test]
    fn versions_order_as_semver_does() {
        use Ordering::*;
        for (a, b, o) in [
            ("1.0.0", "1.0.0", Equal),
            ("1.0.0", "1.0.1", Less),
            ("1.10.0", "1.9.9", Greater),
            ("1.0.0-rc.1", "1.0.0", Less),
            ("1.0.0-alpha", "1.0.0-alpha.1", Less),
            ("1.0.0-alpha.1", "1.0.0-alpha.beta", Less),
            ("1.0.0-rc.2", "1.0.0-rc.10", Less),
            ("1.0.0+build.1", "1.0.0+build.2", Equal),
        ] {
            assert_eq!(compare(a, b), Some(o), "{a} vs {b}");
        }
        for bad in [
            "", "1", "1.2", "01.2.3", "1.2.3.4", "1.2.3-", "1.2.3+", "v1.2.3", "1.2.x",
        ] {
            assert!(!is_valid(bad), "{bad}");
            assert_eq!(compare(bad, "1.0.0"), None);
        }
    }
}
