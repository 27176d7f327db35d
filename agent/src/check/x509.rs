//! Just enough X.509 for `check`: a certificate's validity period and subject common name,
//! read from its DER by a small walker. A full X.509 parser (x509-parser and its nom and
//! asn1 stack) would add to the device binary for two fields; rustls has verified or will
//! verify the rest.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// A certificate's validity, in Unix seconds, and who it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    pub not_before: u64,
    pub not_after: u64,
    /// The subject's common name, when it has one.
    pub subject: Option<String>,
}

/// How a certificate stands at `now` (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    NotYetValid,
    Expired,
    /// Valid, but under 30 days left or past two thirds of its lifetime: renew it.
    Renew {
        days_left: u64,
    },
    Valid {
        days_left: u64,
    },
}

/// Under this, renewal is due whatever the lifetime.
pub const RENEW_WITHIN_SECS: u64 = 30 * 86_400;

impl Validity {
    pub fn standing(&self, now: u64) -> Standing {
        if now < self.not_before {
            return Standing::NotYetValid;
        }
        if now > self.not_after {
            return Standing::Expired;
        }
        let left = self.not_after - now;
        let lifetime = self.not_after.saturating_sub(self.not_before);
        let elapsed = now - self.not_before;
        let days_left = left / 86_400;
        // Two thirds of the lifetime, the point at which devices renew (issue 15, part 4).
        if left < RENEW_WITHIN_SECS || elapsed.saturating_mul(3) > lifetime.saturating_mul(2) {
            Standing::Renew { days_left }
        } else {
            Standing::Valid { days_left }
        }
    }
}

/// One DER element: tag, contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn time(tag: u8, body: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(body).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: u64 = s.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    if year < 1970 {
        return Some(0);
    }
    let field = |i: usize| rest.get(i..i + 2);
    let stamp = format!(
        "{year:04}-{}-{}T{}:{}:{}Z",
        field(0)?,
        field(2)?,
        field(4)?,
        field(6)?,
        field(8)?
    );
    outpost_core::time::parse_rfc3339(&stamp)
}

/// The common name (OID 2.5.4.3) in a Name.
fn common_name(name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
    let at = name.windows(CN.len()).position(|w| w == CN)?;
    let (_, value, _) = tlv(&name[at + CN.len()..])?;
    Some(String::from_utf8_lossy(value).into_owned())
}

/// The validity of a DER certificate; `None` when it is not one.
pub fn validity(der: &[u8]) -> Option<Validity> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // Optional explicit version [0].
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    let (_, _serial, rest) = tlv(rest)?;
    let (_, _algorithm, rest) = tlv(rest)?;
    let (_, _issuer, rest) = tlv(rest)?;
    let (_, validity, rest) = tlv(rest)?;
    let (_, subject, _) = tlv(rest)?;
    let (t1, b1, after) = tlv(validity)?;
    let (t2, b2, _) = tlv(after)?;
    Some(Validity {
        not_before: time(t1, b1)?,
        not_after: time(t2, b2)?,
        subject: common_name(subject),
    })
}

/// The validity of the first certificate in a PEM file (the leaf of a chain).
///
/// Fails with a message when the file cannot be read or holds no certificate.
pub fn pem_file_validity(path: &std::path::Path) -> Result<Validity, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let first = CertificateDer::pem_slice_iter(&bytes)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| format!("{} holds no PEM certificate", path.display()))?;
    validity(&first)
        .ok_or_else(|| format!("{} holds a certificate that cannot be read", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cam-1");
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_validity_and_common_name_in_both_time_forms() {
        // UTCTime before 2050, GeneralizedTime from 2050 on.
        let v = validity(&cert((2026, 1, 1), (2060, 1, 1))).unwrap();
        assert_eq!(v.not_before, 1_767_225_600);
        assert_eq!(v.not_after, 2_840_140_800);
        assert_eq!(v.subject.as_deref(), Some("cam-1"));
        assert!(validity(b"\x30\x03\x02\x01\x00").is_none());
    }

    #[test]
    fn standing_follows_the_renewal_rules() {
        let day = 86_400;
        let v = Validity {
            not_before: 0,
            not_after: 300 * day,
            subject: None,
        };
        assert_eq!(v.standing(10 * day), Standing::Valid { days_left: 290 });
        assert_eq!(v.standing(201 * day), Standing::Renew { days_left: 99 });
        assert_eq!(v.standing(301 * day), Standing::Expired);
        let short = Validity {
            not_before: 100 * day,
            not_after: 1000 * day,
            subject: None,
        };
        assert_eq!(short.standing(0), Standing::NotYetValid);
        assert_eq!(short.standing(980 * day), Standing::Renew { days_left: 20 });
    }
}
