//! Metrics: sampling the device ([`DeviceSampler`]: CPU, memory, disk, temperature, load and
//! uptime from `/proc`, `/sys` and `statvfs`), rendering a [`Snapshot`] for the hub (its
//! `Serialize` form, JSON with camelCase keys) and as Prometheus text ([`render_prometheus`]),
//! and serving that text on loopback ([`serve_prometheus`]).
//!
//! Sampling never fails: a file the platform does not have, or one that cannot be read or
//! parsed, gives `None` (or 0 for sizes), so a board without thermal zones or with an unusual
//! kernel still reports everything else.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// The reasons the outbox drops records for; each is always rendered, at 0 until it happens.
pub const DROP_REASONS: [&str; 3] = ["expired", "full", "too-large"];

/// The device's resources at one moment.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMetrics {
    /// Busy share of all CPUs since the previous sample, 0 to 100; `None` on the first sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// CPUs online.
    pub cpu_count: usize,
    /// One-minute load average.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load1: Option<f64>,
    pub memory_total_bytes: u64,
    /// Memory available to new work without swapping (`MemAvailable`).
    pub memory_available_bytes: u64,
    /// The directory whose filesystem is measured: the agent's state directory.
    pub disk_path: String,
    pub disk_total_bytes: u64,
    /// Space available to unprivileged users (root's reserve excluded).
    pub disk_available_bytes: u64,
    /// The hottest thermal zone; `None` when the platform exposes none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
}

/// Aggregate CPU time from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is already
    /// counted in user and nice).
    total: u64,
    /// idle + iowait: time no task was running.
    idle: u64,
}

/// Samples the device; keeps the previous CPU reading because CPU use is a rate.
#[derive(Debug)]
pub struct DeviceSampler {
    /// The agent's state directory: the filesystem whose space is reported.
    state_dir: PathBuf,
    /// CPU times at the previous sample; `None` before the first.
    prev: Option<CpuTimes>,
}

impl DeviceSampler {
    pub fn new(state_dir: impl Into<PathBuf>) -> DeviceSampler {
        DeviceSampler {
            state_dir: state_dir.into(),
            prev: None,
        }
    }

    /// Reads the device's state now. CPU use is measured since the previous call (`None` on the
    /// first). Blocking, but only a few small reads of `/proc` and `/sys` and one `statvfs`.
    pub fn sample(&mut self) -> DeviceMetrics {
        let stat = read("/proc/stat");
        let cpu = stat.as_deref().and_then(parse_cpu_times);
        let cpu_percent = match (self.prev, cpu) {
            (Some(prev), Some(now)) => cpu_percent(prev, now),
            _ => None,
        };
        // An unreadable sample keeps the older reading: the next delta just spans longer.
        if cpu.is_some() {
            self.prev = cpu;
        }
        let cpu_count = stat
            .as_deref()
            .map(parse_cpu_count)
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        let (memory_total_bytes, memory_available_bytes) = read("/proc/meminfo")
            .as_deref()
            .map_or((0, 0), parse_meminfo);
        let (disk_total_bytes, disk_available_bytes) =
            disk_space(&self.state_dir).unwrap_or((0, 0));
        DeviceMetrics {
            cpu_percent,
            cpu_count,
            load1: read("/proc/loadavg").as_deref().and_then(parse_loadavg),
            memory_total_bytes,
            memory_available_bytes,
            disk_path: self.state_dir.display().to_string(),
            disk_total_bytes,
            disk_available_bytes,
            temperature_celsius: hottest_zone(Path::new("/sys/class/thermal")),
            uptime_secs: read("/proc/uptime").as_deref().and_then(parse_uptime),
        }
    }
}

/// The agent's resident memory (`VmRSS` of `/proc/self/status`), for [`AgentMetrics::rss_bytes`].
pub fn agent_rss_bytes() -> Option<u64> {
    read("/proc/self/status").as_deref().and_then(parse_vm_rss)
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The aggregate `cpu` line of `/proc/stat`.
fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    let total = fields.iter().try_fold(0u64, |sum, f| sum.checked_add(*f))?;
    let idle = fields[3].checked_add(fields.get(4).copied().unwrap_or(0))?;
    Some(CpuTimes { total, idle })
}

/// The `cpuN` lines of `/proc/stat`: one per CPU online.
fn parse_cpu_count(stat: &str) -> usize {
    stat.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count()
}

/// Busy share of the time between two readings, 0 to 100; `None` when no time passed or the
/// counters went backwards (a reset, or a different machine's file).
fn cpu_percent(prev: CpuTimes, now: CpuTimes) -> Option<f64> {
    let total = now.total.checked_sub(prev.total)?;
    let idle = now.idle.checked_sub(prev.idle)?;
    if total == 0 {
        return None;
    }
    let busy = total.saturating_sub(idle);
    Some((busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0))
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes; 0 for either when missing.
/// This machine's architecture and total memory, for a deployment's `requires`.
pub fn device_facts() -> crate::policy::DeviceFacts {
    let (total, _) = read("/proc/meminfo").map_or((0, 0), |t| parse_meminfo(&t));
    crate::policy::DeviceFacts {
        arch: crate::manifest::Arch::current(),
        memory_mb: total / (1024 * 1024),
    }
}

fn parse_meminfo(text: &str) -> (u64, u64) {
    let (mut total, mut available) = (0, 0);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        *slot = parse_kb(value).unwrap_or(0);
    }
    (total, available)
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(parse_kb)
}

