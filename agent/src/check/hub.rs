//! The hub, endpoint by endpoint (`hub.url`, then `hub.failover_urls`): TCP reachable, the TLS
//! handshake with the configured CA and client certificate, an MQTT CONNECT answered by a
//! CONNACK — and a probe published on the device's own responses topic and read back.
//!
//! The probe is what catches a wrong access rule: an MQTT 3.1.1 broker cannot refuse a
//! PUBLISH, so one its ACL forbids is acknowledged and dropped, and a device with a wrong ACL
//! otherwise looks healthy. The probe connects as `{device_id}-check`, so it never takes over
//! the running agent's connections (`{device_id}` and `{device_id}-telemetry`).

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectionError, Event, Packet, QoS, SubscribeReasonCode};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::x509::{self, Validity};
use super::{Finding, STEP_TIMEOUT};
use crate::config::{Config, HubConfig};
use crate::hub::HubError;
use crate::hub::link::{self, Settings};
use crate::hub::topics::Topics;

/// How long the probe waits to read back what it published.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the hub checks found, and the server certificate seen in a handshake (for the clock).
#[derive(Default)]
pub struct HubOutcome {
    pub findings: Vec<Finding>,
    pub server_certificate: Option<Validity>,
}

pub async fn check(config: &Config) -> HubOutcome {
    let Some(hub) = &config.hub else {
        return HubOutcome {
            findings: vec![Finding::ok("hub", "no [hub] configured")],
            server_certificate: None,
        };
    };
    // Not provisioned yet (no device id): the claim identity connects, and may publish only
    // its request, so there is no probe to read back.
    let client_id = if config.device_id.is_empty() {
        format!("claim-check-{}", random_suffix())
    } else {
        format!("{}-check", config.device_id)
    };
    let settings = match link::settings(hub, &client_id) {
        Ok(s) => s,
        Err(e) => {
            return HubOutcome {
                findings: vec![Finding::error("hub-mqtt", e.to_string(), fix_for(&e))],
                server_certificate: None,
            };
        }
    };
    let topics =
        (!config.device_id.is_empty()).then(|| Topics::new(&hub.topic_prefix, &config.device_id));
    let mut endpoints = vec![settings.clone()];
    for _ in &hub.failover {
        let next = endpoints[endpoints.len() - 1].next_endpoint();
        endpoints.push(next);
    }
    let runs = endpoints
        .iter()
        .map(|s| endpoint(hub, s, topics.as_ref(), endpoints.len() > 1));
    let mut out = HubOutcome::default();
    for one in futures_util::future::join_all(runs).await {
        out.findings.extend(one.findings);
        if out.server_certificate.is_none() {
            out.server_certificate = one.server_certificate;
        }
    }
    out
}

/// Every check against one endpoint; later steps only once the earlier ones passed.
async fn endpoint(
    hub: &HubConfig,
    s: &Settings,
    topics: Option<&Topics>,
    many: bool,
) -> HubOutcome {
    let at = format!("{}:{}", s.host, s.port);
    let name = |n: &str| {
        if many {
            format!("{n} {at}")
        } else {
            n.to_string()
        }
    };
    let mut out = HubOutcome::default();
    let started = Instant::now();
    let stream = match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(&at)).await {
        Ok(Ok(stream)) => {
            out.findings.push(Finding::ok(
                &name("hub-reachable"),
                format!("{at} accepts TCP ({} ms)", started.elapsed().as_millis()),
            ));
            stream
        }
        Ok(Err(e)) => {
            let fix = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                "start the broker, or correct the port in hub.url / hub.failover_urls"
            } else {
                "check the host name in hub.url (DNS), the route and any firewall between device and hub"
            };
            out.findings.push(Finding::error(
                &name("hub-reachable"),
                format!("{at}: {e}"),
                fix,
            ));
            return out;
        }
        Err(_) => {
            out.findings.push(Finding::error(
                &name("hub-reachable"),
                format!(
                    "{at}: no answer within {} s (packets dropped: a firewall, a wrong address, or no route)",
                    STEP_TIMEOUT.as_secs()
                ),
                "check hub.url's host and port, the route and any firewall between device and hub",
            ));
            return out;
        }
    };
    match &s.tls {
        None => {
            drop(stream);
            out.findings
                .push(if hub.url.host_str().is_some_and(is_loopback) {
                    Finding::ok(&name("hub-tls"), "not used: plaintext MQTT on loopback")
                } else {
                    Finding::warning(
                        &name("hub-tls"),
                        "not used: plaintext MQTT to a remote hub (hub.allow_insecure)",
                        "use an mqtts:// URL and a CA in hub.ca_file",
                    )
                });
        }
        Some(files) => match handshake(stream, s, files).await {
            Ok((summary, server)) => {
                out.findings.push(Finding::ok(&name("hub-tls"), summary));
                out.server_certificate = server;
            }
            Err(e) => {
                out.findings.push(Finding::error(
                    &name("hub-tls"),
                    format!("{at}: {e}"),
                    fix_for(&e),
                ));
                return out;
            }
        },
    }
    out.findings.extend(mqtt(s, topics, &name).await);
    out
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A TLS handshake on `stream` with the link's own client configuration; the server's
/// certificate is read for its validity (the clock check).
async fn handshake(
    stream: TcpStream,
    s: &Settings,
    files: &crate::hub::tls::TlsFiles,
) -> Result<(String, Option<Validity>), HubError> {
    let config = crate::hub::tls::client_config(files)?;
    let name = rustls::pki_types::ServerName::try_from(s.host.clone())
        .map_err(|e| HubError::TlsSetup(format!("`{}` is not a host name: {e}", s.host)))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = match tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return Err(s.explain(&ConnectionError::Tls(rumqttc::TlsError::Io(e))));
        }
        Err(_) => return Err(HubError::Timeout(STEP_TIMEOUT)),
    };
    let (_, connection) = tls.get_ref();
    let version = connection
        .protocol_version()
        .map_or("TLS".to_string(), |v| format!("{v:?}"));
    let server = connection
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| x509::validity(c));
    let summary = match &server {
        Some(v) => format!(
            "{version} handshake with {}:{}; server certificate `{}` valid until {}",
            s.host,
            s.port,
            v.subject.as_deref().unwrap_or("?"),
            outpost_core::time::format_rfc3339(v.not_after)
        ),
        None => format!("{version} handshake with {}:{}", s.host, s.port),
    };
    Ok((summary, server))
}

