//! `outpost-ctl provision serve`: the operator's provisioning responder. It holds the
//! provisioning CA's key, answers devices' first-boot claims and renewals over the hub, and
//! keeps an append-only record of what it issued (see `docs/provisioning.md`).
//!
//! - [`responder`]: the rules and the signing (no network);
//! - [`record`]: the record of issued certificates;
//! - this module: the command line and the MQTT loop.

pub mod record;
pub mod responder;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use outpost_core::backoff::Backoff;
use outpost_core::wire::provisioning::{
    Kind, classify_request, prefix_for, request_filter, response_topic,
};
use outpost_mqtt::Settings;
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

use self::record::Record;
use self::responder::{Allow, Ca, Policy, Responder};

#[derive(Debug, Subcommand)]
pub enum ProvisionCommand {
    /// Answer devices' first-boot claims and renewals until stopped (Ctrl-C or SIGTERM).
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The provisioning CA's certificate (PEM): the broker trusts device certificates it signs.
    #[arg(long)]
    pub ca_cert: PathBuf,
    /// The provisioning CA's private key (PEM). Keep it on the operator's side only.
    #[arg(long)]
    pub ca_key: PathBuf,
    /// Where the record of issued certificates is kept (`issued.jsonl`).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Provision any serial (rate-limited).
    #[arg(long, conflicts_with_all = ["allow_list", "allow_pattern"])]
    pub allow_any: bool,
    /// Provision the serials in this file (one a line; `#` comments).
    #[arg(long, conflicts_with = "allow_pattern")]
    pub allow_list: Option<PathBuf>,
    /// Provision serials matching this pattern (`*` any run, `?` one character).
    #[arg(long)]
    pub allow_pattern: Option<String>,
    /// The device id made from the serial.
    #[arg(long, default_value = "dev-{serial}")]
    pub name_template: String,
    /// Groups every provisioned device joins (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Give a serial already issued a new identity (a replaced or wiped board).
    #[arg(long)]
    pub reissue: bool,
    /// How long the certificates are valid, in days.
    #[arg(long, default_value_t = 90, conflicts_with = "validity_secs")]
    pub validity_days: u64,
    /// How long the certificates are valid, in seconds (tests and short-lived fleets).
    #[arg(long)]
    pub validity_secs: Option<u64>,
    /// Claims and renewals answered per minute, all devices together.
    #[arg(long, default_value_t = 60)]
    pub rate_per_minute: u32,
    /// The provisioning topics' prefix (default: the fleet prefix + `/_provisioning`).
    #[arg(long)]
    pub topic_prefix: Option<String>,
}

impl ServeArgs {
    fn policy(&self) -> Result<Policy> {
        let allow = if self.allow_any {
            Allow::Any
        } else if let Some(file) = &self.allow_list {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read --allow-list {}", file.display()))?;
            Allow::List(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect::<HashSet<_>>(),
            )
        } else if let Some(p) = &self.allow_pattern {
            Allow::Pattern(p.clone())
        } else {
            bail!(
                "say which serials may be provisioned: --allow-list FILE, --allow-pattern 'SN-*' or --allow-any"
            );
        };
        Ok(Policy {
            allow,
            name_template: self.name_template.clone(),
            groups: self.groups.clone(),
            reissue: self.reissue,
            validity: Duration::from_secs(
                self.validity_secs
                    .unwrap_or(self.validity_days.saturating_mul(86_400)),
            ),
            rate_per_minute: self.rate_per_minute,
        })
    }
}

/// Runs the responder until `stop`: connects (and reconnects) to the hub, subscribes to
/// claims and renewals, answers each.
pub async fn serve(
    mut settings: Settings,
    fleet_prefix: &str,
    args: &ServeArgs,
    stop: CancellationToken,
) -> Result<()> {
    let policy = args.policy()?;
    let ca = Ca::load(&args.ca_cert, &args.ca_key)?;
    let record = Record::open(&args.state_dir)?;
    let mut responder = Responder::new(policy, ca, record)?;
    let prefix = args
        .topic_prefix
        .clone()
        .unwrap_or_else(|| prefix_for(fleet_prefix));
    // Its own client id: an operator's other commands must not disconnect it.
    settings.client_id = "outpost-provisioner".into();
    let (client, mut eventloop) = outpost_mqtt::client(&settings, None)?;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    eprintln!(
        "provisioning responder on {}:{}, prefix `{prefix}`, {} issued so far",
        settings.host,
        settings.port,
        responder.issued()
    );
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!("connected; waiting for requests");
                client
                    .subscribe_many([Kind::Claim, Kind::Renew].map(|k| {
                        rumqttc::SubscribeFilter::new(request_filter(&prefix, k), QoS::AtLeastOnce)
                    }))
                    .await?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some((kind, who)) = classify_request(&prefix, &p.topic) else {
                    continue;
                };
                let Some(answer) =
                    responder.handle(kind, who, &p.payload, outpost_core::time::unix_now())
                else {
                    continue;
                };
                let payload = serde_json::to_vec(&answer)?;
                client
                    .publish(
                        response_topic(&prefix, kind, who),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await?;
            }
            Ok(_) => {}
            Err(e) => {
                let err = settings.explain(&e);
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "hub connection failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
    Ok(())
}
