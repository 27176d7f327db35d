//! Telemetry and the local bus with every real part: a real broker as the hub (Mosquitto, or
//! the one `OUTPOST_TEST_BROKER` names; mutual TLS where the broker has it, certificates made
//! by the test, and a hub outage the hub-side consumer's session survives — see
//! `Broker::outage_begin`),
//! the real agent with its embedded bus on the Docker bridge, and the test module in a
//! container publishing through the bus with the credentials the agent gave it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outpost_agent::telemetry::upstream::{ReceivedRecord, dedup};
use outpost_e2e::*;
use serde_json::{Value, json};

fn registries(registry: &Registry) -> Value {
    json!({ registry.addr.clone(): { "username": registry.username, "password": registry.password } })
}

/// Waits until the module's output shows `line`.
fn wait_module_says(device: &str, module: &str, line: &str, secs: u64) {
    wait_for(
        &format!("module {module} to print `{line}`"),
        Duration::from_secs(secs),
        || module_logs(device, module).contains(line).then_some(()),
    );
}

/// The `n` of each record (the test module numbers what it publishes).
fn numbers(records: &[ReceivedRecord]) -> Vec<u64> {
    records
        .iter()
        .map(|r| {
            r.body
                .as_ref()
                .and_then(|b| b["n"].as_u64())
                .expect("record body has n")
        })
        .collect()
}

/// After de-duplication by id: exactly `0..count`, in order, ids growing.
fn assert_complete_in_order(records: &[ReceivedRecord], count: u64, what: &str) {
    let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{what}: ids out of order"
    );
    let n = numbers(records);
    let distinct: BTreeSet<u64> = n.iter().copied().collect();
    assert_eq!(
        n.len() as u64,
        count,
        "{what}: count ({} distinct values; first ids {:?})",
        distinct.len(),
        &ids[..ids.len().min(5)]
    );
    assert!(
        n.iter().copied().eq(0..count),
        "{what}: records missing, repeated or out of order"
    );
}

fn stream(consumer: &HubConsumer, name: &str) -> Vec<ReceivedRecord> {
    dedup(consumer.batches(name))
        .remove(name)
        .unwrap_or_default()
}

