//! The responder's decisions: which serials get an identity, what the device is called, and
//! the certificate itself — signed by the provisioning CA for the key in the device's request.
//! No network here: [`Responder::handle`] takes a request and returns the answer, so every
//! rule is tested directly.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use outpost_core::wire::provisioning::{
    Kind, Request, Response, claim_client_id, is_reserved_name, is_valid_serial,
};
use outpost_core::wire::topics::is_level;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, DnValue, ExtendedKeyUsagePurpose,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SerialNumber,
};
use sha2::{Digest as _, Sha256};

use super::record::{Entry, Record};

/// Which serials may be provisioned.
#[derive(Debug, Clone)]
pub enum Allow {
    Any,
    List(HashSet<String>),
    /// A pattern with `*` (any run of characters) and `?` (one character).
    Pattern(String),
}

impl Allow {
    fn permits(&self, serial: &str) -> bool {
        match self {
            Allow::Any => true,
            Allow::List(list) => list.contains(serial),
            Allow::Pattern(p) => glob(p.as_bytes(), serial.as_bytes()),
        }
    }
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], text) || (!text.is_empty() && glob(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// The operator's rules.
#[derive(Debug, Clone)]
pub struct Policy {
    pub allow: Allow,
    /// The device id made from the serial: `{serial}` is replaced (e.g. `cam-{serial}`).
    pub name_template: String,
    pub groups: Vec<String>,
    /// Whether a serial already issued may get a new identity (a board whose storage was
    /// wiped). The same device asking again with the same key is always answered.
    pub reissue: bool,
    pub validity: Duration,
    /// Claims and renewals per minute, all devices together (a burst of as many is allowed).
    pub rate_per_minute: u32,
}

impl Policy {
    /// Checks the rules that do not depend on a request.
    pub fn check(&self) -> Result<()> {
        if !self.name_template.contains("{serial}") {
            bail!(
                "--name-template `{}` must contain `{{serial}}`: every device needs its own name",
                self.name_template
            );
        }
        let example = self.name_template.replace("{serial}", "SN");
        if !is_level(&example) || is_reserved_name(&example) {
            bail!(
                "--name-template `{}` does not make a device id (letters, digits, `.`, `_`, `-`; not `groups`, not starting with `_`)",
                self.name_template
            );
        }
        for g in &self.groups {
            if !is_level(g) {
                bail!("group `{g}` is not valid: 1 to 128 letters, digits, `.`, `_` or `-`");
            }
        }
        if self.validity < Duration::from_secs(10) {
            bail!("the certificates' validity must be at least 10 seconds");
        }
        if self.rate_per_minute == 0 {
            bail!("--rate-per-minute must be at least 1");
        }
        Ok(())
    }
}

/// The provisioning CA: its certificate (sent with every chain) and its signing key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Ca {
    pub fn load(cert: &Path, key: &Path) -> Result<Ca> {
        let cert_pem = std::fs::read_to_string(cert)
            .with_context(|| format!("cannot read the CA certificate {}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key)
            .with_context(|| format!("cannot read the CA key {}", key.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a usable private key (PEM)", key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("{} is not a CA certificate (PEM)", cert.display()))?;
        Ok(Ca { issuer, cert_pem })
    }
}

/// Allows a burst of `capacity` and refills at `capacity` a minute.
struct Bucket {
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.capacity / 60.0;
        self.tokens = (self.tokens + refill).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) * 60.0 / self.capacity,
            ))
        }
    }
}

pub struct Responder {
    policy: Policy,
    ca: Ca,
    record: Record,
    bucket: Bucket,
}

impl Responder {
    pub fn new(policy: Policy, ca: Ca, record: Record) -> Result<Responder> {
        policy.check()?;
        let capacity = f64::from(policy.rate_per_minute);
        Ok(Responder {
            policy,
            ca,
            record,
            bucket: Bucket {
                capacity,
                tokens: capacity,
                at: Instant::now(),
            },
        })
    }

    pub fn issued(&self) -> usize {
        self.record.len()
    }

