//! One provisioning request and its response over MQTT, on a connection of its own that lives
//! only for the exchange: subscribe to the response topic, publish the request once the
//! subscription is acknowledged (so the answer cannot arrive before it), wait for the response
//! that carries the request's id.

use std::time::Duration;

use outpost_core::wire::provisioning::{Kind, Request, Response, request_topic, response_topic};
use outpost_mqtt::{HubError, Settings};
use rumqttc::{Event, Packet, QoS};

/// How long a responder may take to answer a request once it is published.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("no answer from the provisioning responder in {} s (is it running, and on prefix `{prefix}`?)", .waited.as_secs())]
    NoAnswer { waited: Duration, prefix: String },
    #[error("the request could not be sent: {0}")]
    Send(String),
}

impl ExchangeError {
    /// Whether retrying cannot help until someone changes something (a certificate the broker
    /// refuses, an untrusted broker): logged as an error, retried slowly.
    pub fn is_configuration(&self) -> bool {
        matches!(self, ExchangeError::Hub(e) if e.is_configuration())
    }
}

/// Sends `request` as `who` (the claim client id, or the device id for a renewal) and returns
/// the responder's answer.
pub async fn exchange(
    settings: &Settings,
    prefix: &str,
    kind: Kind,
    who: &str,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ExchangeError> {
    let (client, mut eventloop) = outpost_mqtt::client(settings, None)?;
    let response_topic = response_topic(prefix, kind, who);
    let payload = serde_json::to_vec(request).map_err(|e| ExchangeError::Send(e.to_string()))?;
    let mut published = false;
    let waited = tokio::time::timeout(timeout, async {
        loop {
            let event = eventloop.poll().await.map_err(|e| settings.explain(&e))?;
            match event {
                Event::Incoming(Packet::ConnAck(_)) => client
                    .subscribe(response_topic.clone(), QoS::AtLeastOnce)
                    .await
                    .map_err(|e| ExchangeError::Send(e.to_string()))?,
                Event::Incoming(Packet::SubAck(_)) if !published => {
                    published = true;
                    client
                        .publish(
                            request_topic(prefix, kind, who),
                            QoS::AtLeastOnce,
                            false,
                            payload.clone(),
                        )
                        .await
                        .map_err(|e| ExchangeError::Send(e.to_string()))?;
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == response_topic => {
                    match serde_json::from_slice::<Response>(&p.payload) {
                        Ok(r) if r.request_id() == request.request_id => return Ok(r),
                        Ok(r) => tracing::debug!(request_id = r.request_id(), "an answer to an earlier request ignored"),
                        Err(e) => tracing::warn!(error = %e, "an unreadable provisioning response ignored"),
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    // Best effort: the connection is dropped right after anyway.
    let _ = client.try_disconnect();
    match waited {
        Ok(result) => result,
        Err(_) => Err(ExchangeError::NoAnswer {
            waited: timeout,
            prefix: prefix.to_string(),
        }),
    }
}

/// A request id: random, so answers to an earlier attempt are told apart.
pub fn request_id() -> String {
    let mut bytes = [0u8; 8];
    // getrandom fails only without any entropy source; a constant id still works, it only
    // loses the distinction between attempts.
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
