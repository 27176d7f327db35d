//! The operator's side of the hub: publish deployments, read the fleet's retained state and
//! presence, watch changes, send commands. The CLI (`outpost-ctl ...`) prints what these return.
//!
//! Reading "everything retained" has no end marker in MQTT. [`Operator::snapshot`] uses a
//! fence instead of a guessed quiet period: after subscribing it publishes a marker to a topic
//! of its own and reads until the marker comes back; the broker sends a subscription's retained
//! messages before anything published after it, so by then all of them have arrived. The same
//! fence confirms that a published deployment reached the broker.

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS, SubscribeFilter};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use outpost_core::manifest::Issue;
use outpost_core::state::{DeploymentStatus, ReportedState, Source};
use outpost_core::wire::presence::Presence;
use outpost_core::wire::topics::{self, device_of, is_level};
use outpost_mqtt::HubError;
use outpost_mqtt::{Settings, client};

/// Largest retained state or presence message the operator reads.
pub const MAX_STATE_BYTES: usize = 1024 * 1024;

/// One message as received.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// How long a subscription may wait for the broker's SUBACK.
pub const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection of the operator's CLI to the hub.
pub struct Operator {
    client: AsyncClient,
    rx: mpsc::Receiver<Message>,
    /// SUBACKs received so far, and SUBSCRIBEs sent: `subscribe` waits for its SUBACK, since
    /// a broker that handles packets concurrently (amqtt) may route a PUBLISH sent right
    /// after a SUBSCRIBE before the subscription exists.
    subacks: watch::Receiver<u64>,
    subscribes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Every filter subscribed so far: a reconnect is a clean session without them, so the
    /// connection task subscribes them again (a long `watch` or rollout keeps hearing).
    filters: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Connections made so far (1 after `connect`): a reconnect is a new clean session, whose
    /// subscriptions are gone.
    sessions: watch::Receiver<u64>,
    stop: CancellationToken,
    prefix: String,
    sync_topic: String,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.stop.cancel();
    }
}