/// A `/proc` size such as `  16318412 kB`, in bytes.
fn parse_kb(value: &str) -> Option<u64> {
    let mut parts = value.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match (parts.next(), parts.next()) {
        (Some("kB"), None) => n.checked_mul(1024),
        (None, None) => Some(n),
        _ => None,
    }
}

/// The one-minute load average, the first field of `/proc/loadavg`.
fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// Whole seconds since boot, the first field of `/proc/uptime`.
fn parse_uptime(text: &str) -> Option<u64> {
    let secs = text
        .split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)?;
    // Finite and not negative: the cast only drops the fraction (and saturates past u64::MAX).
    Some(secs as u64)
}

/// A thermal zone's `temp` (millidegrees Celsius), in degrees.
fn parse_millidegrees(text: &str) -> Option<f64> {
    text.trim()
        .parse::<i64>()
        .ok()
        .map(|milli| milli as f64 / 1000.0)
}

/// The highest temperature among `thermal_zone*/temp` under `thermal` (`/sys/class/thermal`);
/// `None` when there is no zone or none can be read (some report an error while a sensor is
/// off).
fn hottest_zone(thermal: &Path) -> Option<f64> {
    std::fs::read_dir(thermal)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("thermal_zone"))
        })
        .filter_map(|e| {
            read(e.path().join("temp"))
                .as_deref()
                .and_then(parse_millidegrees)
        })
        .reduce(f64::max)
}

/// Total and available bytes of the filesystem holding `path`; `None` when it cannot be
/// measured (the path does not exist yet, for one).
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let fs = rustix::fs::statvfs(path).ok()?;
    Some((
        fs.f_blocks.saturating_mul(fs.f_frsize),
        fs.f_bavail.saturating_mul(fs.f_frsize),
    ))
}

/// One module's state and resource use.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleMetrics {
    /// The module's status as reported (`running`, `exited`, ...).
    pub status: String,
    /// CPU use in percent of one CPU: a module busy on two CPUs shows 200.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Memory in use, page cache that can be reclaimed excluded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The container's memory limit (the host's memory when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// Restarts by the agent.
    pub restarts: u32,
}

/// The agent's own health: memory, outbox, hub link, local bus and deployments.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentMetrics {
    pub version: String,
    /// Resident memory ([`agent_rss_bytes`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Records waiting in the outbox.
    pub outbox_records: u64,
    /// Bytes waiting in the outbox.
    pub outbox_bytes: u64,
    /// The outbox's size limit.
    pub outbox_max_bytes: u64,
    /// Records put in the outbox since it was created (kept in the outbox file).
    pub enqueued_total: u64,
    /// Records the hub acknowledged since the outbox was created.
    pub delivered_total: u64,
    /// Records dropped since the outbox was created, by reason (see [`DROP_REASONS`]).
    pub dropped_total: BTreeMap<String, u64>,
    pub hub_connected: bool,
    pub hub_reconnects_total: u64,
    /// Clients connected to the local bus now.
    pub bus_clients: u64,
    /// Connections, publishes and subscriptions the local bus refused since the agent started.
    pub bus_refused_total: u64,
    /// Messages modules published on the bus since the agent started.
    pub bus_received_total: u64,
    /// Messages routed to a module input that was not connected or could not keep up.
    pub bus_dropped_total: u64,
    /// Deployments applied since the agent started: the count of `deployment_secs_sum`.
    pub deployments_total: u64,
    /// How long the last deployment took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_deployment_secs: Option<f64>,
    /// Time all deployments took, in seconds.
    pub deployment_secs_sum: f64,
}

/// Everything measured at one moment: what goes to the hub and to Prometheus.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub device_id: String,
    /// When the snapshot was taken, in Unix milliseconds.
    pub ts: u64,
    pub device: DeviceMetrics,
    /// By module name.
    pub modules: BTreeMap<String, ModuleMetrics>,
    pub agent: AgentMetrics,
}