#[test]
fn records_survive_a_hub_outage_and_kill_9_and_metrics_reach_the_hub() {
    let Some(mut broker) = Broker::start_persistent(Auth::MutualTls).unwrap() else {
        return;
    };
    let registry = Registry::start();
    let image = test_image(&registry, "testmod-telemetry", "1");
    let device = format!("e2e-tel-{}", std::process::id());
    let consumer = HubConsumer::start(&broker, &format!("outpost/{device}/telemetry/#"));
    let metrics_port = free_port();
    let mut agent = Agent::start(
        &device,
        &format!(
            "{}[bus]\nlisten = \"{}\"\n[telemetry]\ninterval_secs = 1\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n",
            broker.device_hub_section(),
            bus_listen()
        ),
    );

    // Metrics: on the hub topic, and on the Prometheus endpoint.
    let snapshot = wait_for(
        "a metrics batch on the hub",
        Duration::from_secs(30),
        || stream(&consumer, "metrics").pop(),
    );
    let body = snapshot.body.expect("metrics are JSON");
    assert_eq!(body["deviceId"], device.as_str());
    assert!(body["device"]["memoryTotalBytes"].as_u64().unwrap() > 0);
    assert!(body["agent"]["rssBytes"].as_u64().unwrap() > 0);
    let samples = parse_prometheus(&wait_for(
        "the Prometheus endpoint",
        Duration::from_secs(30),
        || scrape(metrics_port),
    ));
    assert!(metric(&samples, "outpost_device_memory_total_bytes", "").unwrap() > 0.0);
    assert!(metric(&samples, "outpost_outbox_records", "").is_some());
    assert_eq!(
        metric(&samples, "outpost_outbox_dropped_total", "reason=\"full\""),
        Some(0.0)
    );

    // 10,000 records published while the hub is down.
    broker.outage_begin();
    let v1 = json!({
        "schemaVersion": "1.0", "id": "telemetry", "version": 1,
        "modules": {
            "sensor": { "image": image, "env": { "TESTMOD_PUBLISH_COUNT": "10000" } }
        },
        "routes": [ { "from": "modules/sensor/outputs/#", "to": "$upstream/readings" } ],
        "registries": registries(&registry)
    });
    let (code, out) = agent.deploy(&v1, 90);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    // Acknowledged by the bus = durable in the outbox.
    wait_module_says(&device, "sensor", "published 10000", 120);
    let samples = parse_prometheus(&wait_for(
        "the outbox to count the queued records",
        Duration::from_secs(30),
        || {
            scrape(metrics_port).filter(|t| {
                metric(&parse_prometheus(t), "outpost_outbox_records", "").unwrap_or(0.0) >= 10000.0
            })
        },
    ));
    assert_eq!(metric(&samples, "outpost_hub_connected", ""), Some(0.0));
    let back = Instant::now();
    broker.outage_end().unwrap();
    let first = wait_for(
        "the first record after the outage",
        Duration::from_secs(30),
        || (!stream(&consumer, "readings").is_empty()).then(|| back.elapsed()),
    );
    let readings = wait_for(
        "all 10,000 records at the hub",
        Duration::from_secs(120),
        || {
            let r = stream(&consumer, "readings");
            (r.len() >= 10000).then_some(r)
        },
    );
    eprintln!(
        "outage: first record {:?} after the broker was back, all 10,000 after {:?}",
        first,
        back.elapsed()
    );
    assert_complete_in_order(&readings, 10000, "after the outage");

    // kill -9 with 5,000 records queued: all arrive after the restart.
    broker.outage_begin();
    let mut v2 = v1.clone();
    v2["version"] = json!(2);
    v2["modules"]["burst"] = json!({ "image": image, "env": {
        "TESTMOD_PUBLISH_COUNT": "5000", "TESTMOD_PUBLISH_TOPIC": "burst" } });
    v2["routes"] = json!([
        { "from": "modules/sensor/outputs/#", "to": "$upstream/readings" },
        { "from": "modules/burst/outputs/burst", "to": "$upstream/burst", "priority": 1 }
    ]);
    let sensor = module_id(&device, "sensor");
    let (code, out) = agent.deploy(&v2, 90);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    wait_module_says(&device, "burst", "published 5000", 120);
    assert_eq!(
        module_id(&device, "sensor"),
        sensor,
        "an unchanged module is not restarted by a route change"
    );
    agent.restart(); // kill -9, then start again
    broker.outage_end().unwrap();
    let burst = wait_for(
        "all 5,000 records after kill -9",
        Duration::from_secs(120),
        || {
            let r = stream(&consumer, "burst");
            (r.len() >= 5000).then_some(r)
        },
    );
    assert_complete_in_order(&burst, 5000, "after kill -9");
    // Nothing from the first phase came back as a new record.
    assert_eq!(stream(&consumer, "readings").len(), 10000);
    // The modules' own figures, from the engine, reach the hub.
    wait_for("module metrics on the hub", Duration::from_secs(30), || {
        stream(&consumer, "metrics").iter().rev().find_map(|r| {
            let b = r.body.as_ref()?;
            let burst = &b["modules"]["burst"];
            (burst["status"] == "running"
                && burst["memoryBytes"].as_u64()? > 0
                && burst["restarts"].as_u64().is_some()
                && b["agent"]["deploymentsTotal"].as_u64().is_some())
            .then_some(())
        })
    });
    // The operator's view: `outpost-ctl telemetry` prints the next snapshot as a line.
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = Vec::new();
    args.extend(broker.cli_flags(dir.path()).unwrap());
    let out = std::process::Command::new(ctl_bin())
        .args(&args)
        .args([
            "telemetry",
            "--device",
            &device,
            "--stream",
            "metrics",
            "--count",
            "1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with(&format!("{device} metrics: ")) && text.contains("modules: burst running"),
        "{text}"
    );
}

#[test]
fn a_full_outbox_drops_the_oldest_and_reports_it() {
    let Some(mut broker) = Broker::start_persistent(Auth::MutualTls).unwrap() else {
        return;
    };
    let registry = Registry::start();
    let image = test_image(&registry, "testmod-limits", "1");
    let device = format!("e2e-lim-{}", std::process::id());
    let consumer = HubConsumer::start(&broker, &format!("outpost/{device}/telemetry/#"));
    let metrics_port = free_port();
    const LIMIT: u64 = 64 * 1024;
    let agent = Agent::start(
        &device,
        &format!(
            "{}[bus]\nlisten = \"{}\"\n[telemetry]\ninterval_secs = 1\noutbox_max_bytes = {LIMIT}\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n",
            broker.device_hub_section(),
            bus_listen()
        ),
    );
    broker.outage_begin();
    let manifest = json!({
        "schemaVersion": "1.0", "id": "limits", "version": 1,
        "modules": { "sensor": { "image": image, "env": { "TESTMOD_PUBLISH_COUNT": "2000" } } },
        "routes": [ { "from": "modules/sensor/outputs/#", "to": "$upstream/readings" } ],
        "registries": registries(&registry)
    });
    let (code, out) = agent.deploy(&manifest, 90);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    wait_module_says(&device, "sensor", "published 2000", 120);
    let samples = wait_for("the drops to be counted", Duration::from_secs(30), || {
        let s = parse_prometheus(&scrape(metrics_port)?);
        (metric(&s, "outpost_outbox_dropped_total", "reason=\"full\"")? > 0.0).then_some(s)
    });
    let dropped = metric(&samples, "outpost_outbox_dropped_total", "reason=\"full\"").unwrap();
    let bytes = metric(&samples, "outpost_outbox_bytes", "").unwrap();
    assert!(
        bytes <= LIMIT as f64,
        "outbox holds {bytes} bytes over {LIMIT}"
    );
    // 2,000 records of ~230 bytes do not fit in 64 KiB: most were dropped.
    assert!(dropped >= 1500.0, "only {dropped} dropped");

    broker.outage_end().unwrap();
    let readings = wait_for(
        "the newest record at the hub",
        Duration::from_secs(60),
        || {
            let r = stream(&consumer, "readings");
            (numbers(&r).last() == Some(&1999)).then_some(r)
        },
    );
    let n = numbers(&readings);
    let kept = n.len() as u64;
    assert!(n[0] > 0, "the oldest records were dropped, not the newest");
    assert!(
        n.iter().copied().eq(2000 - kept..2000),
        "what is left is the newest, contiguous and in order"
    );
    assert!(
        (kept + dropped as u64) >= 2000,
        "every record is either delivered or counted as dropped ({kept} + {dropped})"
    );
    // The hub sees the drops too, in the agent's metrics.
    wait_for("the drop count on the hub", Duration::from_secs(30), || {
        stream(&consumer, "metrics").iter().rev().find_map(|r| {
            let full = r.body.as_ref()?["agent"]["droppedTotal"]["full"].as_f64()?;
            (full >= dropped).then_some(())
        })
    });
}

#[test]
fn modules_are_confined_to_their_topics_and_routes_change_without_restarts() {
    let registry = Registry::start();
    let image = test_image(&registry, "testmod-bus", "1");
    let device = format!("e2e-bus-{}", std::process::id());
    let listen = bus_listen();
    let agent = Agent::start(&device, &format!("[bus]\nlisten = \"{listen}\"\n"));
    let manifest = |version: u64, input: &str| {
        json!({
            "schemaVersion": "1.0", "id": "bus", "version": version,
            "modules": {
                "sink": { "image": image, "startupOrder": 0,
                          "env": { "TESTMOD_SUBSCRIBE": "modules/sink/inputs/#" } },
                "sensor": { "image": image, "startupOrder": 1,
                            "env": { "TESTMOD_PUBLISH_COUNT": "100000", "TESTMOD_PUBLISH_EVERY_MS": "50" } }
            },
            "routes": [ { "from": "modules/sensor/outputs/#", "to": format!("modules/sink/inputs/{input}") } ],
            "registries": registries(&registry)
        })
    };
    let (code, out) = agent.deploy(&manifest(1, "readings"), 90);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    // A route to another module delivers.
    wait_module_says(
        &device,
        "sink",
        "received modules/sink/inputs/readings {\"n\":",
        60,
    );

    // The agent gave each module its own credentials.
    let env = module_env(&device, "sensor");
    assert_eq!(env["OUTPOST_BUS_USER"], "sensor");
    assert_eq!(env["OUTPOST_BUS_URL"], format!("mqtt://{listen}"));
    let password = env["OUTPOST_BUS_PASSWORD"].clone();
    assert_ne!(
        password,
        module_env(&device, "sink")["OUTPOST_BUS_PASSWORD"]
    );
    let (host, port) = listen.rsplit_once(':').unwrap();
    let connect = |user: &str, password: &str| {
        let mut o = rumqttc::MqttOptions::new(format!("probe-{user}"), host, port.parse().unwrap());
        o.set_credentials(user, password);
        o.set_keep_alive(Duration::from_secs(5));
        rumqttc::Client::new(o, 10)
    };
    /// The next event that is not an outgoing packet or a ping.
    #[allow(clippy::result_large_err)] // rumqttc's error type, in a test
    fn next(c: &mut rumqttc::Connection) -> Result<rumqttc::Packet, rumqttc::ConnectionError> {
        loop {
            match c.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(rumqttc::Event::Incoming(p))) if p != rumqttc::Packet::PingResp => {
                    return Ok(p);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => panic!("no answer from the bus within 10 s"),
            }
        }
    }

    // Another module's password does not work.
    let (_c, mut conn) = connect("sink", &password);
    assert!(
        matches!(
            next(&mut conn),
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "a module's password is its own"
    );

    // As `sensor`: subscribing to another module's inputs is refused, its own allowed.
    let (client, mut conn) = connect("sensor", &password);
    assert!(matches!(next(&mut conn), Ok(rumqttc::Packet::ConnAck(_))));
    client
        .subscribe("modules/sink/inputs/#", rumqttc::QoS::AtLeastOnce)
        .unwrap();
    match next(&mut conn) {
        Ok(rumqttc::Packet::SubAck(a)) => assert_eq!(
            a.return_codes,
            [rumqttc::SubscribeReasonCode::Failure],
            "subscription to another module's inputs"
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    client
        .subscribe("modules/sensor/inputs/#", rumqttc::QoS::AtLeastOnce)
        .unwrap();
    assert!(matches!(
        next(&mut conn),
        Ok(rumqttc::Packet::SubAck(a)) if matches!(a.return_codes[..], [rumqttc::SubscribeReasonCode::Success(_)])
    ));
    // Publishing straight into another module's input is refused: the bus closes the
    // connection and the message goes nowhere.
    client
        .publish(
            "modules/sink/inputs/readings",
            rumqttc::QoS::AtLeastOnce,
            false,
            "forged",
        )
        .unwrap();
    assert!(
        next(&mut conn).is_err(),
        "the bus closes a connection that publishes outside its module's outputs"
    );
    drop(client);

    // A module cannot take over another's connection by reusing its client id (the test
    // module's is `{name}-{pid}`, pid 1 in its container).
    let sink_logs = || module_logs(&device, "sink");
    let (errors_before, received_before) = {
        let l = sink_logs();
        (
            l.matches("bus error").count(),
            l.matches("received ").count(),
        )
    };
    let mut o = rumqttc::MqttOptions::new("sink-1", host, port.parse().unwrap());
    o.set_credentials("sensor", &password);
    o.set_keep_alive(Duration::from_secs(5));
    let (_thief, mut thief_conn) = rumqttc::Client::new(o, 10);
    assert!(matches!(
        next(&mut thief_conn),
        Ok(rumqttc::Packet::ConnAck(_))
    ));
    wait_for(
        "the sink to keep receiving",
        Duration::from_secs(20),
        || (sink_logs().matches("received ").count() > received_before + 5).then_some(()),
    );
    assert_eq!(
        sink_logs().matches("bus error").count(),
        errors_before,
        "another module's connection with the same client id did not disconnect the sink"
    );

    // A route change applies with the deployment, without restarting any module.
    let ids = (module_id(&device, "sink"), module_id(&device, "sensor"));
    let (code, out) = agent.deploy(&manifest(2, "changed"), 90);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    wait_module_says(
        &device,
        "sink",
        "received modules/sink/inputs/changed {\"n\":",
        60,
    );
    assert_eq!(
        (module_id(&device, "sink"), module_id(&device, "sensor")),
        ids,
        "no module was restarted"
    );
    assert!(!module_logs(&device, "sink").contains("forged"));
    let refused: BTreeSet<_> = agent
        .log()
        .lines()
        .filter(|l| l.contains("refused"))
        .map(String::from)
        .collect();
    assert!(
        refused
            .iter()
            .any(|l| l.contains("modules/sink/inputs/readings")),
        "the agent logs the refused publish: {refused:?}"
    );
}

#[test]
fn routes_work_on_an_external_device_broker() {
    // The device's own Mosquitto as the local bus (anonymous, loopback), another as the hub.
    let Some(hub) = Broker::start_persistent(Auth::MutualTls).unwrap() else {
        return;
    };
    let Some(bus) = Broker::start_mosquitto(Auth::Plain).unwrap() else {
        return;
    };
    let registry = Registry::start();
    let image = test_image(&registry, "testmod-external", "1");
    let device = format!("e2e-ext-{}", std::process::id());
    let consumer = HubConsumer::start(&hub, &format!("outpost/{device}/telemetry/#"));
    let agent = Agent::start(
        &device,
        &format!(
            "{}[bus]\nexternal_url = \"mqtt://127.0.0.1:{}\"\n",
            hub.device_hub_section(),
            bus.port
        ),
    );
    let manifest = json!({
        "schemaVersion": "1.0", "id": "external", "version": 1,
        "modules": { "sensor": { "image": image }, "sink": { "image": image } },
        "routes": [
            { "from": "modules/sensor/outputs/data", "to": "$upstream/ext" },
            { "from": "modules/sensor/outputs/#", "to": "modules/sink/inputs/copy" }
        ],
        "registries": registries(&registry)
    });
    let (code, out) = agent.deploy(&manifest, 90);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    // Modules are told where the device's broker is (its own rules hold their credentials).
    assert_eq!(
        module_env(&device, "sensor")["OUTPOST_BUS_URL"],
        format!("mqtt://127.0.0.1:{}", bus.port)
    );

    // The test plays the modules on the device's broker.
    let mut o = rumqttc::MqttOptions::new("modules-probe", "127.0.0.1", bus.port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = rumqttc::Client::new(o, 200);
    let copies = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let (copies, client) = (copies.clone(), client.clone());
        std::thread::spawn(move || {
            for event in conn.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client
                            .try_subscribe("modules/sink/inputs/#", rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => copies
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&p.payload).into_owned()),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
    }
    // Once a probe comes back through the route, the agent is subscribed.
    wait_for(
        "the agent to route on the external bus",
        Duration::from_secs(30),
        || {
            let _ = client.try_publish(
                "modules/sensor/outputs/probe",
                rumqttc::QoS::AtLeastOnce,
                false,
                "probe",
            );
            copies
                .lock()
                .unwrap()
                .iter()
                .any(|c| c == "probe")
                .then_some(())
        },
    );
    for n in 0..500u64 {
        client
            .publish(
                "modules/sensor/outputs/data",
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({ "n": n }).to_string(),
            )
            .unwrap();
    }
    let ext = wait_for("500 records at the hub", Duration::from_secs(60), || {
        let r = stream(&consumer, "ext");
        let distinct: BTreeSet<u64> = numbers(&r).into_iter().collect();
        (distinct.len() >= 500).then_some(r)
    });
    // At-least-once here: should the router's connection to the device's broker drop, the
    // broker redelivers what the router had not acknowledged, and it is routed again as new
    // records. (Seen once in about thirty runs; the log then says why.) The first arrival of
    // each record is complete and in order.
    if ext.len() != 500 {
        eprintln!(
            "{} duplicates from a redelivery; agent log:\n{}",
            ext.len() - 500,
            agent.log()
        );
    }
    let mut seen = BTreeSet::new();
    let first: Vec<ReceivedRecord> = ext
        .into_iter()
        .filter(|r| seen.insert(r.body.as_ref().and_then(|b| b["n"].as_u64())))
        .collect();
    assert_complete_in_order(&first, 500, "routed from the external bus");
    wait_for(
        "500 copies at the sink's input",
        Duration::from_secs(30),
        || {
            (copies
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.starts_with("{\"n\""))
                .count()
                >= 500)
                .then_some(())
        },
    );
}
