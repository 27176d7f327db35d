//! The runner: sends a rollout's waves, follows the devices' reports, aborts on the failure
//! budget, reverts, and keeps the record on the broker current (with a heartbeat, so that
//! another machine can tell a live runner from a dead one and take over).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Result, bail};
use outpost_core::wire::topics;
use tokio::time::Instant;

use super::plan::{self, DeviceStatus, Owner, Record, Status};
use super::stage::{self, Staged};
use super::store::{self, Control};
use crate::hub::{DeviceView, Message, Operator, Progress, fold, progress};
use crate::{EXIT_REFUSED, EXIT_TIMEOUT};

/// How often a live runner says so.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A heartbeat older than this belongs to a runner that is gone.
pub const STALE_AFTER_SECS: u64 = 20;
/// Changes are published at most this often (a wave of a thousand devices answers at once).
const SAVE_EVERY: Duration = Duration::from_millis(500);

fn now() -> u64 {
    outpost_core::time::unix_now()
}

/// This process as a rollout's owner.
pub fn me() -> Owner {
    Owner {
        id: format!("{:016x}", getrandom::u64().unwrap_or(0)),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "unknown".into()),
        pid: std::process::id(),
        heartbeat_at: now(),
    }
}

/// Whether `record` is being run by a live runner other than `me`.
pub fn live_owner(record: &Record, me: &Owner) -> Option<Owner> {
    let owner = record.owner.as_ref()?;
    let active = matches!(record.status, Status::Running | Status::Reverting);
    (active && owner.id != me.id && now().saturating_sub(owner.heartbeat_at) < STALE_AFTER_SECS)
        .then(|| owner.clone())
}

/// What the runner prints as it goes.
fn say(record: &Record, text: &str) {
    eprintln!("[{}] {text}", record.id);
}

pub struct Runner {
    op: Operator,
    prefix: String,
    record: Record,
    staged: BTreeMap<String, Staged>,
    views: BTreeMap<String, DeviceView>,
    me: Owner,
    /// When each device in flight was sent (this process's monotonic clock: a resumed rollout
    /// gives the devices in flight a full timeout again).
    sent: HashMap<String, Instant>,
    started: Instant,
    dirty: bool,
    last_save: Instant,
    last_heartbeat: Instant,
    bake_until: Option<Instant>,
    inbox: Vec<Message>,
    /// The connection's session when the runner last subscribed.
    session: u64,
}

impl Runner {
    /// Takes over `record` (the caller checked that no live runner has it).
    pub fn new(op: Operator, record: Record, staged: BTreeMap<String, Staged>) -> Runner {
        let prefix = op.prefix().to_string();
        let started = Instant::now();
        Runner {
            op,
            prefix,
            record,
            staged,
            views: BTreeMap::new(),
            me: me(),
            sent: HashMap::new(),
            started,
            dirty: true,
            last_save: started,
            last_heartbeat: started,
            bake_until: None,
            inbox: Vec::new(),
            session: 0,
        }
    }

    /// Subscribes to the devices' reports and the rollout's own topics and reads what is
    /// retained.
    async fn follow(&mut self) -> Result<()> {
        self.session = self.op.session();
        let id = self.record.id.clone();
        let filters = vec![
            format!("{}/+/state", self.prefix),
            format!("{}/+/presence", self.prefix),
            store::control_topic(&self.prefix, &id),
            store::state_topic(&self.prefix, &id),
        ];
        let seen = self.op.snapshot(&filters, Duration::from_secs(30)).await?;
        self.inbox.extend(seen);
        // Devices already sent the deployment (a resumed rollout) get a full timeout from now.
        let now = Instant::now();
        for (name, d) in &self.record.devices {
            if matches!(d.status, DeviceStatus::Sent | DeviceStatus::Reverting) {
                self.sent.insert(name.clone(), now);
            }
        }
        Ok(())
    }