impl Operator {
    /// Connects with `settings` (the client id is made unique) and waits for the broker's
    /// acknowledgement.
    ///
    /// Fails with the explained reason (TLS trust, refused certificate or credentials,
    /// unreachable broker) or when no acknowledgement comes within `timeout`.
    pub async fn connect(
        settings: &Settings,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Operator, HubError> {
        let mut settings = settings.clone();
        let nonce = format!("{:016x}", getrandom::u64().unwrap_or(0));
        settings.client_id = format!("outpost-operator-{nonce}");
        let (client, mut eventloop) = client(&settings, None)?;
        let (tx, rx) = mpsc::channel(1024);
        let (suback_tx, subacks) = watch::channel(0u64);
        let (session_tx, sessions) = watch::channel(0u64);
        let subscribes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let filters: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let (task_client, task_subscribes, task_filters) =
            (client.clone(), subscribes.clone(), filters.clone());
        let (ready_tx, ready_rx) = oneshot::channel();
        let stop = CancellationToken::new();
        let task_stop = stop.clone();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                let event = tokio::select! {
                    _ = task_stop.cancelled() => return,
                    e = eventloop.poll() => e,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        session_tx.send_modify(|n| *n += 1);
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        } else {
                            // A new clean session: subscribe again to what this connection
                            // followed. `try_`: this task drains the request channel, so it
                            // must not wait on it; the SUBACK is counted as a subscribe's.
                            let again: Vec<_> = task_filters
                                .lock()
                                .map(|f| f.clone())
                                .unwrap_or_default()
                                .into_iter()
                                .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce))
                                .collect();
                            if !again.is_empty() && task_client.try_subscribe_many(again).is_ok() {
                                task_subscribes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        suback_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let message = Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        };
                        // The reader consumes until it is done; waiting here is the
                        // back-pressure that bounds memory.
                        tokio::select! {
                            _ = task_stop.cancelled() => return,
                            r = tx.send(message) => if r.is_err() { return },
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let err = settings.explain(&e);
                        match ready.take() {
                            Some(r) => {
                                let _ = r.send(Err(err));
                                return;
                            }
                            None => {
                                tracing::warn!(error = %err, "hub connection lost; reconnecting");
                                tokio::select! {
                                    _ = task_stop.cancelled() => return,
                                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                                }
                            }
                        }
                    }
                }
            }
        });
        let outcome = tokio::time::timeout(timeout, ready_rx).await;
        let connected = match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HubError::Client("the connection task ended".into())),
            Err(_) => Err(HubError::Timeout(timeout)),
        };
        if let Err(e) = connected {
            stop.cancel();
            return Err(e);
        }
        Ok(Operator {
            client,
            rx,
            subacks,
            subscribes,
            filters,
            sessions,
            stop,
            prefix: prefix.to_string(),
            sync_topic: format!("{prefix}/_operator/{nonce}/sync"),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many times the connection was made (1 after `connect`); a long-running reader
    /// subscribes again when it grows.
    pub fn session(&self) -> u64 {
        *self.sessions.borrow()
    }

    /// Subscribes to `filters` (QoS 1) and waits for the broker's acknowledgement (at most
    /// [`SUBACK_TIMEOUT`]).
    pub async fn subscribe(&self, filters: &[String]) -> Result<(), HubError> {
        if let Ok(mut kept) = self.filters.lock() {
            for f in filters {
                if !kept.contains(f) {
                    kept.push(f.clone());
                }
            }
        }
        let filters: Vec<_> = filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        let want = 1 + self
            .subscribes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.client
            .subscribe_many(filters)
            .await
            .map_err(|e| HubError::Client(e.to_string()))?;
        let mut subacks = self.subacks.clone();
        match tokio::time::timeout(SUBACK_TIMEOUT, subacks.wait_for(|n| *n >= want)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(HubError::Client("the connection task ended".into())),
            Err(_) => Err(HubError::Timeout(SUBACK_TIMEOUT)),
        }
    }

    /// Publishes with QoS 1.
    pub async fn publish(
        &self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), HubError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| HubError::Client(e.to_string()))
    }

    /// Publishes with QoS 1 while keeping the inbox moving: a burst of publishes (a wave of a
    /// rollout) while devices answer would otherwise fill the inbox, stall the connection task
    /// and with it the publish. Messages that arrive meanwhile go to `inbox`.
    pub async fn publish_collecting(
        &mut self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        inbox: &mut Vec<Message>,
    ) -> Result<(), HubError> {
        let publish = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload);
        tokio::pin!(publish);
        loop {
            tokio::select! {
                r = &mut publish => return r.map_err(|e| HubError::Client(e.to_string())),
                m = self.rx.recv() => match m {
                    Some(m) => inbox.push(m),
                    None => return Err(HubError::Client("the connection task ended".into())),
                },
            }
        }
    }

    /// The next message, or `None` at `deadline`.
    pub async fn recv_until(&mut self, deadline: Instant) -> Result<Option<Message>, HubError> {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Ok(Some(m)) => Ok(Some(m)),
            Ok(None) => Err(HubError::Client("the connection task ended".into())),
            Err(_) => Ok(None),
        }
    }

    /// Waits until the broker has handled everything this connection sent before, returning
    /// the messages that arrived meanwhile.
    pub async fn fence(&mut self, timeout: Duration) -> Result<Vec<Message>, HubError> {
        self.subscribe(std::slice::from_ref(&self.sync_topic))
            .await?;
        let marker = format!("{:016x}", getrandom::u64().unwrap_or(1)).into_bytes();
        self.publish(&self.sync_topic.clone(), false, marker.clone())
            .await?;
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            match self.recv_until(deadline).await? {
                Some(m) if m.topic == self.sync_topic && m.payload == marker => return Ok(before),
                Some(m) if m.topic == self.sync_topic => {}
                Some(m) => before.push(m),
                None => {
                    return Err(HubError::Client(format!(
                        "the broker did not pass back the marker on {} within {timeout:?}; \
                         the operator needs publish and subscribe rights on {}/_operator/#",
                        self.sync_topic, self.prefix
                    )));
                }
            }
        }
    }

    /// Subscribes to `filters` and returns every retained message they match.
    pub async fn snapshot(
        &mut self,
        filters: &[String],
        timeout: Duration,
    ) -> Result<Vec<Message>, HubError> {
        self.subscribe(filters).await?;
        self.fence(timeout).await
    }
}