/// The snapshot in the Prometheus text exposition format 0.0.4. Every sample carries a
/// `device` label; a value that is `None` is left out (with its `HELP` and `TYPE` when it was the
/// family's only sample).
pub fn render_prometheus(s: &Snapshot) -> String {
    let mut e = Exposition {
        out: String::with_capacity(4096),
        device: &s.device_id,
    };
    let d = &s.device;
    e.gauge(
        "outpost_device_cpu_percent",
        "Busy share of all CPUs since the previous sample, in percent.",
        d.cpu_percent.map(Value::Float),
    );
    e.gauge(
        "outpost_device_cpu_count",
        "CPUs online.",
        Some(Value::from_usize(d.cpu_count)),
    );
    e.gauge(
        "outpost_device_load1",
        "One-minute load average.",
        d.load1.map(Value::Float),
    );
    e.gauge(
        "outpost_device_memory_total_bytes",
        "Physical memory.",
        Some(Value::Int(d.memory_total_bytes)),
    );
    e.gauge(
        "outpost_device_memory_available_bytes",
        "Memory available without swapping (MemAvailable).",
        Some(Value::Int(d.memory_available_bytes)),
    );
    let path = || vec![("path", d.disk_path.as_str())];
    e.family(
        "outpost_device_disk_total_bytes",
        Kind::Gauge,
        "Size of the filesystem holding the agent's state.",
        [(path(), Some(Value::Int(d.disk_total_bytes)))],
    );
    e.family(
        "outpost_device_disk_available_bytes",
        Kind::Gauge,
        "Space available to unprivileged users on the filesystem holding the agent's state.",
        [(path(), Some(Value::Int(d.disk_available_bytes)))],
    );
    e.gauge(
        "outpost_device_temperature_celsius",
        "Temperature of the hottest thermal zone.",
        d.temperature_celsius.map(Value::Float),
    );
    e.gauge(
        "outpost_device_uptime_seconds",
        "Time since the device booted.",
        d.uptime_secs.map(Value::Int),
    );

    let modules = &s.modules;
    e.family(
        "outpost_module_status",
        Kind::Gauge,
        "The module's status, as the value 1 on its status label.",
        modules.iter().map(|(name, m)| {
            (
                vec![("module", name.as_str()), ("status", m.status.as_str())],
                Some(Value::Int(1)),
            )
        }),
    );
    e.family(
        "outpost_module_cpu_percent",
        Kind::Gauge,
        "CPU use of the module, in percent of one CPU.",
        modules
            .iter()
            .map(|(name, m)| (module_label(name), m.cpu_percent.map(Value::Float))),
    );
    e.family(
        "outpost_module_memory_bytes",
        Kind::Gauge,
        "Memory the module uses, reclaimable page cache excluded.",
        modules
            .iter()
            .map(|(name, m)| (module_label(name), m.memory_bytes.map(Value::Int))),
    );
    e.family(
        "outpost_module_memory_limit_bytes",
        Kind::Gauge,
        "The module's memory limit (the host's memory when it has none).",
        modules
            .iter()
            .map(|(name, m)| (module_label(name), m.memory_limit_bytes.map(Value::Int))),
    );
    e.family(
        "outpost_module_restarts_total",
        Kind::Counter,
        "Restarts of the module by the agent.",
        modules
            .iter()
            .map(|(name, m)| (module_label(name), Some(Value::Int(u64::from(m.restarts))))),
    );

    let a = &s.agent;
    e.family(
        "outpost_agent_info",
        Kind::Gauge,
        "The agent's version, as the value 1 on its version label.",
        [(vec![("version", a.version.as_str())], Some(Value::Int(1)))],
    );
    e.gauge(
        "outpost_agent_rss_bytes",
        "Resident memory of the agent.",
        a.rss_bytes.map(Value::Int),
    );
    e.gauge(
        "outpost_outbox_records",
        "Records waiting in the outbox.",
        Some(Value::Int(a.outbox_records)),
    );
    e.gauge(
        "outpost_outbox_bytes",
        "Bytes waiting in the outbox.",
        Some(Value::Int(a.outbox_bytes)),
    );
    e.gauge(
        "outpost_outbox_max_bytes",
        "The outbox's size limit.",
        Some(Value::Int(a.outbox_max_bytes)),
    );
    e.counter(
        "outpost_outbox_enqueued_total",
        "Records put in the outbox.",
        a.enqueued_total,
    );
    e.counter(
        "outpost_outbox_delivered_total",
        "Records the hub acknowledged.",
        a.delivered_total,
    );
    let mut dropped: BTreeMap<&str, u64> = DROP_REASONS.iter().map(|r| (*r, 0)).collect();
    dropped.extend(a.dropped_total.iter().map(|(r, n)| (r.as_str(), *n)));
    e.family(
        "outpost_outbox_dropped_total",
        Kind::Counter,
        "Records dropped from the outbox, by reason.",
        dropped
            .into_iter()
            .map(|(reason, n)| (vec![("reason", reason)], Some(Value::Int(n)))),
    );
    e.gauge(
        "outpost_hub_connected",
        "1 while the telemetry link to the hub is up, else 0.",
        Some(Value::Int(u64::from(a.hub_connected))),
    );
    e.counter(
        "outpost_hub_reconnects_total",
        "Reconnections of the telemetry link to the hub.",
        a.hub_reconnects_total,
    );
    e.gauge(
        "outpost_bus_clients",
        "Clients connected to the local bus.",
        Some(Value::Int(a.bus_clients)),
    );
    e.counter(
        "outpost_bus_refused_total",
        "Connections, publishes and subscriptions the local bus refused.",
        a.bus_refused_total,
    );
    e.counter(
        "outpost_bus_received_total",
        "Messages modules published on the local bus.",
        a.bus_received_total,
    );
    e.counter(
        "outpost_bus_dropped_total",
        "Messages routed to a module input that was not connected or could not keep up.",
        a.bus_dropped_total,
    );
    e.gauge(
        "outpost_deployment_last_seconds",
        "How long the last deployment took.",
        a.last_deployment_secs.map(Value::Float),
    );
    e.header(
        "outpost_deployment_seconds",
        Kind::Summary,
        "How long deployments took.",
    );
    e.sample(
        "outpost_deployment_seconds_sum",
        &[],
        Value::Float(a.deployment_secs_sum),
    );
    e.sample(
        "outpost_deployment_seconds_count",
        &[],
        Value::Int(a.deployments_total),
    );
    e.out
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Summary => "summary",
        }
    }
}

