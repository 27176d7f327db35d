//! Local bus mode: inference requests arriving as MQTT messages.
//!
//! Subscribes to `modules/{name}/inputs/#`; a message on `modules/{name}/inputs/{input}` is an
//! Open Inference Protocol request or `{"data": ...}`; its answer, with the latency, goes to
//! `modules/{name}/outputs/{input}`; anything that cannot be answered goes to
//! `modules/{name}/outputs/errors` with the reason. Owns the MQTT connection: one task polls
//! the event loop and never waits on anything else; it hands messages to a fixed number of
//! workers through a bounded queue, and refuses (with an error message) what does not fit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::{AnyRequest, Engine, Request};
use crate::metrics::Source;
use crate::tensor::InferResponse;

/// Why bus mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus URL '{url}': {reason}")]
    Url { url: String, reason: String },
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
    /// Messages waiting for a worker; beyond it, messages are refused on `outputs/errors`.
    pub queue: usize,
    /// Messages processed at once.
    pub workers: usize,
    /// Largest payload accepted; larger ones are refused with an error message.
    pub max_payload: usize,
}

impl BusConfig {
    /// Parses `mqtt://[user:pass@]host[:port]` (also `tcp://`). Credentials given separately
    /// (the agent's `OUTPOST_BUS_USER` / `OUTPOST_BUS_PASSWORD`) win over the URL's.
    ///
    /// Fails on other schemes: the local bus is plain MQTT on loopback or the bridge network,
    /// and this build carries no TLS stack.
    pub fn from_url(url: &str, module: &str) -> Result<BusConfig, BusError> {
        let bad = |reason: &str| BusError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        match parsed.scheme() {
            "mqtt" | "tcp" => {}
            "mqtts" | "ssl" => {
                return Err(bad("TLS is not supported on the local bus; use mqtt://"));
            }
            _ => return Err(bad("the scheme must be mqtt://")),
        }
        let host = parsed.host_str().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let username = Some(parsed.username())
            .filter(|u| !u.is_empty())
            .map(str::to_string);
        Ok(BusConfig {
            host,
            port: parsed.port().unwrap_or(1883),
            username,
            password: parsed.password().map(str::to_string),
            client_id: format!("outpost-infer-{module}-{}", std::process::id()),
            queue: 64,
            workers: 2,
            max_payload: 16 << 20,
        })
    }
}

/// The answer published for one message.
#[derive(Debug, Serialize)]
struct BusAnswer {
    /// The topic suffix the request came on (`modules/{name}/inputs/{input}`).
    input: String,
    latency_ms: f64,
    #[serde(flatten)]
    body: AnswerBody,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum AnswerBody {
    Infer(InferResponse),
    Score {
        id: Option<String>,
        result: serde_json::Value,
    },
}

/// The message published on `outputs/errors`.
#[derive(Debug, Serialize)]
struct BusFailure<'a> {
    input: &'a str,
    topic: &'a str,
    error: String,
}

struct Message {
    topic: String,
    /// The part after `inputs/`.
    input: String,
    payload: bytes::Bytes,
}

/// Topics of one module.
#[derive(Debug, Clone)]
pub struct Topics {
    pub inputs_filter: String,
    inputs_prefix: String,
    outputs_prefix: String,
}

impl Topics {
    pub fn new(module: &str) -> Topics {
        Topics {
            inputs_filter: format!("modules/{module}/inputs/#"),
            inputs_prefix: format!("modules/{module}/inputs/"),
            outputs_prefix: format!("modules/{module}/outputs/"),
        }
    }

    pub fn output(&self, input: &str) -> String {
        format!("{}{input}", self.outputs_prefix)
    }

    pub fn errors(&self) -> String {
        self.output("errors")
    }

    /// The input name of a topic under the inputs prefix (`None` for anything else).
    fn input_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(&self.inputs_prefix)
            .filter(|s| !s.is_empty())
    }
}

