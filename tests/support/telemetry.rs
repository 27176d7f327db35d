//! The parts the telemetry and bus tests look through:
//!
//! - [`HubConsumer`]: a client of the hub broker with a persistent session that collects every
//!   telemetry batch (what a hub-side consumer of Outpost's telemetry does);
//! - [`bus_listen`]: an address on the Docker bridge where the agent's bus can listen and the
//!   containers reach it;
//! - [`scrape`]: the agent's Prometheus endpoint, parsed;
//! - [`module_logs`], [`module_env`]: a module container's output and environment.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_agent::telemetry::upstream::ReceivedBatch;

use crate::broker::Broker;

/// Messages as received: (topic, payload).
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Collects the batches published under a filter on the hub broker.
pub struct HubConsumer {
    received: Received,
    subscribed: Arc<Mutex<bool>>,
    _client: rumqttc::Client,
}

impl HubConsumer {
    /// Connects with a persistent session (clean session off) and subscribes to `filter` at
    /// QoS 1; with a persistent broker, messages published while it reconnects wait for it.
    pub fn start(broker: &Broker, filter: &str) -> HubConsumer {
        HubConsumer::connect(
            broker.mqtt_options(&format!("hub-consumer-{}", std::process::id())),
            filter,
        )
    }

    /// [`HubConsumer::start`] with the connection's options given (a cluster's node).
    pub fn connect(mut options: rumqttc::MqttOptions, filter: &str) -> HubConsumer {
        crate::hub::init();
        options
            .set_clean_session(false)
            .set_max_packet_size(8 << 20, 1 << 20);
        let (client, mut connection) = rumqttc::Client::new(options, 64);
        let received = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(Mutex::new(false));
        {
            let (received, subscribed, client, filter) = (
                received.clone(),
                subscribed.clone(),
                client.clone(),
                filter.to_string(),
            );
            std::thread::spawn(move || {
                for event in connection.iter() {
                    match event {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                            if !ack.session_present {
                                let _ = client.try_subscribe(&filter, rumqttc::QoS::AtLeastOnce);
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            *subscribed.lock().unwrap() = true;
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            received
                                .lock()
                                .unwrap()
                                .push((p.topic.clone(), p.payload.to_vec()));
                        }
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::RequestsDone) => return,
                        // The broker is down on purpose in these tests: retry.
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            });
        }
        let consumer = HubConsumer {
            received,
            subscribed,
            _client: client,
        };
        crate::wait_for(
            "the hub consumer to subscribe",
            Duration::from_secs(20),
            || (*consumer.subscribed.lock().unwrap()).then_some(()),
        );
        consumer
    }

    /// Every batch received so far on topics ending in `/telemetry/{stream}`.
    pub fn batches(&self, stream: &str) -> Vec<ReceivedBatch> {
        let suffix = format!("/telemetry/{stream}");
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.ends_with(&suffix))
            .map(|(t, p)| {
                serde_json::from_slice(p)
                    .unwrap_or_else(|e| panic!("batch on {t} is not a batch: {e}"))
            })
            .collect()
    }
}

/// `IP:PORT` on the Docker bridge's gateway with a free port: where the host's agent listens
/// and the containers on the default network connect.
pub fn bus_listen() -> String {
    let out = crate::run(Command::new("docker").args([
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}}{{end}}",
    ]));
    let mut parts = out.split_whitespace();
    let first = parts.next().unwrap_or_default();
    let ip: std::net::Ipv4Addr = match first.parse() {
        Ok(ip) => ip,
        Err(_) => {
            // No gateway listed: Docker uses the subnet's first address.
            let net: std::net::Ipv4Addr = first
                .split('/')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no bridge subnet in `{out}`"));
            std::net::Ipv4Addr::from(u32::from(net) + 1)
        }
    };
    let port = std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port on the bridge")
        .port();
    format!("{ip}:{port}")
}

/// `GET /metrics` on loopback; `None` while the endpoint has nothing (503) or is not up.
pub fn scrape(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Parses Prometheus text: `name{labels}` → value; checks every sample line's shape and that
/// each family has `# TYPE` before its samples.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().expect("TYPE names a metric");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line without a value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value is not a number: {line}"));
        let name = series.split('{').next().unwrap_or(series);
        let family = name
            .strip_suffix("_sum")
            .or_else(|| name.strip_suffix("_count"))
            .filter(|f| typed.contains(*f))
            .unwrap_or(name);
        assert!(
            typed.contains(family),
            "{name} has no # TYPE line before it"
        );
        out.insert(series.to_string(), value);
    }
    out
}

/// The value of the first series named `name` whose labels contain `label` (e.g.
/// `reason="full"`), or any series of that name when `label` is empty.
pub fn metric(samples: &BTreeMap<String, f64>, name: &str, label: &str) -> Option<f64> {
    samples
        .iter()
        .find(|(series, _)| {
            series.split('{').next() == Some(name) && (label.is_empty() || series.contains(label))
        })
        .map(|(_, v)| *v)
}

/// The output (stdout and stderr) of a module's container.
pub fn module_logs(device: &str, module: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", &format!("outpost.{device}.{module}")])
        .output()
        .expect("docker logs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A module container's environment.
pub fn module_env(device: &str, module: &str) -> BTreeMap<String, String> {
    let out = crate::run(Command::new("docker").args([
        "inspect",
        "-f",
        "{{json .Config.Env}}",
        &format!("outpost.{device}.{module}"),
    ]));
    let env: Vec<String> = serde_json::from_str(out.trim()).expect("env is a JSON list");
    env.into_iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
        .collect()
}

/// A module container's id.
pub fn module_id(device: &str, module: &str) -> String {
    crate::run(Command::new("docker").args([
        "inspect",
        "-f",
        "{{.Id}}",
        &format!("outpost.{device}.{module}"),
    ]))
    .trim()
    .to_string()
}