    /// Runs the waves until the rollout completes, aborts (and reverts, when asked), is
    /// cancelled or taken over, or the operator stops it (Ctrl-C: paused). Returns the exit
    /// code: 0 completed, 1 otherwise.
    pub async fn drive(&mut self, stop: tokio_util::sync::CancellationToken) -> Result<u8> {
        self.follow().await?;
        self.record.owner = Some(self.me.clone());
        if self.record.status == Status::Paused {
            self.record.status = Status::Running;
            self.record.reason = None;
        }
        if self.record.status == Status::Reverting {
            return self.revert(stop).await;
        }
        if self.record.status != Status::Running {
            bail!(
                "rollout {} is {}: there is nothing to run",
                self.record.id,
                self.record.status.name()
            );
        }
        self.save(true).await?;
        loop {
            if let Some(code) = self.absorb().await? {
                return Ok(code);
            }
            if self.record.status == Status::Cancelled {
                say(&self.record, "cancelled: no further wave is sent");
                self.save(true).await?;
                return Ok(EXIT_REFUSED);
            }
            if let Some(reason) = self.record.abort_reason() {
                self.record.status = Status::Aborted;
                say(&self.record, &format!("aborted: {reason}"));
                self.record.reason = Some(reason);
                self.save(true).await?;
                if self.record.policy.revert_on_abort {
                    self.revert(stop).await?;
                }
                return Ok(EXIT_REFUSED);
            }
            if self.advance().await? {
                let t = self.record.tally(None);
                let offline = t.in_flight;
                self.record.status = Status::Completed;
                let mut text = format!(
                    "completed: {} of {} devices applied {} v{} in {:.1} s",
                    t.applied,
                    t.total,
                    self.record.deployment,
                    self.record.version,
                    self.started.elapsed().as_secs_f64()
                );
                if offline > 0 {
                    text.push_str(&format!(
                        "; {offline} offline, they apply it when they connect (it is retained)"
                    ));
                }
                say(&self.record, &text);
                self.record.reason = Some(text);
                self.save(true).await?;
                return Ok(0);
            }
            self.save(false).await?;
            let deadline = Instant::now() + Duration::from_millis(1000);
            tokio::select! {
                _ = stop.cancelled() => {
                    self.record.status = Status::Paused;
                    self.record.reason = Some("its runner was stopped; `outpost-ctl rollout resume` goes on".into());
                    self.save(true).await?;
                    say(&self.record, &format!("paused; `outpost-ctl rollout resume {}` goes on", self.record.id));
                    return Ok(EXIT_REFUSED);
                }
                m = self.op.recv_until(deadline) => if let Some(m) = m? { self.inbox.push(m) },
            }
        }
    }

    /// Takes in what arrived: devices' reports, a cancel, another runner taking over.
    /// `Some(code)` when this runner must stop.
    async fn absorb(&mut self) -> Result<Option<u8>> {
        if self.op.session() != self.session {
            // The broker connection was lost and made again: a clean session has no
            // subscriptions, and reports were missed meanwhile. Read them again, and give the
            // devices in flight a full timeout (this runner, not they, was away).
            say(
                &self.record,
                "reconnected to the hub; reading the devices' reports again",
            );
            self.follow().await?;
        }
        let messages = std::mem::take(&mut self.inbox);
        let state_topic = store::state_topic(&self.prefix, &self.record.id);
        let control_topic = store::control_topic(&self.prefix, &self.record.id);
        for m in &messages {
            // Retained copies are older than this runner; a live one from another runner means
            // it took over.
            if m.topic == state_topic && !m.payload.is_empty() && !m.retain {
                if let Ok(other) = store::parse_record(m)
                    && let Some(owner) = &other.owner
                    && owner.id != self.me.id
                {
                    say(
                        &self.record,
                        &format!(
                            "taken over by {}:{} (outpost-ctl rollout resume --force); this runner stops",
                            owner.host, owner.pid
                        ),
                    );
                    return Ok(Some(EXIT_REFUSED));
                }
            } else if m.topic == control_topic && !m.payload.is_empty() {
                let control: Control = serde_json::from_slice(&m.payload).unwrap_or_default();
                if control.cancel && !self.record.status.is_final() {
                    self.record.status = Status::Cancelled;
                    self.record.reason = Some("cancelled by an operator".into());
                    self.dirty = true;
                }
            }
        }
        fold(&self.prefix, &messages, &mut self.views);
        self.judge();
        Ok(None)
    }

