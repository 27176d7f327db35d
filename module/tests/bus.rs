//! Bus mode against a real Mosquitto broker: requests on `modules/{name}/inputs/{input}`,
//! answers with latency on `modules/{name}/outputs/{input}`, malformed messages answered on
//! `modules/{name}/outputs/errors` without stopping the module. Needs `mosquitto` (Debian's
//! package); with CI=true its absence fails the test.

mod common;

use std::time::Duration;

use common::*;
use outpost_module::bus::BusConfig;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// A test client subscribed to the module's outputs; received messages arrive on the channel.
async fn client(
    port: u16,
) -> (
    AsyncClient,
    mpsc::Receiver<(String, Value)>,
    tokio::task::JoinHandle<()>,
) {
    let mut o = MqttOptions::new("outpost-infer-test", "127.0.0.1", port);
    o.set_max_packet_size(32 << 20, 32 << 20);
    let (c, mut el) = AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::channel(64);
    c.subscribe("modules/anomaly/outputs/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send((p.topic.clone(), v)).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(("suback".into(), Value::Null)).await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (c, rx, task)
}

async fn next(rx: &mut mpsc::Receiver<(String, Value)>) -> (String, Value) {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a message within 20 s")
        .expect("channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_mode_answers_and_reports_bad_messages() {
    let Some(broker) = Mosquitto::start().await else {
        return;
    };
    let mut cfg = config(&model_path("mlp"), "anomaly");
    cfg.bus =
        Some(BusConfig::from_url(&format!("mqtt://127.0.0.1:{}", broker.port), "anomaly").unwrap());
    let s = Running::ready(cfg).await;

    let (c, mut rx, task) = client(broker.port).await;
    assert_eq!(next(&mut rx).await.0, "suback");
    let request = serde_json::to_vec(&reference_request("mlp")).unwrap();
    let want = values(&read_npy(&testdata().join("reference/mlp/outputs/0.npy")));

    // The module subscribes once connected: publish until the first answer comes back.
    let answer = loop {
        c.publish(
            "modules/anomaly/inputs/line3/sensor",
            QoS::AtLeastOnce,
            false,
            request.clone(),
        )
        .await
        .unwrap();
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some(m)) => break m,
            Ok(None) => panic!("client closed"),
            Err(_) => continue,
        }
    };
    assert_eq!(
        answer.0, "modules/anomaly/outputs/line3/sensor",
        "{:?}",
        answer.1
    );
    let v = answer.1;
    assert_eq!(v["input"], "line3/sensor");
    assert_eq!(v["model_name"], "anomaly");
    assert_eq!(v["id"], "ref");
    assert!(v["latency_ms"].as_f64().unwrap() > 0.0);
    let got: Vec<f64> = v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_close_values("bus mlp", &got, &want, ATOL, RTOL);
    // Answers to the other copies of the retried request are skipped by `next`.

    // Malformed messages: an error each on outputs/errors, nothing else.
    for (payload, needle) in [
        (b"not json".to_vec(), "invalid JSON request"),
        (br#"{"hello": 1}"#.to_vec(), "expected 'inputs'"),
        (
            serde_json::to_vec(
                &json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}),
            )
            .unwrap(),
            "unknown input 'x'",
        ),
        (
            serde_json::to_vec(&json!({"data": [[1, 2, 3]]})).unwrap(),
            "shape [1, 3] but the model expects [N, 16]",
        ),
    ] {
        c.publish(
            "modules/anomaly/inputs/cam",
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
        let (topic, v) = next(&mut rx).await;
        assert_eq!(topic, "modules/anomaly/outputs/errors", "{v}");
        assert_eq!(v["input"], "cam");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(needle), "'{e}' should contain '{needle}'");
    }

    // Still answering, and the {"data": ...} form works too.
    let row: Vec<f64> = values(&read_npy(
        &testdata().join("reference/mlp/inputs/sensor.npy"),
    ))[..16]
        .to_vec();
    let body = serde_json::to_vec(&json!({"id": "r2", "data": [row]})).unwrap();
    c.publish("modules/anomaly/inputs/one", QoS::AtLeastOnce, false, body)
        .await
        .unwrap();
    let (topic, v) = next(&mut rx).await;
    assert_eq!(topic, "modules/anomaly/outputs/one", "{v}");
    assert_eq!(v["id"], "r2");
    let got = v["result"][0][0].as_f64().unwrap();
    assert_close_values("bus score", &[got], &want[..1], ATOL, RTOL);

    let (_, m) = http(s.addr, "GET", "/metrics", None).await;
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("outpost_infer_errors_total{model=\"anomaly\",source=\"bus\"} 4"),
        "{m}"
    );

    s.stop().await;
    task.abort();
    drop(broker);
}