/// Where a deployment goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(String),
    Group(String),
}

impl Target {
    pub fn topic(&self, prefix: &str) -> String {
        match self {
            Target::Device(d) => topics::device_topic(prefix, d, "deployment"),
            Target::Group(g) => topics::group_deployment(prefix, g),
        }
    }

    pub fn is_valid(&self) -> bool {
        match self {
            Target::Device(d) => is_level(d) && d != "groups" && !d.starts_with('_'),
            Target::Group(g) => is_level(g),
        }
    }
}

/// How one device stands with one deployment (identified by its manifest digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The device has not reported anything about it yet.
    Waiting,
    /// Received or applying.
    InProgress(DeploymentStatus),
    /// Accepted and staged, but held back by the device's update window or a module's update
    /// lock: the device's words (when the window opens, which lock, its deadline).
    Held(String),
    Applied,
    /// Failed or rolled back, with the reasons.
    Failed(DeploymentStatus, Vec<Issue>),
    Rejected(Vec<Issue>),
    /// Another deployment is in force (e.g. the device's own over its group's).
    Overridden(Source),
}

impl Progress {
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Progress::Waiting | Progress::InProgress(_) | Progress::Held(_)
        )
    }

    pub fn label(&self) -> String {
        match self {
            Progress::Waiting => "waiting".into(),
            Progress::InProgress(s) => status_name(*s),
            Progress::Held(why) => why.clone(),
            Progress::Applied => "applied".into(),
            Progress::Failed(s, _) => status_name(*s),
            Progress::Rejected(_) => "rejected".into(),
            Progress::Overridden(source) => format!("overridden by {}", source_name(source)),
        }
    }
}

pub fn status_name(status: DeploymentStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn source_name(source: &Source) -> String {
    match source {
        Source::Device => "device".into(),
        Source::Group { name } => format!("group {name}"),
        Source::Local => "local".into(),
    }
}

/// Where a device stands with the deployment whose manifest digest is `digest`.
///
/// `group`: when judging a group deployment, a device whose deployment in force came from
/// elsewhere (its own topic, or a group that wins) is `Overridden` once it has settled.
pub fn progress(state: &ReportedState, digest: &str, group: Option<&str>) -> Progress {
    if let Some(d) = &state.deployment
        && d.digest.as_deref() == Some(digest)
    {
        {
            return match d.status {
                DeploymentStatus::Applied => Progress::Applied,
                DeploymentStatus::Failed | DeploymentStatus::RolledBack => {
                    Progress::Failed(d.status, d.reasons.clone())
                }
                DeploymentStatus::Rejected => Progress::Rejected(d.reasons.clone()),
                s @ (DeploymentStatus::Received | DeploymentStatus::Applying) => {
                    Progress::InProgress(s)
                }
                DeploymentStatus::Waiting => match &d.waiting {
                    Some(w) => Progress::Held(w.message.clone()),
                    None => Progress::InProgress(DeploymentStatus::Waiting),
                },
            };
        }
    }
    if let Some(r) = &state.last_rejected
        && r.digest.as_deref() == Some(digest)
    {
        return Progress::Rejected(r.reasons.clone());
    }
    if let (Some(group), Some(d)) = (group, &state.deployment) {
        let from_this_group = matches!(&d.source, Source::Group { name } if name == group);
        if !from_this_group && d.status == DeploymentStatus::Applied {
            return Progress::Overridden(d.source.clone());
        }
    }
    Progress::Waiting
}

/// What the hub knows of one device from its retained messages.
#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    pub device: String,
    pub presence: Option<Presence>,
    pub state: Option<ReportedState>,
    /// A retained message that could not be read (too large, not the expected JSON).
    pub unreadable: Option<String>,
}

impl DeviceView {
    pub fn online(&self) -> Option<bool> {
        self.presence.as_ref().map(|p| p.online)
    }
}