    /// Updates each device's record from its reported state.
    fn judge(&mut self) {
        let now_mono = Instant::now();
        let timeout = Duration::from_secs(self.record.policy.device_timeout_secs);
        let mut lines = Vec::new();
        for (name, d) in self.record.devices.iter_mut() {
            let view = self.views.get(name);
            let online = view.and_then(DeviceView::online) == Some(true);
            let reverting = matches!(d.status, DeviceStatus::Reverting);
            let digest = if reverting {
                d.revert_digest.as_deref()
            } else {
                Some(d.digest.as_str())
            };
            let progress = view
                .and_then(|v| v.state.as_ref())
                .zip(digest)
                .map(|(state, digest)| progress(state, digest, None));
            if let Some(Progress::Held(why)) = &progress {
                // Waiting for its update window or a module's lock: alive and saying why, so
                // never silent while it says so; its timeout counts from its last word.
                self.sent.insert(name.clone(), now_mono);
                if d.reason.as_deref() != Some(why) {
                    d.reason = Some(why.clone());
                    lines.push(format!("wave {}: {name}: waiting: {why}", d.wave));
                    self.dirty = true;
                }
            }
            let next = match &progress {
                Some(p) if reverting => plan::judge_revert(p),
                Some(p) => plan::judge(d, p),
                None => None,
            };
            let next = next.or_else(|| {
                // Silent: online, in flight, and past the timeout since it was sent.
                let in_flight = matches!(d.status, DeviceStatus::Sent | DeviceStatus::Reverting);
                let overdue = self
                    .sent
                    .get(name)
                    .is_some_and(|t| now_mono.duration_since(*t) >= timeout);
                (in_flight && online && overdue).then(|| {
                    let status = if reverting {
                        DeviceStatus::RevertFailed
                    } else {
                        DeviceStatus::Silent
                    };
                    (
                        status,
                        Some(format!(
                            "no final report within {} s of being sent it",
                            timeout.as_secs()
                        )),
                    )
                })
            });
            if let Some((status, reason)) = next {
                d.status = status;
                // A device reverted after it failed keeps the failure's reason.
                if reason.is_some() || status != DeviceStatus::Reverted {
                    d.reason = reason;
                }
                d.settled_at = Some(now());
                self.sent.remove(name);
                lines.push(format!(
                    "wave {}: {name}: {}{} ({:.1} s)",
                    d.wave,
                    status.name(),
                    d.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default(),
                    self.started.elapsed().as_secs_f64()
                ));
                self.dirty = true;
            }
        }
        for l in lines {
            say(&self.record, &l);
        }
    }

    fn offline(&self, device: &str) -> bool {
        self.views.get(device).and_then(DeviceView::online) != Some(true)
    }

    /// Sends the current wave when it has not been, moves to the next when it has settled
    /// (and baked); `true` when every wave is done.
    async fn advance(&mut self) -> Result<bool> {
        // A wave that settles sends the next one at once, not at the next message.
        loop {
            if !self.advance_once().await? {
                return Ok(false);
            }
            if self.record.current_wave >= self.record.waves.len() {
                return Ok(true);
            }
        }
    }

    /// One step of [`Runner::advance`]: `true` when the current wave finished.
    async fn advance_once(&mut self) -> Result<bool> {
        let wave = self.record.current_wave;
        if wave >= self.record.waves.len() {
            return Ok(true);
        }
        let pending: Vec<String> = self.record.waves[wave]
            .devices
            .iter()
            .filter(|d| {
                self.record
                    .devices
                    .get(*d)
                    .is_some_and(|r| r.status == DeviceStatus::Pending)
            })
            .cloned()
            .collect();
        if !pending.is_empty() {
            self.send_wave(wave, &pending).await?;
            return Ok(false);
        }
        let settled = {
            let views = &self.views;
            self.record.wave_settled(wave, |d| {
                views.get(d).and_then(DeviceView::online) != Some(true)
            })
        };
        if !settled {
            return Ok(false);
        }
        let bake = Duration::from_secs(self.record.policy.bake_secs);
        if !bake.is_zero() {
            match self.bake_until {
                None => {
                    self.bake_until = Some(Instant::now() + bake);
                    say(
                        &self.record,
                        &format!("wave {wave} settled; watching it for {} s", bake.as_secs()),
                    );
                    return Ok(false);
                }
                Some(t) if Instant::now() < t => return Ok(false),
                Some(_) => {}
            }
        }
        self.bake_until = None;
        let t = self.record.tally(Some(wave));
        let offline: Vec<&String> = self.record.waves[wave]
            .devices
            .iter()
            .filter(|d| self.record.devices[*d].status == DeviceStatus::Sent && self.offline(d))
            .collect();
        say(
            &self.record,
            &format!(
                "wave {wave} done: {} applied, {} failed{} ({:.1} s)",
                t.applied,
                t.failed,
                if offline.is_empty() {
                    String::new()
                } else {
                    format!(", {} offline", offline.len())
                },
                self.started.elapsed().as_secs_f64()
            ),
        );
        self.record.waves[wave].finished_at = Some(now());
        self.record.current_wave += 1;
        self.dirty = true;
        Ok(true)
    }

    async fn send_wave(&mut self, wave: usize, devices: &[String]) -> Result<()> {
        let total = self.record.waves.len();
        say(
            &self.record,
            &format!(
                "wave {wave} of {}: sending {} v{} to {} device{}",
                total,
                self.record.deployment,
                self.record.version,
                devices.len(),
                if devices.len() == 1 { "" } else { "s" }
            ),
        );
        if self.record.waves[wave].started_at.is_none() {
            self.record.waves[wave].started_at = Some(now());
        }
        for device in devices {
            let Some(staged) = self.staged.get(device) else {
                bail!(
                    "the rollout's message for {device} is missing on the broker ({}); it cannot be sent",
                    store::device_topic(&self.prefix, &self.record.id, device)
                );
            };
            let topic = topics::device_topic(&self.prefix, device, "deployment");
            let wire = staged.deployment.wire.clone().into_bytes();
            self.op
                .publish_collecting(&topic, true, wire, &mut self.inbox)
                .await?;
            if let Some(d) = self.record.devices.get_mut(device) {
                d.status = DeviceStatus::Sent;
                d.sent_at = Some(now());
            }
            self.sent.insert(device.clone(), Instant::now());
        }
        self.dirty = true;
        self.save(true).await
    }

