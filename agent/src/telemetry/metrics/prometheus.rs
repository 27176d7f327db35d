//! Rendering a [`Snapshot`] as Prometheus text ([`render_prometheus`], exposition format
//! 0.0.4).

use std::collections::BTreeMap;

use outpost_core::prometheus::{Exposition, Kind, Labels, Value};

use super::snapshot::Snapshot;
use crate::telemetry::outbox::DropReason;

/// The snapshot in the Prometheus text exposition format 0.0.4. Every sample carries a
/// `device` label; a value that is `None` is left out (with its `HELP` and `TYPE` when it was the
/// family's only sample).
pub fn render_prometheus(s: &Snapshot) -> String {
    let mut e = Exposition::new(("device", &s.device_id));
    let d = &s.device;
    e.gauge(
        "outpost_device_cpu_percent",
        "Busy share of all CPUs since the previous sample, in percent.",
        d.cpu_percent.map(Value::Float),
    );
    e.gauge(
        "outpost_device_cpu_count",
        "CPUs online.",
        Some(Value::from_usize(d.cpu_count)),
    );
    e.gauge(
        "outpost_device_load1",
        "One-minute load average.",
        d.load1.map(Value::Float),
    );
    e.gauge(
        "outpost_device_memory_total_bytes",
        "Physical memory.",
        Some(Value::Int(d.memory_total_bytes)),
    );
    e.gauge(
        "outpost_device_memory_available_bytes",
        "Memory available without swapping (MemAvailable).",
        Some(Value::Int(d.memory_available_bytes)),
    );
    let path = || vec![("path", d.disk_path.as_str())];
    e.family(
        "outpost_device_disk_total_bytes",
        Kind::Gauge,
        "Size of the filesystem holding the agent's state.",
        [(path(), Some(Value::Int(d.disk_total_bytes)))],
    );
    e.family(
        "outpost_device_disk_available_bytes",
        Kind::Gauge,
        "Space available to unprivileged users on the filesystem holding the agent's state.",
        [(path(), Some(Value::Int(d.disk_available_bytes)))],
    );
    e.gauge(
        "outpost_device_temperature_celsius",
        "Temperature of the hottest thermal zone.",
        d.temperature_celsius.map(Value::Float),
    );
    e.gauge(
        "outpost_device_uptime_seconds",
        "Time since the device booted.",
        d.uptime_secs.map(Value::Int),
    );

    let modules = &s.modules;
    e.family(
        "outpost_module_status",
        Kind::Gauge,
        "The module's status, as the value 1 on its status label.",
        modules.iter().map(|(name, m)| {
            (
                vec![("module", name.as_str()), ("status", m.status.as_str())],
                Some(Value::Int(1)),
            )
        }),
    );
    e.family(
        "outpost_module_cpu_percent",
        Kind::Gauge,
        "CPU use of the module, in percent of one CPU.",
        modules
            .iter()
            .map(|(name, m)| (module_label(name), m.cpu_percent.map(Value::Float))),
    );
    e.family(
        "outpost_module_memory_bytes",
        Kind::Gauge,
        "Memory the module uses, reclaimable page cache excluded.",
        modules
            .iter()
            .map(|(name, m)| (module_label(name), m.memory_bytes.map(Value::Int))),
    );
    e.family(
        "outpost_module_memory_limit_bytes",
        Kind::Gauge,
        "The module's memory limit (the host's memory when it has none).",
        modules
            .iter()
            .map(|(name, m)| (module_label(name), m.memory_limit_bytes.map(Value::Int))),
    );
    e.family(
        "outpost_module_restarts_total",
        Kind::Counter,
        "Restarts of the module by the agent.",
        modules
            .iter()
            .map(|(name, m)| (module_label(name), Some(Value::Int(u64::from(m.restarts))))),
    );

    let a = &s.agent;
    e.family(
        "outpost_agent_info",
        Kind::Gauge,
        "The agent's version, as the value 1 on its version label.",
        [(vec![("version", a.version.as_str())], Some(Value::Int(1)))],
    );
    e.gauge(
        "outpost_agent_rss_bytes",
        "Resident memory of the agent.",
        a.rss_bytes.map(Value::Int),
    );
    e.gauge(
        "outpost_outbox_records",
        "Records waiting in the outbox.",
        Some(Value::Int(a.outbox_records)),
    );
    e.gauge(
        "outpost_outbox_bytes",
        "Bytes waiting in the outbox.",
        Some(Value::Int(a.outbox_bytes)),
    );
    e.gauge(
        "outpost_outbox_max_bytes",
        "The outbox's size limit.",
        Some(Value::Int(a.outbox_max_bytes)),
    );
    e.counter(
        "outpost_outbox_enqueued_total",
        "Records put in the outbox.",
        a.enqueued_total,
    );
    e.counter(
        "outpost_outbox_delivered_total",
        "Records the hub acknowledged.",
        a.delivered_total,
    );
    // Every reason the outbox drops records for is rendered, at 0 until it happens.
    let mut dropped: BTreeMap<&str, u64> =
        DropReason::ALL.iter().map(|r| (r.as_str(), 0)).collect();
    dropped.extend(a.dropped_total.iter().map(|(r, n)| (r.as_str(), *n)));
    e.family(
        "outpost_outbox_dropped_total",
        Kind::Counter,
        "Records dropped from the outbox, by reason.",
        dropped
            .into_iter()
            .map(|(reason, n)| (vec![("reason", reason)], Some(Value::Int(n)))),
    );
    e.gauge(
        "outpost_hub_connected",
        "1 while the telemetry link to the hub is up, else 0.",
        Some(Value::Int(u64::from(a.hub_connected))),
    );
    e.counter(
        "outpost_hub_reconnects_total",
        "Reconnections of the telemetry link to the hub.",
        a.hub_reconnects_total,
    );
    e.gauge(
        "outpost_bus_clients",
        "Clients connected to the local bus.",
        Some(Value::Int(a.bus_clients)),
    );
    e.counter(
        "outpost_bus_refused_total",
        "Connections, publishes and subscriptions the local bus refused.",
        a.bus_refused_total,
    );
    e.counter(
        "outpost_bus_received_total",
        "Messages modules published on the local bus.",
        a.bus_received_total,
    );
    e.counter(
        "outpost_bus_dropped_total",
        "Messages routed to a module input that was not connected or could not keep up.",
        a.bus_dropped_total,
    );
    e.gauge(
        "outpost_deployment_last_seconds",
        "How long the last deployment took.",
        a.last_deployment_secs.map(Value::Float),
    );
    e.header(
        "outpost_deployment_seconds",
        Kind::Summary,
        "How long deployments took.",
    );
    e.sample(
        "outpost_deployment_seconds_sum",
        &[],
        Value::Float(a.deployment_secs_sum),
    );
    e.sample(
        "outpost_deployment_seconds_count",
        &[],
        Value::Int(a.deployments_total),
    );
    e.out
}

