//! How the operator reaches the hub: `--hub URL` and its TLS and credential flags, or the
//! `OUTPOST_HUB_*` variables.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use outpost_mqtt::tls::TlsFiles;
use outpost_mqtt::{Password, Settings};

/// How the operator reaches the hub.
#[derive(Debug, Args)]
pub struct HubConnection {
    /// Hub URL: `mqtts://host:8883` (or `mqtt://` on loopback).
    #[arg(long = "hub", env = "OUTPOST_HUB_URL", global = true)]
    pub url: Option<String>,
    /// CA certificate (PEM) that signs the broker's certificate; default: the system's roots.
    #[arg(long, env = "OUTPOST_HUB_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "OUTPOST_HUB_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "OUTPOST_HUB_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// User name, with --password-file.
    #[arg(
        long,
        env = "OUTPOST_HUB_USERNAME",
        global = true,
        requires = "password_file"
    )]
    pub username: Option<String>,
    /// File holding the password (never passed on the command line).
    #[arg(
        long,
        env = "OUTPOST_HUB_PASSWORD_FILE",
        global = true,
        requires = "username"
    )]
    pub password_file: Option<PathBuf>,
    /// Topic prefix of the fleet.
    #[arg(long, env = "OUTPOST_HUB_PREFIX", global = true)]
    pub prefix: Option<String>,
    /// Allow plaintext `mqtt://` to a host that is not loopback.
    #[arg(long, global = true)]
    pub allow_insecure: bool,
    /// Seconds to wait for the broker to accept the connection.
    #[arg(long, default_value_t = 10, global = true)]
    pub connect_timeout: u64,
}

/// The connection settings and topic prefix, from the flags (or their variables).
pub fn settings(conn: &HubConnection) -> Result<(Settings, String)> {
    let client_id = "outpost-operator".to_string();
    let Some(text) = &conn.url else {
        bail!("no hub given: pass --hub mqtts://HOST:PORT or set OUTPOST_HUB_URL");
    };
    let url = url::Url::parse(text).with_context(|| format!("--hub `{text}` is not a URL"))?;
    let tls = match url.scheme() {
        "mqtts" => true,
        "mqtt" => false,
        other => {
            bail!("--hub: scheme `{other}` is not supported; use mqtts:// (or mqtt:// on loopback)")
        }
    };
    let host = url
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_string())
        .with_context(|| format!("--hub `{text}` names no host"))?;
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !tls && !loopback && !conn.allow_insecure {
        bail!(
            "--hub `{text}` is plaintext MQTT to a remote host; use mqtts:// or pass --allow-insecure"
        );
    }
    if !tls && (conn.cert.is_some() || conn.ca.is_some()) {
        bail!("--ca and --cert need an mqtts:// hub URL");
    }
    let credentials = match (&conn.username, &conn.password_file) {
        (Some(u), Some(f)) => Some((u.clone(), Password::read(f)?)),
        _ => None,
    };
    let settings = Settings {
        client_id,
        port: url.port().unwrap_or(if tls { 8883 } else { 1883 }),
        host,
        // The operator names one node; a clustered hub shares the retained topics anyway.
        failover: Vec::new(),
        tls: tls.then(|| TlsFiles {
            ca_file: conn.ca.clone(),
            client_auth: conn.cert.clone().zip(conn.key.clone()),
            ca_setting: "--ca",
        }),
        credentials,
        keep_alive: Duration::from_secs(30),
        reconnect_min: Duration::from_millis(250),
        reconnect_max: Duration::from_secs(5),
    };
    let prefix = conn.prefix.clone().unwrap_or_else(|| "outpost".into());
    Ok((settings, prefix))
}