/// CONNECT until CONNACK, then the probe: subscribe to a fresh responses topic, publish to
/// it, and wait to read it back.
async fn mqtt(
    s: &Settings,
    topics: Option<&Topics>,
    name: &(dyn Fn(&str) -> String + Sync),
) -> Vec<Finding> {
    let at = format!("{}:{}", s.host, s.port);
    let fail =
        |check: &str, e: HubError| Finding::error(&name(check), format!("{at}: {e}"), fix_for(&e));
    let (client, mut eventloop) = match outpost_mqtt::client(s, None) {
        Ok(c) => c,
        Err(e) => return vec![fail("hub-mqtt", e)],
    };
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return vec![fail("hub-mqtt", HubError::Timeout(STEP_TIMEOUT))],
            Ok(Err(e)) => {
                let err = s.explain(&e);
                let mut f = fail("hub-mqtt", err);
                if let Some(hint) = s.hint_closed_before_connack(&s.explain(&e)) {
                    f.message.push_str(&format!(" ({hint})"));
                }
                return vec![f];
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
        }
    }
    let mut out = vec![Finding::ok(
        &name("hub-mqtt"),
        format!("{at} accepted CONNECT as client `{}`", s.client_id),
    )];
    let Some(topics) = topics else {
        out.push(Finding::ok(
            &name("hub-acl"),
            "not probed: the claim identity may only ask for provisioning",
        ));
        return out;
    };
    let nonce = format!("check-{}-{}", crate::hub::unix_now(), random_suffix());
    let topic = topics.response(&nonce);
    let acl_fix = format!(
        "let this device publish to and read `{}` (the broker's ACL; docs/hub.md#topics)",
        topics.response("+")
    );
    let probe = async {
        client
            .subscribe(&topic, QoS::AtLeastOnce)
            .await
            .map_err(|e| e.to_string())?;
        let mut published = false;
        loop {
            match eventloop.poll().await {
                Err(e) => return Err(s.explain(&e).to_string()),
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                        return Ok(Some(format!(
                            "the broker refused the subscription to {topic}, so the probe cannot be read back"
                        )));
                    }
                    client
                        .publish(&topic, QoS::AtLeastOnce, false, nonce.as_bytes().to_vec())
                        .await
                        .map_err(|e| e.to_string())?;
                    published = true;
                }
                Ok(Event::Incoming(Packet::Publish(p)))
                    if published && p.topic == topic && p.payload == nonce.as_bytes() =>
                {
                    return Ok(None);
                }
                Ok(_) => {}
            }
        }
    };
    let verdict = tokio::time::timeout(PROBE_TIMEOUT + STEP_TIMEOUT, probe).await;
    out.push(match verdict {
        Ok(Ok(None)) => Finding::ok(
            &name("hub-acl"),
            format!("probe published to {topic} and read back"),
        ),
        Ok(Ok(Some(refused))) => Finding::warning(&name("hub-acl"), refused, acl_fix),
        Ok(Err(e)) => Finding::error(&name("hub-acl"), format!("probe failed: {e}"), acl_fix),
        Err(_) => Finding::error(
            &name("hub-acl"),
            format!(
                "probe published to {topic} did not come back within {} s: the broker most likely drops this device's publishes (MQTT 3.1.1 acknowledges and silently drops a publish its ACL refuses)",
                PROBE_TIMEOUT.as_secs()
            ),
            acl_fix,
        ),
    });
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    out
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 6];
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to do about a connection failure.
pub fn fix_for(e: &HubError) -> String {
    match e {
        HubError::UntrustedServer { .. } => {
            "set hub.ca_file to the CA that signed the broker's certificate".into()
        }
        HubError::ServerName { .. } => {
            "use a hub.url host that the broker's certificate names (its subject alternative names), or reissue that certificate".into()
        }
        HubError::ServerCertificateTime { .. } => {
            "check this device's clock (NTP); if it is right, the broker's certificate must be renewed".into()
        }
        HubError::ClientCertificateRefused { .. } => {
            "use a device certificate signed by a CA the broker trusts (hub.cert_file, hub.key_file)".into()
        }
        HubError::Refused(_) => {
            "check hub.username and hub.password_file, and that the broker's rules accept this client".into()
        }
        HubError::ReadFile { .. }
        | HubError::NoCertificate { .. }
        | HubError::NoKey { .. }
        | HubError::EmptyPassword { .. }
        | HubError::TlsSetup(_) => "fix the file named above (path, permissions, PEM content)".into(),
        HubError::NoSystemRoots => "set hub.ca_file to the hub's CA".into(),
        HubError::Connect { .. } | HubError::Timeout(_) | HubError::Tls(_) | HubError::Client(_) => {
            "check that the broker runs and listens with TLS on that port, and the network between".into()
        }
        HubError::NotConfigured => "add a [hub] section".into(),
    }
}