/// Folds state and presence messages into per-device views (later messages win).
pub fn fold(prefix: &str, messages: &[Message], views: &mut BTreeMap<String, DeviceView>) {
    for m in messages {
        let (device, is_state) = if let Some(d) = device_of(prefix, &m.topic, "state") {
            (d, true)
        } else if let Some(d) = device_of(prefix, &m.topic, "presence") {
            (d, false)
        } else {
            continue;
        };
        let view = views
            .entry(device.to_string())
            .or_insert_with(|| DeviceView {
                device: device.to_string(),
                ..Default::default()
            });
        if m.payload.is_empty() {
            // A cleared retained message: the hub forgot this part of the device.
            if is_state {
                view.state = None;
            } else {
                view.presence = None;
            }
            continue;
        }
        if m.payload.len() > MAX_STATE_BYTES {
            view.unreadable = Some(format!(
                "{} message over {MAX_STATE_BYTES} bytes",
                if is_state { "state" } else { "presence" }
            ));
            continue;
        }
        if is_state {
            match serde_json::from_slice::<ReportedState>(&m.payload) {
                Ok(s) => view.state = Some(s),
                Err(e) => view.unreadable = Some(format!("state: {e}")),
            }
        } else {
            match serde_json::from_slice::<Presence>(&m.payload) {
                Ok(p) => view.presence = Some(p),
                Err(e) => view.unreadable = Some(format!("presence: {e}")),
            }
        }
    }
}

/// A group's standing: each member (a device whose presence lists the group) with its progress
/// on the group's current deployment.
#[derive(Debug, Clone, Default)]
pub struct GroupSummary {
    pub group: String,
    /// The group's retained deployment: id, version, digest; `None` when there is none.
    pub deployment: Option<(String, u64, String)>,
    pub members: Vec<(String, Option<bool>, Progress)>,
}

impl GroupSummary {
    pub fn count(&self, f: impl Fn(&Progress) -> bool) -> usize {
        self.members.iter().filter(|(_, _, p)| f(p)).count()
    }

    pub fn offline(&self) -> usize {
        self.members
            .iter()
            .filter(|(_, online, _)| *online != Some(true))
            .count()
    }

    /// Every member that is online has settled (applied, failed, rejected or overridden).
    pub fn settled(&self) -> bool {
        self.members
            .iter()
            .all(|(_, online, p)| *online != Some(true) || p.is_final())
    }
}

pub fn group_summary(
    group: &str,
    deployment: Option<(String, u64, String)>,
    views: &BTreeMap<String, DeviceView>,
) -> GroupSummary {
    let members = views
        .values()
        .filter(|v| {
            v.presence
                .as_ref()
                .is_some_and(|p| p.groups.iter().any(|g| g == group))
        })
        .map(|v| {
            let progress = match (&deployment, &v.state) {
                (Some((_, _, digest)), Some(state)) => progress(state, digest, Some(group)),
                _ => Progress::Waiting,
            };
            (v.device.clone(), v.online(), progress)
        })
        .collect();
    GroupSummary {
        group: group.to_string(),
        deployment,
        members,
    }
}

/// The id, version and manifest digest of a retained deployment message (bare or enveloped),
/// without verifying anything: for display only.
pub fn describe_deployment(payload: &[u8]) -> Option<(String, u64, String)> {
    if payload.is_empty() || payload.len() > outpost_core::intake::MAX_MESSAGE_BYTES {
        return None;
    }
    let manifest = serde_json::from_slice::<outpost_core::signing::Envelope>(payload)
        .ok()
        .and_then(|e| outpost_core::signing::open(&e).ok())
        .unwrap_or_else(|| payload.to_vec());
    let v: Value = serde_json::from_slice(&manifest).ok()?;
    Some((
        v.get("id")?.as_str()?.to_string(),
        v.get("version")?.as_u64()?,
        outpost_core::intake::hex_sha256(&manifest),
    ))
}

