//! The connection: options (TLS, credentials, last will) and the one task that owns rumqttc's
//! event loop.
//!
//! The event loop task never waits on anyone: incoming deployments go into the
//! [`deployments::Inbox`](super::deployments::Inbox) (latest message per source wins, which is what a retained
//! topic means), commands into a bounded queue that drops with a warning when full. Everything
//! that must happen after a (re)connect — subscribing, presence, state — is done by other tasks
//! that watch the session number this task bumps on every CONNACK.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::commands::Command;
use super::deployments::Inbox;
use super::topics::{Incoming, Topics};
use super::{HubError, tls};
use crate::config::HubConfig;

/// Largest MQTT packet accepted from the broker. Deployments are checked against the (smaller)
/// intake limit and refused with a reason; this bound only keeps a hostile broker from making
/// the client buffer arbitrary amounts. A retained message above it makes the connection fail
/// on every attempt: brokers should set `max_packet_size` (Mosquitto) below it.
pub const MAX_INCOMING_PACKET: usize = 4 * 1024 * 1024;
/// Largest packet the device sends (reported state with many modules and long reasons).
pub const MAX_OUTGOING_PACKET: usize = 1024 * 1024;
/// How long one TCP + TLS + MQTT connection attempt may take.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// rumqttc's request queue between clients and the event loop.
const REQUEST_CAPACITY: usize = 64;

/// A password read from its file: kept out of `Debug` and logs.
#[derive(Clone)]
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Password {
    /// The password itself, for the MQTT CONNECT only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads the password file; one trailing newline is not part of the password.
    ///
    /// Fails when the file cannot be read or is empty.
    pub fn read(path: &std::path::Path) -> Result<Password, HubError> {
        let text = std::fs::read_to_string(path).map_err(|source| HubError::ReadFile {
            what: "password file",
            path: path.to_path_buf(),
            source,
        })?;
        let password = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        if password.is_empty() {
            return Err(HubError::EmptyPassword {
                path: path.to_path_buf(),
            });
        }
        Ok(Password(password.to_string()))
    }
}

/// Everything needed to connect, for the device and the operator alike.
#[derive(Debug, Clone)]
pub struct Settings {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    /// `None` is plaintext MQTT (allowed by the configuration's rules only).
    pub tls: Option<tls::TlsFiles>,
    pub credentials: Option<(String, Password)>,
    pub keep_alive: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Settings {
    /// The device's settings; reads the password file now so a bad one fails at start-up.
    pub fn from_hub_config(hub: &HubConfig, device_id: &str) -> Result<Settings, HubError> {
        let credentials = match &hub.credentials {
            Some((user, file)) => Some((user.clone(), Password::read(file)?)),
            None => None,
        };
        Ok(Settings {
            client_id: device_id.to_string(),
            host: hub.host.clone(),
            port: hub.port,
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

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// What went wrong with a connection attempt, in words an operator can act on.
    pub fn explain(&self, err: &ConnectionError) -> HubError {
        if let (Some(files), Some(tls_err)) = (&self.tls, tls::rustls_error(err)) {
            return tls::explain(tls_err, files, &self.host);
        }
        match err {
            ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
                HubError::Refused(
                    "bad user name or password (check hub.username and hub.password_file)".into(),
                )
            }
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => {
                HubError::Refused(
                    // Mosquitto answers a wrong password with this code too.
                    "not authorized: wrong user name or password (hub.username, hub.password_file), or the broker's rules refuse this client".into(),
                )
            }
            ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId) => {
                HubError::Refused(format!(
                    "client id `{}` not accepted by the broker",
                    self.client_id
                ))
            }
            // Busy or shutting down, or speaking another protocol version: worth retrying.
            ConnectionError::ConnectionRefused(other) => HubError::Connect {
                addr: self.addr(),
                detail: format!("the broker refused the connection: {other:?}"),
            },
            ConnectionError::NetworkTimeout => HubError::Connect {
                addr: self.addr(),
                detail: "connection timed out".into(),
            },
            ConnectionError::Tls(e) => HubError::Tls(e.to_string()),
            other => HubError::Connect {
                addr: self.addr(),
                detail: other.to_string(),
            },
        }
    }
}

/// Creates the rumqttc client and event loop (nothing is connected until the loop is polled).
///
/// Fails when the TLS files cannot be used.
pub fn client(
    settings: &Settings,
    last_will: Option<LastWill>,
) -> Result<(AsyncClient, EventLoop), HubError> {
    let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    options
        .set_keep_alive(settings.keep_alive)
        // Subscriptions are made again after every connect, and the retained topics are the
        // source of truth, so nothing depends on the broker keeping a session.
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    if let Some(files) = &settings.tls {
        let config = tls::client_config(files)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    if let Some((user, password)) = &settings.credentials {
        options.set_credentials(user, &password.0);
    }
    if let Some(will) = last_will {
        options.set_last_will(will);
    }
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let mut network = rumqttc::NetworkOptions::new();
    // Small messages both ways: without this, Nagle's algorithm and delayed ACKs add ~40 ms
    // to a deployment's round trip (measured).
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

/// Capped exponential backoff with jitter: each delay is drawn from `[d/2, d]` where `d`
/// doubles from `min` up to `max`, so a fleet that lost its broker does not come back in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay; `random` supplies the jitter (any `u64`).
    pub fn next_with(&mut self, random: u64) -> Duration {
        let factor = 1u32 << self.attempt.min(16);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        let half = ceiling / 2;
        let span = (ceiling - half).as_millis() as u64;
        half + Duration::from_millis(if span == 0 { 0 } else { random % (span + 1) })
    }

    pub fn next_delay(&mut self) -> Duration {
        // Without randomness the delay is the ceiling: still capped, merely not jittered.
        self.next_with(getrandom::u64().unwrap_or(u64::MAX))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
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
                backoff.reset();
                generation += 1;
                routes.session.send_replace(generation);
                tracing::info!(host = %settings.host, port = settings.port, session = generation, "connected to the hub");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => routes.route(&p.topic, &p.payload),
            Ok(_) => {}
            Err(e) => {
                routes.session.send_replace(0);
                let err = settings.explain(&e);
                if !ever_connected && err.is_configuration() {
                    tracing::error!(error = %err, "cannot connect to the hub");
                    return Err(err);
                }
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "hub connection failed");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<_> = (0..6).map(|_| b.next_with(u64::MAX)).collect();
        // u64::MAX % (span + 1) is not always span; check the bounds instead of exact values.
        let expected = [100, 200, 400, 800, 1000, 1000];
        for (got, ceiling) in ceilings.iter().zip(expected) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *got <= ceiling && *got >= ceiling / 2,
                "{got:?} vs {ceiling:?}"
            );
        }
        b.reset();
        assert!(b.next_with(0) <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut low = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let mut high = low.clone();
        assert_eq!(low.next_with(0), Duration::from_millis(500));
        assert_eq!(high.next_with(500), Duration::from_secs(1));
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let password = Password::read(&file).unwrap();
        assert_eq!(password.0, "s3cret");
        assert!(!format!("{password:?}").contains("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            Password::read(&file),
            Err(HubError::EmptyPassword { .. })
        ));
    }
}
