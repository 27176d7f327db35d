//! Provisioning over the hub: what a device and the operator's responder exchange, and on
//! which topics.
//!
//! A device at first boot connects with the batch's **claim** identity (a certificate shared by
//! every device of an image, allowed nothing but these topics) and asks for its own identity;
//! a provisioned device **renews** its certificate with its current one. Either way it sends a
//! certificate signing request for a key it made itself (the private key never leaves the
//! device) and gets back a certificate chain — public data, so a response read by another
//! claim client gives that client nothing it can use.
//!
//! Topics (`{p}` is the responder's prefix, `outpost/_provisioning` by default: names starting
//! with `_` are never devices, so it cannot collide with a device's topics):
//! - `{p}/claim/{client}/request` and `…/response`: `client` is the claim connection's client
//!   id, `claim-{serial}`; the broker's ACL confines each claim client to its own pair.
//! - `{p}/renew/{device}/request` and `…/response`: only the device itself may publish there
//!   (the ACL keys them on the certificate's name).

use serde::{Deserialize, Serialize};

use super::topics::is_level;

/// The responder's topic prefix unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "outpost/_provisioning";

/// The responder's prefix for a fleet whose topics start with `fleet_prefix`:
/// `{fleet_prefix}/_provisioning`.
pub fn prefix_for(fleet_prefix: &str) -> String {
    format!("{fleet_prefix}/_provisioning")
}

/// Whether a responder must never hand out `name`: `{prefix}/groups/…` holds group deployments
/// and `{prefix}/_…` the operator's and the responder's topics, so a device of that name could
/// read or write them (the agent refuses the same names in `device_id`).
pub fn is_reserved_name(name: &str) -> bool {
    name == "groups" || name.starts_with('_')
}

/// Which exchange a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// First boot, with the claim identity.
    Claim,
    /// Renewal, with the device's own identity.
    Renew,
}

impl Kind {
    fn level(self) -> &'static str {
        match self {
            Kind::Claim => "claim",
            Kind::Renew => "renew",
        }
    }
}

/// The claim connection's client id for a serial.
pub fn claim_client_id(serial: &str) -> String {
    format!("claim-{serial}")
}

/// `{prefix}/{claim|renew}/{who}/request`.
pub fn request_topic(prefix: &str, kind: Kind, who: &str) -> String {
    format!("{prefix}/{}/{who}/request", kind.level())
}

/// `{prefix}/{claim|renew}/{who}/response`.
pub fn response_topic(prefix: &str, kind: Kind, who: &str) -> String {
    format!("{prefix}/{}/{who}/response", kind.level())
}

/// The responder's subscription for one kind of request.
pub fn request_filter(prefix: &str, kind: Kind) -> String {
    format!("{prefix}/{}/+/request", kind.level())
}

/// The kind and the client (claim) or device (renew) of a request topic.
pub fn classify_request<'a>(prefix: &str, topic: &'a str) -> Option<(Kind, &'a str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (kind, rest) = rest.split_once('/')?;
    let who = rest.strip_suffix("/request")?;
    let kind = match kind {
        "claim" => Kind::Claim,
        "renew" => Kind::Renew,
        _ => return None,
    };
    is_level(who).then_some((kind, who))
}

/// Whether `serial` can name a device: a topic level (letters, digits, `.`, `_`, `-`).
pub fn is_valid_serial(serial: &str) -> bool {
    is_level(serial)
}

/// A device's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    /// Chosen by the device; the response carries it back, so a late answer to an earlier
    /// request is told apart.
    pub request_id: String,
    /// The device's serial number (from its configured source).
    pub serial: String,
    /// PEM certificate signing request for the device's new key.
    pub csr: String,
}

/// The responder's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase", deny_unknown_fields)]
pub enum Response {
    #[serde(rename_all = "camelCase")]
    Issued {
        request_id: String,
        device_id: String,
        #[serde(default)]
        groups: Vec<String>,
        /// PEM: the device's certificate first, then the issuing CA's.
        certificate_chain: String,
        /// The responder's clock at issuance (Unix seconds): the device measures its
        /// certificate's age against this, not against a clock that may read 1970.
        issued_at: u64,
        not_before: u64,
        not_after: u64,
    },
    #[serde(rename_all = "camelCase")]
    Refused {
        request_id: String,
        /// Why, in words the device logs and `outpost check` shows.
        reason: String,
        /// When asking again may help (rate limit); `None`: not before the operator acts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
    },
}

impl Response {
    pub fn request_id(&self) -> &str {
        match self {
            Response::Issued { request_id, .. } | Response::Refused { request_id, .. } => {
                request_id
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics_round_trip() {
        let p = DEFAULT_PREFIX;
        assert_eq!(prefix_for("outpost"), p);
        let t = request_topic(p, Kind::Claim, &claim_client_id("SN-42"));
        assert_eq!(t, "outpost/_provisioning/claim/claim-SN-42/request");
        assert_eq!(classify_request(p, &t), Some((Kind::Claim, "claim-SN-42")));
        let t = request_topic(p, Kind::Renew, "cam-1");
        assert_eq!(classify_request(p, &t), Some((Kind::Renew, "cam-1")));
        assert_eq!(
            classify_request(p, &response_topic(p, Kind::Renew, "cam-1")),
            None
        );
        assert_eq!(
            classify_request(p, "outpost/_provisioning/other/x/request"),
            None
        );
        assert_eq!(
            classify_request(p, "outpost/_provisioning/claim/a/b/request"),
            None
        );
    }

    #[test]
    fn responses_are_tagged_by_status() {
        let r: Response = serde_json::from_str(
            r#"{"status":"refused","requestId":"r1","reason":"serial not allowed"}"#,
        )
        .unwrap();
        assert_eq!(r.request_id(), "r1");
        assert!(matches!(
            r,
            Response::Refused {
                retry_after_secs: None,
                ..
            }
        ));
        let issued = Response::Issued {
            request_id: "r2".into(),
            device_id: "cam-1".into(),
            groups: vec!["line-3".into()],
            certificate_chain: "PEM".into(),
            issued_at: 10,
            not_before: 9,
            not_after: 100,
        };
        let text = serde_json::to_string(&issued).unwrap();
        assert!(text.contains(r#""status":"issued""#), "{text}");
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), issued);
    }
}