    /// Sends every device that was sent the deployment its revert, and follows them until
    /// they settle. The record ends `reverted`.
    pub async fn revert(&mut self, stop: tokio_util::sync::CancellationToken) -> Result<u8> {
        if self.views.is_empty() {
            self.follow().await?;
        }
        self.record.owner = Some(self.me.clone());
        self.record.status = Status::Reverting;
        let targets: Vec<String> = self
            .record
            .devices
            .iter()
            .filter(|(_, d)| !matches!(d.status, DeviceStatus::Pending | DeviceStatus::Reverted))
            .map(|(name, _)| name.clone())
            .collect();
        say(
            &self.record,
            &format!(
                "reverting {} devices to their previous deployment",
                targets.len()
            ),
        );
        for device in &targets {
            let Some(staged) = self.staged.get(device) else {
                continue;
            };
            let revert: &stage::Message = &staged.revert;
            let topic = topics::device_topic(&self.prefix, device, "deployment");
            self.op
                .publish_collecting(
                    &topic,
                    true,
                    revert.wire.clone().into_bytes(),
                    &mut self.inbox,
                )
                .await?;
            // `targets` came from the record's own devices.
            let Some(d) = self.record.devices.get_mut(device) else {
                continue;
            };
            d.revert_digest = revert.digest.clone();
            if revert.digest.is_some() {
                d.status = DeviceStatus::Reverting;
                self.sent.insert(device.clone(), Instant::now());
            } else {
                // A withdrawal: the device falls back to its group's deployment, which is not
                // this rollout's to follow.
                d.status = DeviceStatus::Reverted;
                d.reason =
                    Some("withdrawn: the device falls back to its group's deployment".into());
            }
        }
        self.dirty = true;
        self.save(true).await?;
        loop {
            if let Some(code) = self.absorb().await? {
                return Ok(code);
            }
            let waiting = self
                .record
                .devices
                .iter()
                .filter(|(name, d)| d.status == DeviceStatus::Reverting && !self.offline(name))
                .count();
            if waiting == 0 {
                let t = self.record.tally(None);
                self.record.status = Status::Reverted;
                let failed = self
                    .record
                    .devices
                    .values()
                    .filter(|d| d.status == DeviceStatus::RevertFailed)
                    .count();
                say(
                    &self.record,
                    &format!(
                        "reverted: {} devices back on their previous deployment, {failed} not{}",
                        t.reverted - failed,
                        if t.in_flight > 0 {
                            format!(", {} offline (they get it when they connect)", t.in_flight)
                        } else {
                            String::new()
                        }
                    ),
                );
                self.save(true).await?;
                return Ok(if failed > 0 { EXIT_REFUSED } else { 0 });
            }
            self.save(false).await?;
            let deadline = Instant::now() + Duration::from_millis(1000);
            tokio::select! {
                _ = stop.cancelled() => {
                    self.save(true).await?;
                    say(&self.record, "stopped while reverting; `outpost-ctl rollout revert` goes on");
                    return Ok(EXIT_TIMEOUT);
                }
                m = self.op.recv_until(deadline) => if let Some(m) = m? { self.inbox.push(m) },
            }
        }
    }

    /// Publishes the record when it changed (at most every [`SAVE_EVERY`]) or its heartbeat is
    /// due; `now` publishes a change at once.
    async fn save(&mut self, now_: bool) -> Result<()> {
        let since_save = self.last_save.elapsed();
        let heartbeat_due = self.last_heartbeat.elapsed() >= HEARTBEAT;
        if !(heartbeat_due || (self.dirty && (now_ || since_save >= SAVE_EVERY))) {
            return Ok(());
        }
        let at = now();
        self.me.heartbeat_at = at;
        self.record.owner = Some(self.me.clone());
        self.record.updated_at = at;
        let bytes = store::encode(&self.record)?;
        let topic = store::state_topic(&self.prefix, &self.record.id);
        self.op
            .publish_collecting(&topic, true, bytes, &mut self.inbox)
            .await?;
        self.dirty = false;
        self.last_save = Instant::now();
        self.last_heartbeat = self.last_save;
        Ok(())
    }

    /// Waits until the broker has everything published so far (before the process exits).
    pub async fn flush(&mut self) -> Result<()> {
        let seen = self.op.fence(Duration::from_secs(10)).await?;
        self.inbox.extend(seen);
        Ok(())
    }

    pub fn record(&self) -> &Record {
        &self.record
    }
}