    /// Answers a request from `who` (the claim client id, or the device for a renewal) at
    /// `now` (Unix seconds). `None` when the request cannot even be read (there is no request
    /// id to answer).
    pub fn handle(&mut self, kind: Kind, who: &str, payload: &[u8], now: u64) -> Option<Response> {
        let request: Request = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%who, error = %e, "an unreadable provisioning request ignored");
                return None;
            }
        };
        let answer = match kind {
            Kind::Claim => self.claim(who, &request, now),
            Kind::Renew => self.renew(who, &request, now),
        };
        Some(match answer {
            Ok(issued) => issued,
            Err(refusal) => {
                tracing::warn!(%who, serial = %request.serial, reason = %refusal.reason, "refused");
                Response::Refused {
                    request_id: request.request_id,
                    reason: refusal.reason,
                    retry_after_secs: refusal.retry_after.map(|d| d.as_secs().max(1)),
                }
            }
        })
    }

    fn claim(&mut self, who: &str, request: &Request, now: u64) -> Result<Response, Refusal> {
        let serial = &request.serial;
        if !is_valid_serial(serial) {
            return Err(Refusal::permanent(format!(
                "serial `{serial}` is not valid"
            )));
        }
        if who != claim_client_id(serial) {
            return Err(Refusal::permanent(format!(
                "the request for serial `{serial}` came from client `{who}`, not `{}`",
                claim_client_id(serial)
            )));
        }
        if !self.policy.allow.permits(serial) {
            return Err(Refusal::permanent(format!(
                "serial `{serial}` is not allowed by this responder; ask the operator to add it"
            )));
        }
        let csr = parse_csr(&request.csr, serial)?;
        let key = key_sha256(&csr);
        let device = self.policy.name_template.replace("{serial}", serial);
        if !is_level(&device) || is_reserved_name(&device) {
            return Err(Refusal::permanent(format!(
                "serial `{serial}` makes the device id `{device}`, which cannot name a device"
            )));
        }
        if self.record.device_taken_by_other(&device, serial) {
            return Err(Refusal::permanent(format!(
                "device id `{device}` was already issued to another serial"
            )));
        }
        let kind = match self.record.for_serial(serial) {
            None => "claim",
            // The same device asking again (its answer was lost, or it rebooted mid-way).
            Some(previous) if previous.key_sha256 == key => "claim",
            Some(_) if self.policy.reissue => "reissue",
            Some(previous) => {
                return Err(Refusal::permanent(format!(
                    "serial `{serial}` was already issued (as `{}`) for another key; if the board was replaced or wiped, run the responder with --reissue",
                    previous.device_id
                )));
            }
        };
        self.rate_limit()?;
        self.issue(kind, serial, &device, &csr, key, request, now)
    }

    fn renew(&mut self, device: &str, request: &Request, now: u64) -> Result<Response, Refusal> {
        let Some(previous) = self.record.for_device(device).cloned() else {
            return Err(Refusal::permanent(format!(
                "device `{device}` was not issued by this responder"
            )));
        };
        if previous.serial != request.serial {
            return Err(Refusal::permanent(format!(
                "device `{device}` has serial `{}`, not `{}`",
                previous.serial, request.serial
            )));
        }
        let csr = parse_csr(&request.csr, device)?;
        let key = key_sha256(&csr);
        self.rate_limit()?;
        self.issue("renew", &previous.serial, device, &csr, key, request, now)
    }

    fn rate_limit(&mut self) -> Result<(), Refusal> {
        self.bucket.take(Instant::now()).map_err(|wait| Refusal {
            reason: format!(
                "too many requests (over {} a minute); asking again later",
                self.policy.rate_per_minute
            ),
            retry_after: Some(wait),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn issue(
        &mut self,
        kind: &str,
        serial: &str,
        device: &str,
        csr: &CertificateSigningRequestParams,
        key_sha256: String,
        request: &Request,
        now: u64,
    ) -> Result<Response, Refusal> {
        let validity = self.policy.validity.as_secs();
        // A little before now, for clocks slightly behind the responder's.
        let not_before = now.saturating_sub((validity / 10).min(300));
        let not_after = now.saturating_add(validity);
        let (pem, certificate_serial) = self
            .sign(csr, device, not_before, not_after)
            .map_err(|e| Refusal::later(format!("the responder cannot sign: {e:#}")))?;
        self.record
            .append(Entry {
                at: now,
                kind: kind.to_string(),
                serial: serial.to_string(),
                device_id: device.to_string(),
                key_sha256,
                not_after,
                certificate_serial,
            })
            .map_err(|e| Refusal::later(format!("the responder cannot record it: {e:#}")))?;
        tracing::info!(%kind, %serial, %device, not_after = %outpost_core::time::format_rfc3339(not_after), "issued");
        Ok(Response::Issued {
            request_id: request.request_id.clone(),
            device_id: device.to_string(),
            groups: self.policy.groups.clone(),
            certificate_chain: format!("{pem}{}", self.ca.cert_pem),
            issued_at: now,
            not_before,
            not_after,
        })
    }

    fn sign(
        &self,
        csr: &CertificateSigningRequestParams,
        device: &str,
        not_before: u64,
        not_after: u64,
    ) -> Result<(String, String)> {
        let time = |secs: u64| {
            time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
                .context("a time out of range")
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, device);
        params.not_before = time(not_before)?;
        params.not_after = time(not_after)?;
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial)
            .map_err(|e| anyhow::anyhow!("no randomness for the certificate's serial: {e}"))?;
        serial[0] &= 0x7f; // a positive INTEGER
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.ca.issuer)?;
        let hex = serial.iter().map(|b| format!("{b:02x}")).collect();
        Ok((cert.pem(), hex))
    }
}