/// A sample's value: integers stay exact (an `f64` is not past 2^53).
#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    fn from_usize(n: usize) -> Value {
        Value::Int(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v.is_infinite() => {
                f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
            }
            // Rust prints finite floats without an exponent, which Prometheus parses.
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// A label value with `\`, `"` and newlines escaped.
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Labels of a sample besides `device`.
type Labels<'a> = Vec<(&'static str, &'a str)>;

fn module_label(name: &str) -> Labels<'_> {
    vec![("module", name)]
}

/// The text being written. `write!` to a `String` cannot fail, so its results are ignored.
struct Exposition<'a> {
    out: String,
    device: &'a str,
}

impl Exposition<'_> {
    /// One metric family; nothing at all when every value is `None`.
    fn family<'v>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        samples: impl IntoIterator<Item = (Labels<'v>, Option<Value>)>,
    ) {
        let mut started = false;
        for (labels, value) in samples {
            let Some(value) = value else { continue };
            if !started {
                self.header(name, kind, help);
                started = true;
            }
            self.sample(name, &labels, value);
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: Option<Value>) {
        self.family(name, Kind::Gauge, help, [(Vec::new(), value)]);
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(
            name,
            Kind::Counter,
            help,
            [(Vec::new(), Some(Value::Int(value)))],
        );
    }

    /// `HELP` and `TYPE`; the help texts are constants without backslashes or newlines.
    fn header(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        let _ = write!(self.out, "{name}{{device=\"{}\"", Escaped(self.device));
        for (key, v) in labels {
            let _ = write!(self.out, ",{key}=\"{}\"", Escaped(v));
        }
        let _ = writeln!(self.out, "}} {value}");
    }
}

/// Largest request head read from a scraper.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a client has to send its request head, and then to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 8;
/// How long an answered connection keeps reading what the client still sends, and how much.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

const TEXT: &str = "text/plain; charset=utf-8";
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the latest rendered snapshot as `GET /metrics` on `listener` until `stop` is
/// cancelled, then waits for the connections being served (they end at once on `stop`).
/// Answers `503` until the first snapshot is published. The endpoint has no authentication:
/// bind the listener to loopback.
///
/// A minimal HTTP/1.1 server: one request per connection, then the connection is closed.
pub async fn serve_prometheus(
    listener: TcpListener,
    snapshot: watch::Receiver<Option<Arc<String>>>,
    stop: CancellationToken,
) {
    serve(listener, snapshot, stop, IO_TIMEOUT).await;
}

async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<Option<Arc<String>>>,
    stop: CancellationToken,
    io_timeout: Duration,
) {
    let tasks = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, most likely: pause rather than spin.
                        warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "metrics endpoint busy; connection closed");
                    continue;
                };
                let (snapshot, stop) = (snapshot.clone(), stop.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = connection(stream, snapshot, io_timeout) => if let Err(e) = r {
                            debug!(%peer, error = %e, "metrics connection failed");
                        },
                    }
                    drop(permit);
                });
            }
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// What a client sent before the server stopped reading.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Everything up to and including the empty line that ends the head.
    Complete(Vec<u8>),
    /// The client closed before sending anything.
    Empty,
    /// The client closed in the middle of the head.
    Truncated,
    TooLarge,
}