/// Runs bus mode until `shutdown`; reconnects by itself when the broker goes away.
///
/// On shutdown it stops taking messages, lets the workers finish and publish what they hold
/// (up to a few seconds), then disconnects.
pub async fn run(engine: Arc<Engine>, config: BusConfig, shutdown: CancellationToken) {
    let module = engine.slot.name.clone();
    let topics = Topics::new(&module);
    let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    // Above our own limit, so an oversized message reaches us and is refused with a message
    // rather than breaking the connection; results can be large too.
    options.set_max_packet_size(config.max_payload + 64 * 1024, 64 << 20);
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);

    let (tx, rx) = mpsc::channel::<Message>(config.queue.max(1));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = JoinSet::new();
    for _ in 0..config.workers.max(1) {
        let (engine, client, topics, rx) =
            (engine.clone(), client.clone(), topics.clone(), rx.clone());
        let max_payload = config.max_payload;
        workers.spawn(async move {
            loop {
                // The lock is held only while waiting for the next message, never while working.
                let next = rx.lock().await.recv().await;
                let Some(msg) = next else { return };
                handle(&engine, &client, &topics, msg, max_payload).await;
            }
        });
    }

    let mut tx = Some(tx);
    // Set when shutdown starts: the workers get until then to finish.
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(200);
    tracing::info!(host = %config.host, port = config.port, topic = %topics.inputs_filter, "bus mode starting");
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if tx.is_some() => {
                tracing::info!("bus mode stopping: finishing messages in hand");
                tx = None;
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(5));
            }
            _ = workers.join_next(), if tx.is_none() => {
                if workers.is_empty() { break; }
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)),
                if drain_deadline.is_some() => {
                tracing::warn!("bus workers did not finish within 5 s; stopping anyway");
                workers.abort_all();
                break;
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!("connected to the bus");
                    // try_: this task is the one that drains the request channel; it must not
                    // wait on it.
                    if let Err(e) = client.try_subscribe(&topics.inputs_filter, QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "cannot subscribe to the inputs");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(input) = topics.input_of(&p.topic) else { continue };
                    let msg = Message { input: input.to_string(), topic: p.topic.clone(), payload: p.payload };
                    let Some(sender) = &tx else { continue };
                    if let Err(mpsc::error::TrySendError::Full(msg)) = sender.try_send(msg) {
                        engine.metrics.observe(Source::Bus, Duration::ZERO, false);
                        publish_failure(&client, &topics, &msg.input, &msg.topic,
                            "the module is busy (input queue full); message dropped".into(), false);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if tx.is_none() { break; }
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "bus connection lost");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            },
        }
    }
    if client.try_disconnect().is_ok() {
        // Let the event loop send the DISCONNECT; bounded so a dead broker cannot hold us.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    tracing::info!("bus mode stopped");
}

fn publish_failure(
    client: &AsyncClient,
    topics: &Topics,
    input: &str,
    topic: &str,
    error: String,
    wait: bool,
) {
    tracing::debug!(input, error = %error, "bus message refused");
    let body = serde_json::to_vec(&BusFailure {
        input,
        topic,
        error,
    })
    .unwrap_or_default();
    if wait {
        // Called from workers only: they may wait for room in the request channel.
        let client = client.clone();
        let errors = topics.errors();
        tokio::spawn(async move {
            let _ = client.publish(errors, QoS::AtLeastOnce, false, body).await;
        });
    } else if let Err(e) = client.try_publish(topics.errors(), QoS::AtLeastOnce, false, body) {
        tracing::warn!(error = %e, "cannot publish a bus error");
    }
}

async fn handle(
    engine: &Engine,
    client: &AsyncClient,
    topics: &Topics,
    msg: Message,
    max_payload: usize,
) {
    let start = Instant::now();
    let fail = |error: String| {
        engine.metrics.observe(Source::Bus, start.elapsed(), false);
        publish_failure(client, topics, &msg.input, &msg.topic, error, true);
    };
    if msg.input == "errors" || msg.input.starts_with("errors/") {
        // Would answer on the errors topic itself; refuse to keep that topic unambiguous.
        return fail("'errors' is reserved and cannot be an input name".into());
    }
    if msg.payload.len() > max_payload {
        return fail(format!(
            "payload of {} bytes is over the limit of {max_payload} bytes",
            msg.payload.len()
        ));
    }
    let request = match serde_json::from_slice::<AnyRequest>(&msg.payload) {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid JSON request: {e}")),
    };
    let body = match request.classify() {
        Ok(Request::Infer(r)) => engine.infer(r, Source::Bus).await.map(AnswerBody::Infer),
        Ok(Request::Score { id, data }) => engine
            .score(data, Source::Bus)
            .await
            .map(|result| AnswerBody::Score { id, result }),
        Err(e) => {
            engine.metrics.observe(Source::Bus, start.elapsed(), false);
            Err(e)
        }
    };
    match body {
        Ok(body) => {
            let answer = BusAnswer {
                input: msg.input.clone(),
                latency_ms: start.elapsed().as_secs_f64() * 1e3,
                body,
            };
            let payload = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = client
                .publish(topics.output(&msg.input), QoS::AtLeastOnce, false, payload)
                .await
            {
                tracing::warn!(error = %e, "cannot publish a bus result");
            }
        }
        Err(e) => {
            // Counted already by the engine.
            publish_failure(client, topics, &msg.input, &msg.topic, e.to_string(), true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_tls_is_refused() {
        let c = BusConfig::from_url("mqtt://edge:secret@127.0.0.1:1884", "infer").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 1884));
        assert_eq!(c.username.as_deref(), Some("edge"));
        assert_eq!(c.password.as_deref(), Some("secret"));
        assert_eq!(
            BusConfig::from_url("mqtt://broker", "m").unwrap().port,
            1883
        );
        assert!(BusConfig::from_url("mqtts://broker", "m").is_err());
        assert!(BusConfig::from_url("http://broker", "m").is_err());
        assert!(BusConfig::from_url("not a url", "m").is_err());
    }

    #[test]
    fn topics() {
        let t = Topics::new("infer");
        assert_eq!(t.inputs_filter, "modules/infer/inputs/#");
        assert_eq!(t.input_of("modules/infer/inputs/cam/1"), Some("cam/1"));
        assert_eq!(t.input_of("modules/infer/inputs/"), None);
        assert_eq!(t.input_of("modules/other/inputs/x"), None);
        assert_eq!(t.output("cam/1"), "modules/infer/outputs/cam/1");
        assert_eq!(t.errors(), "modules/infer/outputs/errors");
    }
}