struct Refusal {
    reason: String,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn permanent(reason: String) -> Refusal {
        Refusal {
            reason,
            retry_after: None,
        }
    }

    fn later(reason: String) -> Refusal {
        Refusal {
            reason,
            retry_after: Some(Duration::from_secs(30)),
        }
    }
}

/// Parses the request and checks its signature (the device holds the key) and its name.
fn parse_csr(pem: &str, expected_name: &str) -> Result<CertificateSigningRequestParams, Refusal> {
    let csr = CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        Refusal::permanent(format!("the certificate signing request is not valid: {e}"))
    })?;
    let name = match csr.params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_string(),
        _ => String::new(),
    };
    if name != expected_name {
        return Err(Refusal::permanent(format!(
            "the signing request names `{name}`, not `{expected_name}`"
        )));
    }
    Ok(csr)
}

fn key_sha256(csr: &CertificateSigningRequestParams) -> String {
    Sha256::digest(csr.public_key.der_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &Path) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "provisioning CA");
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        Ca::load(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            allow: Allow::Pattern("SN-*".into()),
            name_template: "cam-{serial}".into(),
            groups: vec!["line-3".into()],
            reissue: false,
            validity: Duration::from_secs(86_400),
            rate_per_minute: 100,
        }
    }

    fn responder(dir: &Path, policy: Policy) -> Responder {
        let record = Record::open(&dir.join("state")).unwrap();
        Responder::new(policy, ca(dir), record).unwrap()
    }

    fn request(serial: &str, name: &str, key: &KeyPair) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        let csr = params.serialize_request(key).unwrap().pem().unwrap();
        serde_json::to_vec(&Request {
            request_id: "r1".into(),
            serial: serial.into(),
            csr,
        })
        .unwrap()
    }

    fn claim(r: &mut Responder, serial: &str, key: &KeyPair) -> Response {
        r.handle(
            Kind::Claim,
            &claim_client_id(serial),
            &request(serial, serial, key),
            1_800_000_000,
        )
        .unwrap()
    }

    fn refusal(r: Response) -> String {
        match r {
            Response::Refused { reason, .. } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_claim_gets_a_certificate_for_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = responder(dir.path(), policy());
        let key = KeyPair::generate().unwrap();
        let Response::Issued {
            device_id,
            groups,
            certificate_chain,
            not_before,
            not_after,
            ..
        } = claim(&mut r, "SN-1", &key)
        else {
            panic!("not issued")
        };
        assert_eq!(
            (device_id.as_str(), groups),
            ("cam-SN-1", vec!["line-3".to_string()])
        );
        assert_eq!(not_after - 1_800_000_000, 86_400);
        assert_eq!(1_800_000_000 - not_before, 300);
        assert_eq!(certificate_chain.matches("BEGIN CERTIFICATE").count(), 2);
        // The first certificate names the device (the key match is checked by the device).
        let end = "-----END CERTIFICATE-----";
        let first = &certificate_chain[..certificate_chain.find(end).unwrap() + end.len()];
        let (_, pem) = x509_parser::pem::parse_x509_pem(first.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        assert_eq!(cn, ["cam-SN-1"]);
        assert_eq!(cert.validity().not_after.timestamp() as u64, not_after);
    }

    #[test]
    fn serials_not_allowed_and_repeats_are_refused_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = responder(dir.path(), policy());
        let key = KeyPair::generate().unwrap();
        let reason = refusal(claim(&mut r, "XX-1", &key));
        assert!(reason.contains("not allowed"), "{reason}");
        assert!(matches!(
            claim(&mut r, "SN-1", &key),
            Response::Issued { .. }
        ));
        // The same device again (same key): answered again, not refused.
        assert!(matches!(
            claim(&mut r, "SN-1", &key),
            Response::Issued { .. }
        ));
        // Another key for the same serial: refused unless re-issue is allowed.
        let other = KeyPair::generate().unwrap();
        let reason = refusal(claim(&mut r, "SN-1", &other));
        assert!(reason.contains("--reissue"), "{reason}");
        // A request whose client is not the serial's claim client.
        let reason = refusal(
            r.handle(Kind::Claim, "claim-SN-2", &request("SN-1", "SN-1", &key), 1)
                .unwrap(),
        );
        assert!(reason.contains("came from client"), "{reason}");
        // A restarted responder remembers (the record), and --reissue replaces.
        drop(r);
        let mut again = responder(
            dir.path(),
            Policy {
                reissue: true,
                ..policy()
            },
        );
        assert_eq!(again.issued(), 1);
        assert!(matches!(
            claim(&mut again, "SN-1", &other),
            Response::Issued { .. }
        ));
    }

    #[test]
    fn renewals_come_from_the_device_it_was_issued_to() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = responder(dir.path(), policy());
        let key = KeyPair::generate().unwrap();
        assert!(matches!(
            claim(&mut r, "SN-1", &key),
            Response::Issued { .. }
        ));
        let new_key = KeyPair::generate().unwrap();
        let renewed = r
            .handle(
                Kind::Renew,
                "cam-SN-1",
                &request("SN-1", "cam-SN-1", &new_key),
                5,
            )
            .unwrap();
        assert!(matches!(renewed, Response::Issued { .. }), "{renewed:?}");
        let reason = refusal(
            r.handle(
                Kind::Renew,
                "cam-SN-9",
                &request("SN-9", "cam-SN-9", &new_key),
                5,
            )
            .unwrap(),
        );
        assert!(reason.contains("not issued by this responder"), "{reason}");
        let reason = refusal(
            r.handle(
                Kind::Renew,
                "cam-SN-1",
                &request("SN-1", "cam-SN-2", &new_key),
                5,
            )
            .unwrap(),
        );
        assert!(reason.contains("names `cam-SN-2`"), "{reason}");
        // After the renewal, the claim path recognises the device by its new key.
        assert!(matches!(
            claim(&mut r, "SN-1", &new_key),
            Response::Issued { .. }
        ));
    }

    #[test]
    fn bursts_past_the_rate_are_told_when_to_ask_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = responder(
            dir.path(),
            Policy {
                rate_per_minute: 2,
                allow: Allow::Any,
                ..policy()
            },
        );
        let key = KeyPair::generate().unwrap();
        for serial in ["A1", "A2"] {
            assert!(matches!(
                claim(&mut r, serial, &key),
                Response::Issued { .. }
            ));
        }
        match claim(&mut r, "A3", &key) {
            Response::Refused {
                retry_after_secs: Some(secs),
                reason,
                ..
            } => assert!(secs >= 1 && reason.contains("too many"), "{reason}"),
            other => panic!("expected a rate refusal, got {other:?}"),
        }
    }

    #[test]
    fn templates_and_patterns() {
        assert!(glob(b"SN-*", b"SN-42") && !glob(b"SN-*", b"XN-42"));
        assert!(glob(b"a?c*", b"abcdef") && !glob(b"a?c", b"ac"));
        let bad = Policy {
            name_template: "cam".into(),
            ..policy()
        };
        assert!(bad.check().unwrap_err().to_string().contains("{serial}"));
        let bad = Policy {
            name_template: "_{serial}".into(),
            ..policy()
        };
        assert!(bad.check().is_err());
    }
}