/// A unique request id for a command.
pub fn request_id() -> String {
    format!("op-{:016x}", getrandom::u64().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_core::state::{AgentFacts, DeploymentReport};

    fn state(source: Source, digest: &str, status: DeploymentStatus) -> ReportedState {
        ReportedState {
            device_id: "d".into(),
            deployment: Some(DeploymentReport {
                id: "x".into(),
                version: 1,
                status,
                source,
                reasons: vec![],
                digest: Some(digest.into()),
                updated_at: 1,
                waiting: None,
            }),
            last_rejected: None,
            last_good: None,
            modules: Default::default(),
            agent: AgentFacts::local(0),
            conditions: vec![],
        }
    }

    #[test]
    fn progress_follows_the_digest() {
        let s = state(Source::Device, "aa", DeploymentStatus::Applying);
        assert_eq!(
            progress(&s, "aa", None),
            Progress::InProgress(DeploymentStatus::Applying)
        );
        assert_eq!(progress(&s, "bb", None), Progress::Waiting);
        // Held by the device's window: not final, and the device's words are the label.
        let mut s = state(Source::Device, "aa", DeploymentStatus::Waiting);
        if let Some(d) = &mut s.deployment {
            d.waiting = Some(outpost_core::state::Waiting {
                reason: outpost_core::state::WaitReason::UpdateWindow,
                opens_at: Some(2),
                modules: vec![],
                deadline: None,
                message: "waiting for the update window (opens at …)".into(),
            });
        }
        let p = progress(&s, "aa", None);
        assert!(!p.is_final());
        assert_eq!(p.label(), "waiting for the update window (opens at …)");
        let s = state(Source::Device, "aa", DeploymentStatus::Applied);
        assert_eq!(progress(&s, "aa", None), Progress::Applied);
        let mut s = state(Source::Device, "aa", DeploymentStatus::Applied);
        s.last_rejected = s.deployment.clone().map(|mut d| {
            d.digest = Some("bb".into());
            d.reasons = vec![Issue::new("/version", "old")];
            d
        });
        assert_eq!(
            progress(&s, "bb", None),
            Progress::Rejected(vec![Issue::new("/version", "old")])
        );
    }

    #[test]
    fn a_device_deployment_overrides_the_group() {
        let s = state(Source::Device, "aa", DeploymentStatus::Applied);
        assert_eq!(
            progress(&s, "gg", Some("g")),
            Progress::Overridden(Source::Device)
        );
        let s = state(
            Source::Group { name: "g".into() },
            "old",
            DeploymentStatus::Applied,
        );
        assert_eq!(progress(&s, "gg", Some("g")), Progress::Waiting);
    }

    proptest::proptest! {
        /// Retained messages from devices are untrusted too: reading them never panics.
        #[test]
        fn any_retained_message_is_read_without_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            leaf in proptest::sample::select(vec!["state", "presence", "deployment"]),
        ) {
            let mut views = BTreeMap::new();
            let message = Message { topic: format!("outpost/d/{leaf}"), payload: bytes.clone(), retain: true };
            fold("outpost", &[message], &mut views);
            let _ = describe_deployment(&bytes);
        }
    }

    #[test]
    fn group_members_come_from_presence() {
        let mut views = BTreeMap::new();
        let presence = |online: bool, groups: &[&str]| {
            serde_json::to_vec(&Presence {
                online,
                since: None,
                agent_version: None,
                groups: groups.iter().map(|s| s.to_string()).collect(),
            })
            .unwrap()
        };
        let msg = |topic: &str, payload: Vec<u8>| Message {
            topic: topic.into(),
            payload,
            retain: true,
        };
        let applied = serde_json::to_vec(&state(
            Source::Group { name: "g".into() },
            "gg",
            DeploymentStatus::Applied,
        ))
        .unwrap();
        fold(
            "outpost",
            &[
                msg("outpost/a/presence", presence(true, &["g"])),
                msg("outpost/a/state", applied),
                msg("outpost/b/presence", presence(false, &["g"])),
                msg("outpost/c/presence", presence(true, &["other"])),
                msg("outpost/groups/g/deployment", b"{}".to_vec()),
            ],
            &mut views,
        );
        let summary = group_summary("g", Some(("x".into(), 1, "gg".into())), &views);
        assert_eq!(summary.members.len(), 2);
        assert_eq!(summary.count(|p| *p == Progress::Applied), 1);
        assert_eq!(summary.offline(), 1);
        assert!(summary.settled());
    }
}
