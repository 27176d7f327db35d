//! The MQTT connection to the hub, shared by the device's hub link and the operator's tools:
//! TLS from PEM files (rustls with ring), credentials, client options, and connection
//! failures explained in words an operator can act on. What flows over the connection is the
//! core's [`outpost_core::wire`]; what the device and the operator do with it is theirs.

pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, EventLoop, LastWill, MqttOptions,
    TlsConfiguration, Transport,
};

pub use tls::install_crypto_provider;

/// Why the hub link (or an operator's connection) failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the device configuration has no [hub] section")]
    NotConfigured,
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{path} holds no private key (PEM: PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("no system root certificates found; set hub.ca_file (or --ca)")]
    NoSystemRoots,
    #[error("the password file {path} is empty")]
    EmptyPassword { path: PathBuf },
    #[error("TLS set-up failed: {0}")]
    TlsSetup(String),
    #[error("server certificate is not signed by {trust} ({detail})")]
    UntrustedServer { trust: String, detail: String },
    #[error(
        "server certificate is not valid for host `{host}` ({detail}); the URL's host must be in its subject alternative names"
    )]
    ServerName { host: String, detail: String },
    #[error("server certificate is expired or not yet valid ({detail}); check the clocks")]
    ServerCertificateTime { detail: String },
    #[error("broker refused the client certificate ({detail}){}", if *.had_certificate { "" } else { "; it requires one: set hub.cert_file and hub.key_file (or --cert and --key)" })]
    ClientCertificateRefused {
        detail: String,
        had_certificate: bool,
    },
    #[error("TLS error: {0}")]
    Tls(String),
    #[error("broker refused the connection: {0}")]
    Refused(String),
    #[error("cannot reach the broker at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("timed out after {0:?} waiting for the broker")]
    Timeout(Duration),
    #[error("the MQTT client stopped: {0}")]
    Client(String),
}

impl HubError {
    /// Errors that retrying cannot fix without someone changing a file or the broker:
    /// the device gives up on them at start-up (a misconfiguration should be seen, not
    /// retried silently), but keeps retrying them once it was connected (certificates get
    /// rotated on brokers).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            HubError::NotConfigured
                | HubError::ReadFile { .. }
                | HubError::NoCertificate { .. }
                | HubError::NoKey { .. }
                | HubError::NoSystemRoots
                | HubError::EmptyPassword { .. }
                | HubError::TlsSetup(_)
                | HubError::UntrustedServer { .. }
                | HubError::ServerName { .. }
                | HubError::ClientCertificateRefused { .. }
                | HubError::Refused(_)
        )
    }
}

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
    /// The endpoint connected to (or tried) now.
    pub host: String,
    pub port: u16,
    /// The other endpoints of a clustered hub, in the order they are tried when the current
    /// one fails (see [`Settings::next_endpoint`]).
    pub failover: Vec<(String, u16)>,
    /// `None` is plaintext MQTT (allowed by the configuration's rules only).
    pub tls: Option<tls::TlsFiles>,
    pub credentials: Option<(String, Password)>,
    pub keep_alive: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Settings {
    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The same settings aimed at the next endpoint, the current one going to the back of
    /// the list: a link whose connection failed tries each node of a clustered hub in turn
    /// (as MQTT clients' server-URI lists do) and stays on the one that answers.
    pub fn next_endpoint(&self) -> Settings {
        let mut next = self.clone();
        if !next.failover.is_empty() {
            let (host, port) = next.failover.remove(0);
            let current = (std::mem::replace(&mut next.host, host), next.port);
            next.port = port;
            next.failover.push(current);
        }
        next
    }

    /// A hint for a connection the broker closed before it answered CONNECT (no CONNACK):
    /// some brokers (amqtt) refuse a client certificate by closing the connection without a
    /// TLS alert, which looks like a network failure and is retried.
    pub fn hint_closed_before_connack(&self, err: &HubError) -> Option<&'static str> {
        let with_certificate = self.tls.as_ref().is_some_and(|t| t.client_auth.is_some());
        let closed = match err {
            HubError::Connect { detail, .. } => {
                detail.contains("peer closed connection")
                    || detail.contains("Connection reset")
                    || detail.contains("handshake eof")
            }
            _ => false,
        };
        (with_certificate && closed).then_some(
            "the broker closed the connection before accepting it: if it verifies client certificates, check that it trusts the device's certificate (its log says why)",
        )
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

/// The client options for `settings`' current endpoint; a link that fails over puts these
/// into its event loop (`EventLoop::mqtt_options`) before the next attempt. The TLS files
/// are read again, so a rotated certificate is picked up on reconnect.
///
/// Fails when the TLS files cannot be used.
pub fn options(settings: &Settings, last_will: Option<LastWill>) -> Result<MqttOptions, HubError> {
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
        options.set_credentials(user, password.expose());
    }
    if let Some(will) = last_will {
        options.set_last_will(will);
    }
    Ok(options)
}

/// Creates the rumqttc client and event loop (nothing is connected until the loop is polled).
///
/// Fails when the TLS files cannot be used.
pub fn client(
    settings: &Settings,
    last_will: Option<LastWill>,
) -> Result<(AsyncClient, EventLoop), HubError> {
    let options = options(settings, last_will)?;
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let mut network = rumqttc::NetworkOptions::new();
    // Small messages both ways: without this, Nagle's algorithm and delayed ACKs add ~40 ms
    // to a deployment's round trip (measured).
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_goes_round_the_endpoints_in_order() {
        let s = Settings {
            client_id: "d".into(),
            host: "a".into(),
            port: 1,
            failover: vec![("b".into(), 2), ("c".into(), 3)],
            tls: None,
            credentials: None,
            keep_alive: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
        };
        let mut seen = Vec::new();
        let mut cur = s.clone();
        for _ in 0..4 {
            seen.push((cur.host.clone(), cur.port));
            cur = cur.next_endpoint();
        }
        assert_eq!(
            seen,
            [("a", 1), ("b", 2), ("c", 3), ("a", 1)].map(|(h, p)| (h.to_string(), p))
        );
        let single = Settings {
            failover: vec![],
            ..s
        };
        assert_eq!(single.next_endpoint().host, "a");
    }

    #[test]
    fn a_connection_closed_before_connack_with_a_certificate_gets_a_hint() {
        let mut s = Settings {
            client_id: "d".into(),
            host: "hub".into(),
            port: 8883,
            failover: vec![],
            tls: Some(tls::TlsFiles {
                ca_file: None,
                client_auth: Some(("c.pem".into(), "c.key".into())),
                ca_setting: "hub.ca_file",
            }),
            credentials: None,
            keep_alive: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
        };
        let closed = HubError::Connect {
            addr: "hub:8883".into(),
            detail: "IO: peer closed connection without sending TLS close_notify".into(),
        };
        let refused = HubError::Connect {
            addr: "hub:8883".into(),
            detail: "I/O: Connection refused (os error 111)".into(),
        };
        assert!(s.hint_closed_before_connack(&closed).is_some());
        assert!(s.hint_closed_before_connack(&refused).is_none());
        s.tls.as_mut().unwrap().client_auth = None;
        assert!(s.hint_closed_before_connack(&closed).is_none());
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
