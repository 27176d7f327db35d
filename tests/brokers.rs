//! What Outpost leans on in its hub broker, probed on the broker of the matrix
//! (`OUTPOST_TEST_BROKER`, default Mosquitto; `scripts/test-brokers` runs them all): retained
//! messages and their withdrawal, last wills, QoS 1 messages kept for a persistent session,
//! client-id takeover, and messages as large as the agent sends. These are the broker's
//! behaviours as plain MQTT clients see them; `tests/hub.rs` and `tests/telemetry.rs` run
//! Outpost itself on the same brokers. The table in `docs/hub.md` is what these found.

use std::time::Duration;

use outpost_e2e::{Acl, Auth, Broker, Relay, init};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

macro_rules! broker {
    () => {
        match Broker::start(Auth::Tls).unwrap() {
            Some(b) => b,
            None => return,
        }
    };
}

/// A plain client: its event loop runs in a task, what arrives goes to `events`.
struct Client {
    client: AsyncClient,
    events: mpsc::Receiver<Result<Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a connection attempt ended with.
#[derive(Debug)]
enum Next {
    Message(rumqttc::Publish),
    ConnAck(rumqttc::ConnAck),
    SubAck(rumqttc::SubAck),
    PubAck,
    Error(String),
}

impl Client {
    fn connect(options: MqttOptions) -> Client {
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let (tx, events) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event.map_err(|e| e.to_string())).await.is_err() || failed {
                    // One connection per client: a failure ends it (tests reconnect anew).
                    return;
                }
            }
        });
        Client {
            client,
            events,
            task,
        }
    }

    /// The next event a test cares about, within `within`.
    async fn next(&mut self, within: Duration) -> Option<Next> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .ok()??;
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => return Some(Next::Message(p)),
                Ok(Event::Incoming(Packet::ConnAck(a))) => return Some(Next::ConnAck(a)),
                Ok(Event::Incoming(Packet::SubAck(a))) => return Some(Next::SubAck(a)),
                Ok(Event::Incoming(Packet::PubAck(_))) => return Some(Next::PubAck),
                Ok(_) => {}
                Err(e) => return Some(Next::Error(e)),
            }
        }
    }

    async fn connected(&mut self) -> rumqttc::ConnAck {
        match self.next(WAIT).await {
            Some(Next::ConnAck(a)) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Subscribes and waits for the SUBACK, keeping any message that arrives first.
    async fn subscribe(&mut self, topic: &str) -> Vec<rumqttc::Publish> {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut early = Vec::new();
        loop {
            match self.next(WAIT).await {
                Some(Next::SubAck(ack)) => {
                    assert!(
                        ack.return_codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                        "subscription to {topic} refused: {ack:?}"
                    );
                    return early;
                }
                Some(Next::Message(p)) => early.push(p),
                Some(Next::PubAck) => {}
                other => panic!("expected SUBACK for {topic}, got {other:?}"),
            }
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK.
    async fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
        loop {
            match self.next(WAIT).await {
                Some(Next::PubAck) => return,
                Some(Next::Message(_)) => {}
                other => panic!("expected PUBACK on {topic}, got {other:?}"),
            }
        }
    }

    /// The next message on `topic`.
    async fn message(&mut self, topic: &str) -> rumqttc::Publish {
        loop {
            match self.next(WAIT).await {
                Some(Next::Message(p)) if p.topic == topic => return p,
                Some(Next::Message(_) | Next::PubAck | Next::SubAck(_)) => {}
                other => panic!("expected a message on {topic}, got {other:?}"),
            }
        }
    }
}

fn options(broker: &Broker, id: &str) -> MqttOptions {
    let mut o = broker.mqtt_options(id);
    o.set_max_packet_size(8 << 20, 8 << 20);
    o
}

async fn client(broker: &Broker, id: &str) -> Client {
    let mut c = Client::connect(options(broker, id));
    c.connected().await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_kept_and_an_empty_one_withdraws_them() {
    init();
    let broker = broker!();
    let mut operator = client(&broker, "operator").await;
    operator
        .publish("outpost/d1/deployment", true, b"v1".to_vec())
        .await;
    operator
        .publish("outpost/d1/deployment", true, b"v2".to_vec())
        .await;

    // A device that subscribes later gets the newest, flagged as retained.
    let mut device = client(&broker, "d1").await;
    let early = device.subscribe("outpost/d1/deployment").await;
    let got = match early.into_iter().next() {
        Some(p) => p,
        None => device.message("outpost/d1/deployment").await,
    };
    assert_eq!(&got.payload[..], b"v2");
    assert!(
        got.retain,
        "a retained message is delivered with the retain flag"
    );

    // An empty retained message withdraws it: a later subscriber gets nothing on that topic
    // before the marker it subscribes to afterwards.
    operator
        .publish("outpost/d1/deployment", true, Vec::new())
        .await;
    operator
        .publish("outpost/d1/marker", true, b"m".to_vec())
        .await;
    let mut late = client(&broker, "d1-late").await;
    let mut seen = late.subscribe("outpost/d1/deployment").await;
    seen.extend(late.subscribe("outpost/d1/marker").await);
    let mut marker = false;
    while !marker {
        let p = if seen.is_empty() {
            match late.next(WAIT).await {
                Some(Next::Message(p)) => p,
                other => panic!("expected the marker, got {other:?}"),
            }
        } else {
            seen.remove(0)
        };
        assert_ne!(
            p.topic, "outpost/d1/deployment",
            "the empty retained message should have withdrawn the deployment, got {:?}",
            p.payload
        );
        marker = p.topic == "outpost/d1/marker";
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_leaves_its_last_will() {
    init();
    let broker = broker!();
    let relay = Relay::start(broker.port).unwrap();
    let mut observer = client(&broker, "observer").await;
    observer.subscribe("outpost/d2/presence").await;

    // The device connects through the relay, with the will the agent sets.
    let mut o = broker.mqtt_options_via("d2", relay.port);
    o.set_last_will(LastWill::new(
        "outpost/d2/presence",
        r#"{"online":false}"#,
        QoS::AtLeastOnce,
        true,
    ));
    let mut device = Client::connect(o);
    device.connected().await;
    device
        .publish("outpost/d2/presence", true, br#"{"online":true}"#.to_vec())
        .await;
    assert_eq!(
        &observer.message("outpost/d2/presence").await.payload[..],
        br#"{"online":true}"#
    );

    // Power cut: the connection ends without a DISCONNECT.
    relay.cut();
    let will = observer.message("outpost/d2/presence").await;
    assert_eq!(&will.payload[..], br#"{"online":false}"#);
    // And it is retained: an operator who looks later sees the device offline.
    let mut later = client(&broker, "operator-later").await;
    let early = later.subscribe("outpost/d2/presence").await;
    let got = match early.into_iter().next() {
        Some(p) => p,
        None => later.message("outpost/d2/presence").await,
    };
    assert_eq!(&got.payload[..], br#"{"online":false}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_wait_for_a_persistent_session() {
    init();
    let broker = broker!();
    let mut o = options(&broker, "hub-consumer");
    o.set_clean_session(false);
    let mut consumer = Client::connect(o.clone());
    consumer.connected().await;
    consumer.subscribe("outpost/d3/telemetry/#").await;
    consumer.client.disconnect().await.unwrap();
    // The disconnect ends the event loop with an error or a clean close; either way it is gone.
    while consumer.next(Duration::from_secs(5)).await.is_some() {}
    drop(consumer);

    let mut device = client(&broker, "d3-telemetry").await;
    for i in 0..50u32 {
        device
            .publish(
                "outpost/d3/telemetry/readings",
                false,
                i.to_string().into_bytes(),
            )
            .await;
    }

    let mut consumer = Client::connect(o);
    let ack = consumer.connected().await;
    assert!(ack.session_present, "the broker kept the session");
    let mut got = Vec::new();
    while got.len() < 50 {
        let p = consumer.message("outpost/d3/telemetry/readings").await;
        got.push(String::from_utf8_lossy(&p.payload).parse::<u32>().unwrap());
    }
    assert_eq!(got, (0..50).collect::<Vec<_>>(), "all 50, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    init();
    let broker = broker!();
    // The agent restarted after a crash reconnects with its id while the broker may still
    // hold the old connection: the new one must win.
    let mut old = client(&broker, "d4").await;
    let mut new = client(&broker, "d4").await;
    match old.next(WAIT).await {
        Some(Next::Error(e)) => eprintln!("the old connection ended: {e}"),
        None => {}
        other => panic!("the old connection should have been closed, got {other:?}"),
    }
    new.subscribe("outpost/d4/deployment").await;
    let mut operator = client(&broker, "operator").await;
    operator
        .publish("outpost/d4/deployment", true, b"v1".to_vec())
        .await;
    assert_eq!(
        &new.message("outpost/d4/deployment").await.payload[..],
        b"v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_as_large_as_the_agent_sends_is_carried() {
    init();
    let broker = broker!();
    let mut consumer = client(&broker, "consumer").await;
    consumer.subscribe("outpost/d5/telemetry/readings").await;
    let mut device = client(&broker, "d5-telemetry").await;
    // The agent's packets are at most MAX_OUTGOING_PACKET (telemetry batches are sized to it).
    let size = outpost_agent::hub::link::MAX_OUTGOING_PACKET - 1024;
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    device
        .publish("outpost/d5/telemetry/readings", false, payload.clone())
        .await;
    let got = consumer.message("outpost/d5/telemetry/readings").await;
    assert_eq!(got.payload.len(), size);
    assert!(got.payload[..] == payload[..], "the payload arrived intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_acl_refuses_is_not_delivered() {
    init();
    // A device may publish under its own topics only (docs/hub.md, "Topics").
    let Some(broker) = Broker::start_acl(Acl {
        username: "d6".into(),
        password: "d6-secret".into(),
        publish: vec!["outpost/d6/#".into()],
    })
    .unwrap() else {
        return;
    };
    let mut observer = client(&broker, "observer").await;
    observer.subscribe("outpost/d7/state").await;
    observer.subscribe("outpost/d6/state").await;
    let mut device = client(&broker, "d6").await;

    // Refused: another device's topic. How the refusal looks differs by broker (MQTT 3.1.1
    // has no way to say it): an acknowledgement and nothing more, or a closed connection.
    device
        .client
        .publish(
            "outpost/d7/state",
            QoS::AtLeastOnce,
            false,
            b"forged".to_vec(),
        )
        .await
        .unwrap();
    let refusal = match device.next(WAIT).await {
        Some(Next::PubAck) => "acknowledged and dropped",
        Some(Next::Error(_)) | None => "connection closed",
        other => panic!("unexpected answer to a refused publish: {other:?}"),
    };
    eprintln!(
        "BEHAVIOUR on {}: a publish the ACL refuses is {refusal}",
        broker.kind.name()
    );
    let mut device = if refusal == "connection closed" {
        client(&broker, "d6").await
    } else {
        device
    };
    // Allowed: its own; the observer sees it, and nothing of the forged one before it.
    device
        .publish("outpost/d6/state", false, b"mine".to_vec())
        .await;
    loop {
        match observer.next(WAIT).await {
            Some(Next::Message(p)) if p.topic == "outpost/d7/state" => {
                panic!("the refused publish was delivered: {:?}", p.payload)
            }
            Some(Next::Message(p)) if p.topic == "outpost/d6/state" => {
                assert_eq!(&p.payload[..], b"mine");
                break;
            }
            Some(Next::Message(_) | Next::PubAck | Next::SubAck(_)) => {}
            other => panic!("expected the allowed message, got {other:?}"),
        }
    }
}
