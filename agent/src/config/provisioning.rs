//! `[provisioning]`: first boot by claim. The hub (by default `[hub]`'s), the batch's claim
//! certificate and key, where the device's serial comes from, and the responder's topic
//! prefix. With it, the device's id, certificate and groups come from the responder, so
//! `device_id`, `hub.cert_file` and `hub.key_file` are left out.

use std::path::Path;
use std::time::Duration;

use outpost_core::wire::provisioning::prefix_for;

use super::raw::RawProvisioning;
use super::types::{HubConfig, ProvisioningConfig, SerialSource};
use super::validate::Issues;

pub(super) fn provisioning(
    p: RawProvisioning,
    hub: Option<&HubConfig>,
    base: &Path,
    issues: &mut Issues,
) -> Option<ProvisioningConfig> {
    let Some(hub) = hub else {
        issues.push(
            "provisioning",
            "needs a [hub] section: the hub the provisioned device connects to (its url and ca_file)",
        );
        return None;
    };
    if hub.client_auth.is_some() {
        issues.push(
            "hub.cert_file",
            "must be left out with [provisioning]: the device's certificate is issued at first boot",
        );
    }
    let (host, port, failover) = match p.url.as_deref() {
        None => (hub.host.clone(), hub.port, hub.failover.clone()),
        Some(text) => match url::Url::parse(text) {
            Ok(url) if url.scheme() == "mqtts" => match url.host_str() {
                Some(h) => (
                    h.trim_matches(['[', ']']).to_string(),
                    url.port().unwrap_or(8883),
                    Vec::new(),
                ),
                None => {
                    issues.push("provisioning.url", format!("`{text}` names no host"));
                    return None;
                }
            },
            Ok(url) => {
                issues.push(
                    "provisioning.url",
                    format!(
                        "scheme `{}` is not supported: the claim certificate needs `mqtts://`",
                        url.scheme()
                    ),
                );
                return None;
            }
            Err(e) => {
                issues.push("provisioning.url", format!("`{text}` is not a URL: {e}"));
                return None;
            }
        },
    };
    if p.url.is_none() && !hub.tls {
        issues.push(
            "provisioning.url",
            "hub.url is not `mqtts://`: the claim certificate needs TLS; name a TLS endpoint here",
        );
    }
    let ca_file = match p.ca_file {
        Some(f) => Some(issues.file("provisioning.ca_file", &f, base)),
        None => hub.ca_file.clone(),
    };
    let claim_cert = match p.claim_cert_file {
        Some(f) => issues.file("provisioning.claim_cert_file", &f, base),
        None => {
            issues.push(
                "provisioning.claim_cert_file",
                "is required: the batch's claim certificate (PEM)",
            );
            Default::default()
        }
    };
    let claim_key = match p.claim_key_file {
        Some(f) => issues.file("provisioning.claim_key_file", &f, base),
        None => {
            issues.push(
                "provisioning.claim_key_file",
                "is required: the claim certificate's private key (PEM)",
            );
            Default::default()
        }
    };
    let serial = match (p.serial_file, p.serial_command) {
        (Some(f), None) => SerialSource::File(if f.is_relative() { base.join(f) } else { f }),
        (None, Some(c)) if !c.trim().is_empty() => SerialSource::Command(c),
        (None, Some(_)) => {
            issues.push("provisioning.serial_command", "is empty");
            return None;
        }
        (None, None) => {
            issues.push(
                "provisioning.serial_file",
                "is required (or provisioning.serial_command): where the device's serial comes from, e.g. /etc/machine-id or /proc/device-tree/serial-number",
            );
            return None;
        }
        (Some(_), Some(_)) => {
            issues.push(
                "provisioning.serial_command",
                "give serial_file or serial_command, not both",
            );
            return None;
        }
    };
    let topic_prefix = p
        .topic_prefix
        .unwrap_or_else(|| prefix_for(&hub.topic_prefix));
    if topic_prefix.is_empty()
        || topic_prefix.contains(['+', '#'])
        || topic_prefix.starts_with('/')
        || topic_prefix.ends_with('/')
    {
        issues.push(
            "provisioning.topic_prefix",
            format!("`{topic_prefix}` must be a topic without wildcards or leading/trailing `/`"),
        );
    }
    let retry_max = p.retry_max_secs.unwrap_or(300);
    if !(5..=86_400).contains(&retry_max) {
        issues.push(
            "provisioning.retry_max_secs",
            format!("{retry_max} is outside 5..=86400"),
        );
    }
    Some(ProvisioningConfig {
        host,
        port,
        failover,
        ca_file,
        claim_cert,
        claim_key,
        serial,
        topic_prefix,
        retry_max: Duration::from_secs(retry_max),
    })
}