async fn connection(
    mut stream: TcpStream,
    snapshot: watch::Receiver<Option<Arc<String>>>,
    io_timeout: Duration,
) -> io::Result<()> {
    let response = match tokio::time::timeout(io_timeout, read_head(&mut stream)).await {
        Err(_) => error("408 Request Timeout", false),
        Ok(head) => match head? {
            Head::Empty => return Ok(()),
            Head::Truncated => error("400 Bad Request", false),
            Head::TooLarge => error("431 Request Header Fields Too Large", false),
            Head::Complete(head) => {
                // Cloned out at once: the borrow must not live across an await.
                let text = snapshot.borrow().clone();
                respond(&head, text.as_deref().map(String::as_str))
            }
        },
    };
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(io_timeout, write)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    // Closing with input unread (a request body, the rest of an oversized head) makes the
    // kernel send a reset, which can destroy the answer before the client has read it: read and
    // discard what still comes, for a moment, until the client closes.
    let linger = async {
        let mut sink = [0u8; 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
    Ok(())
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut line_start = 0;
    loop {
        let room = (MAX_HEAD_BYTES - head.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(if head.is_empty() {
                Head::Empty
            } else {
                Head::Truncated
            });
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head, &mut line_start) {
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() >= MAX_HEAD_BYTES {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the head ends (just past its first empty line, `\r\n` or bare `\n`), scanning from
/// `*from`, the start of the first line not yet complete, which is left there for the next call.
fn head_end(bytes: &[u8], from: &mut usize) -> Option<usize> {
    while let Some(nl) = bytes[*from..].iter().position(|&b| b == b'\n') {
        let line = &bytes[*from..*from + nl];
        let next = *from + nl + 1;
        if line.is_empty() || line == b"\r" {
            return Some(next);
        }
        *from = next;
    }
    None
}

/// The whole response to a complete request head, given the rendered snapshot if there is one.
fn respond(head: &[u8], metrics: Option<&str>) -> Vec<u8> {
    let Some((method, path)) = request_line(head) else {
        return error("400 Bad Request", false);
    };
    let head_only = method == "HEAD";
    if path != "/metrics" {
        return error("404 Not Found", head_only);
    }
    if method != "GET" && !head_only {
        let status = "405 Method Not Allowed";
        return response(
            status,
            TEXT,
            "Allow: GET, HEAD\r\n",
            &format!("{status}\n"),
            false,
        );
    }
    match metrics {
        Some(text) => response("200 OK", EXPOSITION, "", text, head_only),
        None => error("503 Service Unavailable", head_only),
    }
}

/// Method and path (query left out) of a request line `METHOD /target HTTP/1.x`.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(is_tchar)
        && target.starts_with('/')
        && !target.bytes().any(|b| b.is_ascii_control())
        && matches!(version, "HTTP/1.0" | "HTTP/1.1");
    if !valid {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Some((method, path))
}

/// A character allowed in an HTTP token such as a method (RFC 9110, 5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn error(status: &str, head_only: bool) -> Vec<u8> {
    response(status, TEXT, "", &format!("{status}\n"), head_only)
}

/// `extra_headers` are whole lines, each ending in `\r\n`. `head_only` answers `HEAD`: the
/// headers describe the body, which is left out.
fn response(
    status: &str,
    content_type: &str,
    extra_headers: &str,
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {extra_headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn cpu_times_from_proc_stat() {
        let stat = "cpu  100 5 50 800 20 3 2 1 7 0\n\
                    cpu0 50 2 25 400 10 1 1 0 3 0\n\
                    cpu1 50 3 25 400 10 2 1 1 4 0\n\
                    intr 12345\nctxt 999\n";
        // Guest time (7, 0) is already in user and nice: not added again.
        assert_eq!(
            parse_cpu_times(stat),
            Some(CpuTimes {
                total: 981,
                idle: 820
            })
        );
        assert_eq!(parse_cpu_count(stat), 2);
        // Old kernels: four fields only.
        assert_eq!(
            parse_cpu_times("cpu 1 2 3 4\n"),
            Some(CpuTimes { total: 10, idle: 4 })
        );
    }

    #[test]
    fn cpu_times_malformed() {
        for bad in [
            "",
            "cpu\n",
            "cpu 1 2 3\n",
            "cpu 1 2 x 4\n",
            "cpu0 1 2 3 4\n",
            "cpu -1 2 3 4\n",
            "cpu 18446744073709551615 1 0 0\n",
            "\u{0}\u{ffff}",
        ] {
            assert_eq!(parse_cpu_times(bad), None, "{bad:?}");
        }
        assert_eq!(parse_cpu_count("garbage\ncpux 1\n"), 0);
    }

    #[test]
    fn cpu_percent_is_busy_over_total() {
        let a = CpuTimes {
            total: 1000,
            idle: 800,
        };
        let b = CpuTimes {
            total: 1200,
            idle: 950,
        };
        assert_eq!(cpu_percent(a, b), Some(25.0));
        assert_eq!(cpu_percent(a, a), None);
        assert_eq!(cpu_percent(b, a), None);
        // Idle grew more than total: a bogus reading is clamped, not negative.
        let c = CpuTimes {
            total: 1100,
            idle: 950,
        };
        assert_eq!(cpu_percent(a, c), Some(0.0));
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:        3884360 kB\nMemFree:          123456 kB\n\
                    MemAvailable:    2000000 kB\nBuffers:           1000 kB\n";
        assert_eq!(parse_meminfo(text), (3_884_360 * 1024, 2_000_000 * 1024));
        assert_eq!(parse_meminfo(""), (0, 0));
        assert_eq!(
            parse_meminfo("MemTotal: lots kB\nMemAvailable: 1 MB\n"),
            (0, 0)
        );
        assert_eq!(parse_meminfo("MemTotal: 99999999999999999999 kB\n"), (0, 0));
        assert_eq!(parse_meminfo("MemTotal 12 kB\nMemAvailable: 7\n"), (0, 7));
    }

    #[test]
    fn vm_rss() {
        let status = "Name:\toutpost\nVmPeak:\t   20000 kB\nVmRSS:\t    8192 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(8192 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\n"), None);
        assert!(agent_rss_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn loadavg_uptime_and_temperature() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/389 12345\n"), Some(0.52));
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("NaN 1 1"), None);
        assert_eq!(parse_loadavg("-1 1 1"), None);
        assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350_735));
        assert_eq!(parse_uptime("inf 1"), None);
        assert_eq!(parse_uptime("x"), None);
        assert_eq!(parse_millidegrees("47500\n"), Some(47.5));
        assert_eq!(parse_millidegrees("-5000"), Some(-5.0));
        assert_eq!(parse_millidegrees(""), None);
        assert_eq!(parse_millidegrees("47.5"), None);
    }

    #[test]
    fn hottest_thermal_zone() {
        let dir = tempfile::tempdir().unwrap();
        let zone = |name: &str, temp: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("temp"), temp).unwrap();
        };
        assert_eq!(hottest_zone(dir.path()), None);
        zone("thermal_zone0", "41000\n");
        zone("thermal_zone1", "58250\n");
        zone("thermal_zone2", "garbage\n");
        zone("cooling_device0", "99000\n");
        std::fs::create_dir(dir.path().join("thermal_zone3")).unwrap();
        assert_eq!(hottest_zone(dir.path()), Some(58.25));
        assert_eq!(hottest_zone(&dir.path().join("missing")), None);
    }

    #[test]
    fn sampler_reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = DeviceSampler::new(dir.path());
        let first = sampler.sample();
        assert_eq!(first.cpu_percent, None);
        assert!(first.cpu_count > 0);
        assert!(first.memory_total_bytes > 0);
        assert!(first.memory_available_bytes <= first.memory_total_bytes);
        assert!(first.disk_total_bytes > 0);
        assert!(first.disk_available_bytes <= first.disk_total_bytes);
        assert_eq!(first.disk_path, dir.path().display().to_string());
        assert!(first.uptime_secs.is_some());
        std::thread::sleep(Duration::from_millis(100));
        let second = sampler.sample();
        let cpu = second.cpu_percent.unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");

        let mut gone = DeviceSampler::new(dir.path().join("not-yet"));
        let m = gone.sample();
        assert_eq!((m.disk_total_bytes, m.disk_available_bytes), (0, 0));
    }

    fn snapshot() -> Snapshot {
        let module = |status: &str, cpu, mem| ModuleMetrics {
            status: status.into(),
            cpu_percent: cpu,
            memory_bytes: mem,
            memory_limit_bytes: mem.map(|_| 512 << 20),
            restarts: 2,
        };
        Snapshot {
            device_id: "pump-7".into(),
            ts: 1_795_787_401_000,
            device: DeviceMetrics {
                cpu_percent: Some(12.5),
                cpu_count: 4,
                load1: Some(0.25),
                memory_total_bytes: 4 << 30,
                memory_available_bytes: 3 << 30,
                disk_path: "/var/lib/outpost".into(),
                disk_total_bytes: 32 << 30,
                disk_available_bytes: 20 << 30,
                temperature_celsius: None,
                uptime_secs: Some(3600),
            },
            modules: BTreeMap::from([
                (
                    "infer".to_string(),
                    module("running", Some(150.0), Some(64 << 20)),
                ),
                ("sensor".to_string(), module("exited", None, None)),
            ]),
            agent: AgentMetrics {
                version: "0.1.0".into(),
                rss_bytes: Some(9 << 20),
                outbox_records: 3,
                outbox_bytes: 900,
                outbox_max_bytes: 64 << 20,
                enqueued_total: 100,
                delivered_total: 97,
                dropped_total: BTreeMap::from([("full".to_string(), 4)]),
                hub_connected: true,
                hub_reconnects_total: 1,
                bus_clients: 2,
                bus_refused_total: 0,
                bus_received_total: 0,
                bus_dropped_total: 0,
                deployments_total: 2,
                last_deployment_secs: Some(4.5),
                deployment_secs_sum: 12.25,
            },
        }
    }

    #[derive(Debug, PartialEq)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A strict reader of the text format: panics on anything it does not expect.
    fn parse_exposition(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'));
        let mut help = BTreeSet::new();
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut finished = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap();
                assert!(!text.is_empty());
                assert!(help.insert(name.to_string()), "second HELP for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(help.contains(name), "TYPE before HELP for {name}");
                assert!(["gauge", "counter", "summary"].contains(&kind));
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
                assert!(types.insert(name.into(), kind.into()).is_none());
                if let Some(prev) = current.replace(name.to_string()) {
                    finished.insert(prev);
                }
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let sample = parse_sample(line);
            let family = types
                .keys()
                .find(|f| {
                    sample.name == **f
                        || (types[*f] == "summary"
                            && [format!("{f}_sum"), format!("{f}_count")].contains(&sample.name))
                })
                .unwrap_or_else(|| panic!("{} has no HELP and TYPE before it", sample.name));
            assert_eq!(
                Some(family),
                current.as_ref(),
                "{line}: family not contiguous"
            );
            assert!(!finished.contains(family));
            samples.push(sample);
        }
        samples
    }

    fn parse_sample(line: &str) -> Sample {
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        assert!(
            name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name {name:?}"
        );
        let mut labels = BTreeMap::new();
        let mut rest = line[name_end..].chars().peekable();
        if rest.peek() == Some(&'{') {
            rest.next();
            loop {
                let key: String = rest.by_ref().take_while(|c| *c != '=').collect();
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                );
                assert_eq!(rest.next(), Some('"'));
                let mut value = String::new();
                loop {
                    match rest.next().unwrap() {
                        '"' => break,
                        '\\' => match rest.next().unwrap() {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => panic!("bad escape \\{other}"),
                        },
                        '\n' => panic!("raw newline in a label value"),
                        c => value.push(c),
                    }
                }
                assert!(labels.insert(key, value).is_none(), "repeated label");
                match rest.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("unexpected {other:?} in {line}"),
                }
            }
        }
        assert_eq!(rest.next(), Some(' '));
        let value: String = rest.collect();
        let value = match value.as_str() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value {v:?} in {line}")),
        };
        Sample {
            name: name.to_string(),
            labels,
            value,
        }
    }

    fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn prometheus_text_parses_back() {
        let s = snapshot();
        let text = render_prometheus(&s);
        let samples = parse_exposition(&text);
        for sample in &samples {
            assert_eq!(
                sample.labels.get("device").map(String::as_str),
                Some("pump-7")
            );
        }
        assert_eq!(
            value(&samples, "outpost_device_cpu_percent", None),
            Some(12.5)
        );
        assert_eq!(
            value(&samples, "outpost_device_memory_available_bytes", None),
            Some((3u64 << 30) as f64)
        );
        assert_eq!(
            value(
                &samples,
                "outpost_device_disk_total_bytes",
                Some(("path", "/var/lib/outpost"))
            ),
            Some((32u64 << 30) as f64)
        );
        // No thermal zone: no sample, and no HELP or TYPE either.
        assert!(!text.contains("temperature"));
        assert_eq!(
            value(
                &samples,
                "outpost_module_cpu_percent",
                Some(("module", "infer"))
            ),
            Some(150.0)
        );
        assert_eq!(
            value(
                &samples,
                "outpost_module_cpu_percent",
                Some(("module", "sensor"))
            ),
            None
        );
        assert_eq!(
            value(
                &samples,
                "outpost_module_restarts_total",
                Some(("module", "sensor"))
            ),
            Some(2.0)
        );
        let status = samples
            .iter()
            .find(|s| s.name == "outpost_module_status" && s.labels["module"] == "sensor")
            .unwrap();
        assert_eq!(status.labels["status"], "exited");
        assert_eq!(value(&samples, "outpost_outbox_records", None), Some(3.0));
        for (reason, n) in [("full", 4.0), ("expired", 0.0), ("too-large", 0.0)] {
            assert_eq!(
                value(
                    &samples,
                    "outpost_outbox_dropped_total",
                    Some(("reason", reason))
                ),
                Some(n)
            );
        }
        assert_eq!(value(&samples, "outpost_hub_connected", None), Some(1.0));
        assert_eq!(
            value(&samples, "outpost_hub_reconnects_total", None),
            Some(1.0)
        );
        assert_eq!(
            value(&samples, "outpost_deployment_seconds_sum", None),
            Some(12.25)
        );
        assert_eq!(
            value(&samples, "outpost_deployment_seconds_count", None),
            Some(2.0)
        );
        assert_eq!(
            value(&samples, "outpost_agent_info", Some(("version", "0.1.0"))),
            Some(1.0)
        );
    }

    #[test]
    fn prometheus_label_values_are_escaped() {
        let mut s = snapshot();
        s.device_id = "we\"ird\\dev\nice".into();
        let odd = "mod \"x\"\\\n{y}=,";
        s.modules.insert(odd.into(), ModuleMetrics::default());
        s.device.cpu_percent = Some(f64::NAN);
        s.device.load1 = Some(f64::INFINITY);
        let text = render_prometheus(&s);
        let samples = parse_exposition(&text);
        assert!(!samples.is_empty());
        for sample in &samples {
            assert_eq!(sample.labels["device"], s.device_id);
        }
        assert_eq!(
            value(
                &samples,
                "outpost_module_restarts_total",
                Some(("module", odd))
            ),
            Some(0.0)
        );
        assert!(
            value(&samples, "outpost_device_cpu_percent", None)
                .unwrap()
                .is_nan()
        );
        assert_eq!(
            value(&samples, "outpost_device_load1", None),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn prometheus_with_nothing_optional() {
        let s = Snapshot {
            device_id: "d".into(),
            ts: 0,
            device: DeviceMetrics::default(),
            modules: BTreeMap::new(),
            agent: AgentMetrics::default(),
        };
        let text = render_prometheus(&s);
        let samples = parse_exposition(&text);
        assert!(!text.contains("outpost_module_"));
        assert!(!text.contains("outpost_device_cpu_percent"));
        assert_eq!(
            value(&samples, "outpost_deployment_seconds_count", None),
            Some(0.0)
        );
    }

    #[test]
    fn json_for_the_hub() {
        let mut s = snapshot();
        s.device.cpu_percent = None;
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["deviceId"], "pump-7");
        assert_eq!(json["device"]["memoryAvailableBytes"], 3u64 << 30);
        assert!(json["device"].get("cpuPercent").is_none());
        assert!(json["device"].get("temperatureCelsius").is_none());
        assert_eq!(json["modules"]["infer"]["cpuPercent"], 150.0);
        assert!(json["modules"]["sensor"].get("memoryBytes").is_none());
        assert_eq!(json["agent"]["droppedTotal"]["full"], 4);
        assert_eq!(json["agent"]["lastDeploymentSecs"], 4.5);
    }

    #[test]
    fn head_end_across_reads() {
        let mut from = 0;
        let mut buf = b"GET /metrics HTTP/1.1\r\nHo".to_vec();
        assert_eq!(head_end(&buf, &mut from), None);
        assert_eq!(from, 23);
        buf.extend_from_slice(b"st: x\r\n\r");
        assert_eq!(head_end(&buf, &mut from), None);
        buf.extend_from_slice(b"\nbody");
        assert_eq!(head_end(&buf, &mut from), Some(buf.len() - 4));
        let mut from = 0;
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n", &mut from), Some(16));
    }

    #[test]
    fn requests_and_answers() {
        let status = |head: &[u8], metrics: Option<&str>| {
            let r = String::from_utf8(respond(head, metrics)).unwrap();
            r.split(' ').nth(1).unwrap().to_string()
        };
        let m = Some("a 1\n");
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\n\r\n", m), "200");
        assert_eq!(status(b"GET /metrics?x=1 HTTP/1.0\n\n", m), "200");
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\n\r\n", None), "503");
        assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n", m), "404");
        assert_eq!(status(b"POST /metrics HTTP/1.1\r\n\r\n", m), "405");
        assert_eq!(status(b"DELETE /metrics HTTP/1.1\r\n\r\n", m), "405");
        let garbage: [&[u8]; 10] = [
            b"\r\n\r\n",
            b"hello\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 x\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
            b"",
        ];
        for garbage in garbage {
            assert_eq!(status(garbage, m), "400", "{garbage:?}");
        }
        let head = String::from_utf8(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", m)).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("Content-Length: 4\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
        let not_allowed = String::from_utf8(respond(b"PUT /metrics HTTP/1.1\r\n\r\n", m)).unwrap();
        assert!(not_allowed.contains("Allow: GET, HEAD\r\n"));
    }

    struct Server {
        addr: SocketAddr,
        publish: watch::Sender<Option<Arc<String>>>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(io_timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (publish, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, rx, stop.clone(), io_timeout));
        Server {
            addr,
            publish,
            stop,
            task,
        }
    }

    /// Sends `request` and reads the answer until the server closes.
    async fn exchange(
        addr: SocketAddr,
        request: &[u8],
    ) -> (String, BTreeMap<String, String>, String) {
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().to_string();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_ascii_lowercase(), v.to_string())
            })
            .collect();
        (status, headers, body.to_string())
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let server = start(IO_TIMEOUT).await;
        let get = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";

        let (status, headers, _) = exchange(server.addr, get).await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(headers["connection"], "close");

        let text = render_prometheus(&snapshot());
        server.publish.send_replace(Some(Arc::new(text.clone())));
        let (status, headers, body) = exchange(server.addr, get).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(headers["content-length"], text.len().to_string());
        assert_eq!(headers["connection"], "close");
        assert_eq!(body, text);

        let (status, _, _) = exchange(server.addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, headers, _) = exchange(server.addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert_eq!(headers["allow"], "GET, HEAD");
        let (status, _, _) = exchange(server.addr, b"\x16\x03\x01\x02\x00\x01\n\n").await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD_BYTES + 100, b'a');
        let (status, _, _) = exchange(server.addr, &huge).await;
        assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");

        server.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn slow_client_times_out() {
        let server = start(Duration::from_millis(200)).await;
        let (status, _, _) = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert_eq!(status, "HTTP/1.1 408 Request Timeout");
        server.stop.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn stop_ends_open_connections() {
        let server = start(Duration::from_secs(60)).await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        idle.write_all(b"GET /met").await.unwrap();
        // Let the server accept it before stopping.
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .unwrap()
            .unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
