//! The connection: options (TLS, credentials, last will) and the one task that owns rumqttc's
//! event loop.
//!
//! The event loop task never waits on anyone: incoming deployments go into the
//! [`deployments::Inbox`](super::deployments::Inbox) (latest message per source wins, which is what a retained
//! topic means), commands into a bounded queue that drops with a warning when full. Everything
//! that must happen after a (re)connect — subscribing, presence, state — is done by other tasks
//! that watch the session number this task bumps on every CONNACK.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::commands::Command;
use super::deployments::Inbox;
use super::topics::{Incoming, Topics};
use super::{HubError, tls};
use crate::config::HubConfig;

pub use outpost_core::backoff::Backoff;
pub use outpost_mqtt::{MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET, Password, Settings, client};

/// The device's connection settings; reads the password file now so a bad one fails at
/// start-up.
pub fn settings(hub: &HubConfig, device_id: &str) -> Result<Settings, HubError> {
    let credentials = match &hub.credentials {
        Some((user, file)) => Some((user.clone(), Password::read(file)?)),
        None => None,
    };
    Ok(Settings {
        client_id: device_id.to_string(),
        host: hub.host.clone(),
        port: hub.port,
        failover: hub.failover.clone(),
        tls: hub.tls.then(|| tls::TlsFiles {
            ca_file: hub.ca_file.clone(),
            client_auth: hub.client_auth.clone(),
            ca_setting: "hub.ca_file",
        }),
        credentials,
        keep_alive: hub.keep_alive,
        reconnect_min: Duration::from_millis(250),
        reconnect_max: hub.reconnect_max,
    })
}

/// Where the event loop task puts what arrives.
pub struct Routes {
    pub topics: Topics,
    /// The configured groups: messages for any other group (a broker should not send them)
    /// are dropped, so the inbox holds at most one slot per subscription.
    pub groups: Vec<String>,
    pub inbox: Inbox,
    pub commands: mpsc::Sender<Command>,
    /// 0 while disconnected, else a number that grows with every new connection.
    pub session: watch::Sender<u64>,
}

impl Routes {
    fn route(&self, topic: &str, payload: &[u8]) {
        match self.topics.classify(topic) {
            Some(Incoming::Deployment(crate::state::Source::Group { name }))
                if !self.groups.contains(&name) =>
            {
                tracing::debug!(
                    topic,
                    "deployment of a group this device does not follow ignored"
                );
            }
            Some(Incoming::Deployment(source)) => {
                tracing::debug!(topic, bytes = payload.len(), "deployment message");
                self.inbox.put(source, payload.to_vec());
            }
            Some(Incoming::Command(name)) => {
                if self
                    .commands
                    .try_send(Command {
                        name: name.clone(),
                        payload: payload.to_vec(),
                    })
                    .is_err()
                {
                    tracing::warn!(command = %name, "command queue full; command dropped");
                }
            }
            None => tracing::debug!(topic, "message on an unexpected topic ignored"),
        }
    }
}

/// Owns the event loop until `stop` is cancelled: polls it, routes messages, reconnects with
/// backoff, and on the way out publishes the offline presence and disconnects cleanly.
///
/// Fails only when the first connection since start fails for a configuration reason
/// ([`HubError::is_configuration`]); everything else is retried.
pub async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    routes: Routes,
    settings: &Settings,
    stop: CancellationToken,
) -> Result<(), HubError> {
    let mut backoff = Backoff::new(settings.reconnect_min, settings.reconnect_max);
    let mut ever_connected = false;
    let mut generation = 0u64;
    // The endpoint tried now; it moves through `failover` on failures.
    let mut current = settings.clone();
    // Configuration errors in a row since start: the link gives up only when every endpoint
    // answered with one (a clustered hub's node may be misconfigured on its own).
    let mut refusals = 0usize;
    // Whether this connection got its CONNACK (a failure before it may be a silent refusal).
    let mut acknowledged = false;
    loop {
        // Cancel safety: `poll` may be dropped mid-way only here, on shutdown; rumqttc keeps
        // unsent requests in its state, and the connection is abandoned right after anyway.
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                ever_connected = true;
                acknowledged = true;
                backoff.reset();
                generation += 1;
                routes.session.send_replace(generation);
                tracing::info!(host = %current.host, port = current.port, session = generation, "connected to the hub");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => routes.route(&p.topic, &p.payload),
            Ok(_) => {}
            Err(e) => {
                routes.session.send_replace(0);
                let err = current.explain(&e);
                if !std::mem::take(&mut acknowledged)
                    && let Some(hint) = current.hint_closed_before_connack(&err)
                {
                    tracing::warn!(host = %current.host, port = current.port, "{hint}");
                }
                if !ever_connected && err.is_configuration() {
                    refusals += 1;
                    if refusals > current.failover.len() {
                        tracing::error!(error = %err, "cannot connect to the hub");
                        return Err(err);
                    }
                } else {
                    refusals = 0;
                }
                let delay = backoff.next_delay();
                let next = if current.failover.is_empty() {
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "hub connection failed");
                    current.clone()
                } else {
                    let next = current.next_endpoint();
                    tracing::warn!(error = %err, next_host = %next.host, next_port = next.port, retry_in_ms = delay.as_millis() as u64, "hub connection failed; trying the next endpoint");
                    next
                };
                // The options (and the TLS files) are read again for every new connection: a
                // renewed device certificate is used from the next connection on.
                match outpost_mqtt::options(&next, Some(super::report::last_will(&routes.topics))) {
                    Ok(options) => {
                        eventloop.mqtt_options = options;
                        current = next;
                    }
                    // The files were good at start: keep what was read then and retry.
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the connection's files again; retrying with the previous ones")
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    if *routes.session.borrow() != 0 {
        // Say goodbye: the broker keeps the will for unclean ends only.
        let _ = client.try_publish(
            routes.topics.presence(),
            QoS::AtLeastOnce,
            true,
            super::report::presence(false, &[]),
        );
        let _ = client.try_disconnect();
        let flushed = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if flushed.is_err() {
            tracing::debug!("disconnect was not flushed in time");
        }
    }
    routes.session.send_replace(0);
    Ok(())
}

/// After every connect: subscribe to the device's deployment, its groups' deployments and its
/// commands, and announce presence. A task of its own so the event loop never waits for it.
pub async fn subscriber(
    client: AsyncClient,
    topics: Topics,
    groups: Vec<String>,
    mut session: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = session.changed() => if changed.is_err() { return },
        }
        if *session.borrow_and_update() == 0 {
            continue;
        }
        let mut filters = vec![
            rumqttc::SubscribeFilter::new(topics.deployment(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(topics.commands_filter(), QoS::AtLeastOnce),
        ];
        filters.extend(
            groups.iter().map(|g| {
                rumqttc::SubscribeFilter::new(topics.group_deployment(g), QoS::AtLeastOnce)
            }),
        );
        let presence = super::report::presence(true, &groups);
        let done = tokio::select! {
            _ = stop.cancelled() => return,
            r = async {
                client.subscribe_many(filters).await?;
                client.publish(topics.presence(), QoS::AtLeastOnce, true, presence).await
            } => r,
        };
        match done {
            Ok(()) => tracing::debug!(groups = groups.len(), "subscribed"),
            Err(e) => tracing::warn!(error = %e, "could not queue the subscriptions"),
        }
    }
}
