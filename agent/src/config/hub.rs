//! `[hub]`: the hub's URL (TLS unless on loopback or asked), the client's certificate or
//! credentials, the topic prefix and groups, and the connection's timing.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::HubConfig;
use super::raw::RawHub;
use super::validate::{Issues, is_topic_level};

pub(super) fn hub(h: RawHub, base: &Path, issues: &mut Issues) -> Option<HubConfig> {
    let Some(text) = h.url else {
        issues.push(
            "hub.url",
            "is required when [hub] is present, e.g. `mqtts://hub.example.com:8883`",
        );
        return None;
    };
    let (url, tls, host, port) = endpoint(&text, "hub.url", h.allow_insecure, issues)?;
    let mut failover = Vec::new();
    for (i, other) in h.failover_urls.iter().enumerate() {
        let key = format!("hub.failover_urls[{i}]");
        if let Some((_, other_tls, host, port)) = endpoint(other, &key, h.allow_insecure, issues) {
            if other_tls != tls {
                issues.push(
                    &key,
                    format!("`{other}` must use the same scheme as hub.url (`{}://`): the same TLS files serve every endpoint", url.scheme()),
                );
            }
            failover.push((host, port));
        }
    }
    let ca_file = h.ca_file.map(|f| issues.file("hub.ca_file", &f, base));
    let client_auth = match (h.cert_file, h.key_file) {
        (Some(c), Some(k)) => Some((
            issues.file("hub.cert_file", &c, base),
            issues.file("hub.key_file", &k, base),
        )),
        (None, None) => None,
        (Some(_), None) => {
            issues.push("hub.key_file", "is required with hub.cert_file");
            None
        }
        (None, Some(_)) => {
            issues.push("hub.cert_file", "is required with hub.key_file");
            None
        }
    };
    if client_auth.is_some() && !tls {
        issues.push(
            "hub.cert_file",
            "a client certificate needs an `mqtts://` URL",
        );
    }
    let credentials = issues.credentials("hub", h.username, h.password_file, base);
    let topic_prefix = h.topic_prefix.unwrap_or_else(|| "outpost".into());
    if topic_prefix.is_empty()
        || topic_prefix.contains(['+', '#'])
        || topic_prefix.starts_with('/')
        || topic_prefix.ends_with('/')
    {
        issues.push(
            "hub.topic_prefix",
            format!("`{topic_prefix}` must be a topic without wildcards or leading/trailing `/`"),
        );
    }
    for (i, group) in h.groups.iter().enumerate() {
        if !is_topic_level(group) {
            issues.push(
                &format!("hub.groups[{i}]"),
                format!("`{group}` is not valid: 1 to 128 letters, digits, `.`, `_` or `-`"),
            );
        }
    }
    let keep_alive = h.keep_alive_secs.unwrap_or(30);
    if !(5..=3600).contains(&keep_alive) {
        issues.push(
            "hub.keep_alive_secs",
            format!("{keep_alive} is outside 5..=3600"),
        );
    }
    let reconnect_max = h.reconnect_max_secs.unwrap_or(30);
    if !(1..=3600).contains(&reconnect_max) {
        issues.push(
            "hub.reconnect_max_secs",
            format!("{reconnect_max} is outside 1..=3600"),
        );
    }
    Some(HubConfig {
        url,
        host,
        port,
        failover,
        tls,
        ca_file,
        client_auth,
        credentials,
        topic_prefix,
        groups: h.groups,
        keep_alive: Duration::from_secs(keep_alive),
        reconnect_max: Duration::from_secs(reconnect_max),
    })
}

/// One hub URL: scheme (TLS or not), host and port, or the reason it is refused under `key`.
fn endpoint(
    text: &str,
    key: &str,
    allow_insecure: bool,
    issues: &mut Issues,
) -> Option<(url::Url, bool, String, u16)> {
    let url = match url::Url::parse(text) {
        Ok(u) => u,
        Err(e) => {
            issues.push(key, format!("`{text}` is not a URL: {e}"));
            return None;
        }
    };
    let tls = match url.scheme() {
        "mqtts" => true,
        "mqtt" => false,
        other => {
            issues.push(
                key,
                format!(
                    "scheme `{other}` is not supported; use `mqtts://` (or `mqtt://` on loopback)"
                ),
            );
            return None;
        }
    };
    let Some(host) = url
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_string())
    else {
        issues.push(key, format!("`{text}` names no host"));
        return None;
    };
    if !tls && !allow_insecure && !is_loopback(&host) {
        issues.push(
            key,
            format!("`{text}` is plaintext MQTT to a remote host; use `mqtts://`, or set hub.allow_insecure = true if you accept that"),
        );
    }
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    Some((url, tls, host, port))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::super::tests::load;

    #[test]
    fn failover_urls_are_checked_like_the_url() {
        let hub = load(
            "device_id = \"a\"\n[hub]\nurl = \"mqtts://n1.example.com\"\nfailover_urls = [\"mqtts://n2.example.com:8884\", \"mqtts://10.0.0.3\"]\n",
            &[],
        )
        .unwrap()
        .hub
        .unwrap();
        assert_eq!((hub.host.as_str(), hub.port), ("n1.example.com", 8883));
        assert_eq!(
            hub.failover,
            [
                ("n2.example.com".to_string(), 8884),
                ("10.0.0.3".to_string(), 8883)
            ]
        );
        let err = load(
            "device_id = \"a\"\n[hub]\nurl = \"mqtts://n1.example.com\"\nfailover_urls = [\"mqtt://n2.example.com\", \"nope\"]\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("hub.failover_urls[0]") && err.contains("plaintext"),
            "{err}"
        );
        assert!(
            err.contains("hub.failover_urls[1]") && err.contains("not a URL"),
            "{err}"
        );
    }

    #[test]
    fn plaintext_is_allowed_on_loopback_or_when_asked() {
        assert!(
            load(
                "device_id = \"a\"\n[hub]\nurl = \"mqtt://127.0.0.1:1883\"\n",
                &[]
            )
            .is_ok()
        );
        assert!(
            load(
                "device_id = \"a\"\n[hub]\nurl = \"mqtt://hub.lan\"\nallow_insecure = true\n",
                &[]
            )
            .is_ok()
        );
    }
}