/// Labels of a module's samples.
fn module_label(name: &str) -> Labels<'_> {
    vec![("module", name)]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::snapshot::example as snapshot;
    use super::super::snapshot::{AgentMetrics, DeviceMetrics, ModuleMetrics};
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A strict reader of the text format: panics on anything it does not expect.
    fn parse_exposition(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'));
        let mut help = BTreeSet::new();
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut finished = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap();
                assert!(!text.is_empty());
                assert!(help.insert(name.to_string()), "second HELP for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(help.contains(name), "TYPE before HELP for {name}");
                assert!(["gauge", "counter", "summary"].contains(&kind));
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
                assert!(types.insert(name.into(), kind.into()).is_none());
                if let Some(prev) = current.replace(name.to_string()) {
                    finished.insert(prev);
                }
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let sample = parse_sample(line);
            let family = types
                .keys()
                .find(|f| {
                    sample.name == **f
                        || (types[*f] == "summary"
                            && [format!("{f}_sum"), format!("{f}_count")].contains(&sample.name))
                })
                .unwrap_or_else(|| panic!("{} has no HELP and TYPE before it", sample.name));
            assert_eq!(
                Some(family),
                current.as_ref(),
                "{line}: family not contiguous"
            );
            assert!(!finished.contains(family));
            samples.push(sample);
        }
        samples
    }

    fn parse_sample(line: &str) -> Sample {
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        assert!(
            name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name {name:?}"
        );
        let mut labels = BTreeMap::new();
        let mut rest = line[name_end..].chars().peekable();
        if rest.peek() == Some(&'{') {
            rest.next();
            loop {
                let key: String = rest.by_ref().take_while(|c| *c != '=').collect();
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                );
                assert_eq!(rest.next(), Some('"'));
                let mut value = String::new();
                loop {
                    match rest.next().unwrap() {
                        '"' => break,
                        '\\' => match rest.next().unwrap() {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => panic!("bad escape \\{other}"),
                        },
                        '\n' => panic!("raw newline in a label value"),
                        c => value.push(c),
                    }
                }
                assert!(labels.insert(key, value).is_none(), "repeated label");
                match rest.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("unexpected {other:?} in {line}"),
                }
            }
        }
        assert_eq!(rest.next(), Some(' '));
        let value: String = rest.collect();
        let value = match value.as_str() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value {v:?} in {line}")),
        };
        Sample {
            name: name.to_string(),
            labels,
            value,
        }
    }

    fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn prometheus_text_parses_back() {
        let s = snapshot();
        let text = render_prometheus(&s);
        let samples = parse_exposition(&text);
        for sample in &samples {
            assert_eq!(
                sample.labels.get("device").map(String::as_str),
                Some("pump-7")
            );
        }
        assert_eq!(
            value(&samples, "outpost_device_cpu_percent", None),
            Some(12.5)
        );
        assert_eq!(
            value(&samples, "outpost_device_memory_available_bytes", None),
            Some((3u64 << 30) as f64)
        );
        assert_eq!(
            value(
                &samples,
                "outpost_device_disk_total_bytes",
                Some(("path", "/var/lib/outpost"))
            ),
            Some((32u64 << 30) as f64)
        );
        // No thermal zone: no sample, and no HELP or TYPE either.
        assert!(!text.contains("temperature"));
        assert_eq!(
            value(
                &samples,
                "outpost_module_cpu_percent",
                Some(("module", "infer"))
            ),
            Some(150.0)
        );
        assert_eq!(
            value(
                &samples,
                "outpost_module_cpu_percent",
                Some(("module", "sensor"))
            ),
            None
        );
        assert_eq!(
            value(
                &samples,
                "outpost_module_restarts_total",
                Some(("module", "sensor"))
            ),
            Some(2.0)
        );
        let status = samples
            .iter()
            .find(|s| s.name == "outpost_module_status" && s.labels["module"] == "sensor")
            .unwrap();
        assert_eq!(status.labels["status"], "exited");
        assert_eq!(value(&samples, "outpost_outbox_records", None), Some(3.0));
        for (reason, n) in [
            ("full", 4.0),
            ("expired", 0.0),
            ("too-large", 0.0),
            ("disk", 0.0),
        ] {
            assert_eq!(
                value(
                    &samples,
                    "outpost_outbox_dropped_total",
                    Some(("reason", reason))
                ),
                Some(n)
            );
        }
        assert_eq!(value(&samples, "outpost_hub_connected", None), Some(1.0));
        assert_eq!(
            value(&samples, "outpost_hub_reconnects_total", None),
            Some(1.0)
        );
        assert_eq!(
            value(&samples, "outpost_deployment_seconds_sum", None),
            Some(12.25)
        );
        assert_eq!(
            value(&samples, "outpost_deployment_seconds_count", None),
            Some(2.0)
        );
        assert_eq!(
            value(&samples, "outpost_agent_info", Some(("version", "0.1.0"))),
            Some(1.0)
        );
    }

    #[test]
    fn prometheus_label_values_are_escaped() {
        let mut s = snapshot();
        s.device_id = "we\"ird\\dev\nice".into();
        let odd = "mod \"x\"\\\n{y}=,";
        s.modules.insert(odd.into(), ModuleMetrics::default());
        s.device.cpu_percent = Some(f64::NAN);
        s.device.load1 = Some(f64::INFINITY);
        let text = render_prometheus(&s);
        let samples = parse_exposition(&text);
        assert!(!samples.is_empty());
        for sample in &samples {
            assert_eq!(sample.labels["device"], s.device_id);
        }
        assert_eq!(
            value(
                &samples,
                "outpost_module_restarts_total",
                Some(("module", odd))
            ),
            Some(0.0)
        );
        assert!(
            value(&samples, "outpost_device_cpu_percent", None)
                .unwrap()
                .is_nan()
        );
        assert_eq!(
            value(&samples, "outpost_device_load1", None),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn prometheus_with_nothing_optional() {
        let s = Snapshot {
            device_id: "d".into(),
            ts: 0,
            device: DeviceMetrics::default(),
            modules: BTreeMap::new(),
            agent: AgentMetrics::default(),
        };
        let text = render_prometheus(&s);
        let samples = parse_exposition(&text);
        assert!(!text.contains("outpost_module_"));
        assert!(!text.contains("outpost_device_cpu_percent"));
        assert_eq!(
            value(&samples, "outpost_deployment_seconds_count", None),
            Some(0.0)
        );
    }
}
