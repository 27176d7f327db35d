//! Devices on the hub (the broker itself is in [`crate::broker`]):
//!
//! - [`TestAgent`]: the real reconciler and store behind an `AgentHandle`, over the in-memory
//!   fake engine (the hub tests are about the link; the engine is covered by the e2e tests).
//! - [`Device`]: `outpost_agent::hub::run` with a device configuration file, and that agent.
//! - helpers to wait on reported state with a deadline (never fixed sleeps) and to run the
//!   `outpost` CLI in-process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use outpost_agent::control::{AgentHandle, REQUEST_CAPACITY, Request};
use outpost_agent::hub::HubError;
use outpost_agent::state::ReportedState;
use outpost_ctl::hub::Operator;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{Auth, Broker};

/// Sets up logging (once) and the crypto provider, as the binary does.
pub fn init() {
    outpost_agent::logging::init(
        outpost_agent::logging::LogFormat::Human,
        "warn,outpost_agent=info",
    );
    outpost_agent::hub::install_crypto_provider();
}

// ---------------------------------------------------------------- the agent behind the link

/// The **real reconciler** (and a real store in a temporary folder) behind the hub link, over
/// the in-memory fake engine (`outpost_agent::runtime::fake`): these are hub-path tests, and
/// the fake engine pulls any image at once and runs what it is asked to. Every offer that
/// crosses the control handle is recorded on its way, so tests can count deliveries.
pub struct TestAgent {
    pub offers: std::sync::Arc<std::sync::Mutex<Vec<(String, u64)>>>,
    /// The fake engine: tests print module log lines into it, crash containers, etc.
    pub engine: outpost_agent::runtime::fake::FakeRuntime,
    shutdown: CancellationToken,
    _store: tempfile::TempDir,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestAgent {
    pub fn spawn(device_id: &str) -> (AgentHandle, TestAgent) {
        use outpost_agent::reconciler::{Reconciler, Settings};
        let clock: outpost_agent::clock::SharedClock =
            std::sync::Arc::new(outpost_agent::clock::SystemClock::new());
        let engine = outpost_agent::runtime::fake::FakeRuntime::new(clock.clone());
        engine.serve_any_image();
        let dir = tempfile::tempdir().expect("store folder");
        let (store, _) = outpost_agent::store::Store::open(dir.path(), 0).expect("store opens");
        let parts = Reconciler::build(
            Settings::new(device_id, clock),
            std::sync::Arc::new(engine.clone()),
            store,
        )
        .expect("the reconciler builds");
        let shutdown = CancellationToken::new();
        tokio::spawn(parts.reconciler.run(parts.requests, shutdown.clone()));
        // The relay between the link and the reconciler records offers and forwards all.
        let (requests, mut rx) = mpsc::channel::<Request>(REQUEST_CAPACITY);
        let offers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (seen, inner, stop) = (
            offers.clone(),
            parts.handle.requests.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.recv() => match r { Some(r) => r, None => return },
                };
                if let Request::Offer { accepted, .. } = &request
                    && let Ok(mut o) = seen.lock()
                {
                    o.push((accepted.deployment.id.clone(), accepted.deployment.version));
                }
                if inner.send(request).await.is_err() {
                    return;
                }
            }
        });
        (
            AgentHandle {
                requests,
                state: parts.handle.state,
            },
            TestAgent {
                offers,
                engine,
                shutdown,
                _store: dir,
            },
        )
    }
}

// ---------------------------------------------------------------- a device

/// How a test device connects.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub id: String,
    pub groups: Vec<String>,
    /// Trust only this public key file (policy.trusted_keys); none trusts unsigned manifests.
    pub trusted_key: Option<PathBuf>,
    /// The password the device uses on a password broker; default the right one.
    pub password: Option<String>,
    /// The CA file the device trusts; default the broker's CA.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key; default the test CA's client certificate on a mutual-TLS
    /// broker.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

impl DeviceOptions {
    pub fn new(id: &str) -> DeviceOptions {
        DeviceOptions {
            id: id.into(),
            groups: vec![],
            trusted_key: None,
            password: None,
            ca_file: None,
            client_auth: None,
        }
    }
}

/// The hub link of one device, running against the real reconciler over the fake engine.
pub struct Device {
    pub id: String,
    pub handle: AgentHandle,
    pub agent: TestAgent,
    pub config: outpost_agent::config::Config,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), HubError>>>,
}

/// Writes the device configuration file for `broker` into `dir`.
pub fn device_config(
    broker: &Broker,
    dir: &Path,
    o: &DeviceOptions,
) -> Result<outpost_agent::config::Config> {
    let dir = dir.join(&o.id);
    std::fs::create_dir_all(&dir)?;
    let mut text = format!(
        "device_id = \"{}\"\nstate_dir = \"{}\"\n[hub]\nurl = \"{}\"\nreconnect_max_secs = 1\nkeep_alive_secs = 5\ngroups = [{}]\n",
        o.id,
        dir.join("state").display(),
        broker.device_url(),
        o.groups
            .iter()
            .map(|g| format!("\"{g}\""))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if broker.auth != Auth::Plain {
        text.push_str(&format!(
            "ca_file = \"{}\"\n",
            o.ca_file.as_ref().unwrap_or(&broker.pki.ca).display()
        ));
    }
    let client_auth = o.client_auth.clone().or_else(|| {
        (broker.auth == Auth::MutualTls).then(|| {
            (
                broker.pki.client_cert.clone(),
                broker.pki.client_key.clone(),
            )
        })
    });
    if let Some((cert, key)) = client_auth {
        text.push_str(&format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    if let Some((username, password)) = &broker.login {
        let file = dir.join("hub-password");
        let password = o.password.as_ref().unwrap_or(password);
        std::fs::write(&file, format!("{password}\n"))?;
        text.push_str(&format!(
            "username = \"{username}\"\npassword_file = \"{}\"\n",
            file.display()
        ));
    }
    if let Some(key) = &o.trusted_key {
        // The fake engine's images are named by tag; that a device with keys takes images
        // pinned by digest only is tested in `policy::tests` and, on the real engine and
        // registry, in `tests/full_stack.rs`.
        text.push_str(&format!(
            "[policy]\ntrusted_keys = [\"{}\"]\nallow_image_tags = true\n",
            key.display()
        ));
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text)?;
    Ok(outpost_agent::config::Config::load(
        &path,
        std::iter::empty(),
    )?)
}

impl Device {
    /// Starts the hub link of a device with the real reconciler over the fake engine.
    pub fn start(broker: &Broker, dir: &Path, o: &DeviceOptions) -> Result<Device> {
        let config = device_config(broker, dir, o)?;
        let (handle, agent) = TestAgent::spawn(&o.id);
        let shutdown = CancellationToken::new();
        let task = {
            let config = config.clone();
            let handle = handle.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { outpost_agent::hub::run(&config, handle, shutdown).await })
        };
        Ok(Device {
            id: o.id.clone(),
            handle,
            agent,
            config,
            shutdown,
            task: Some(task),
        })
    }

    /// Asks the link to stop and waits for it; returns how it ended.
    pub async fn stop(&mut self) -> Result<(), HubError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(Ok(result)) => result,
                Ok(Err(join)) => panic!("hub link task panicked: {join}"),
                Err(_) => panic!("hub link did not stop within 10 s"),
            },
            None => Ok(()),
        }
    }

    /// Ends the link abruptly, as a crash or a power cut would: its connection closes without
    /// a goodbye, so the broker publishes the last will.
    pub fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Waits for the link to end by itself (e.g. a configuration error at start-up).
    pub async fn ended(&mut self, within: Duration) -> Option<Result<(), HubError>> {
        let task = self.task.as_mut()?;
        match tokio::time::timeout(within, task).await {
            Ok(Ok(result)) => {
                self.task = None;
                Some(result)
            }
            Ok(Err(join)) => panic!("hub link task panicked: {join}"),
            Err(_) => None,
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------- waiting

/// Reads `topic` (retained first, then live) until `done` says yes about a message, or fails
/// at the deadline with the last payload seen.
pub async fn wait_for_message<T>(
    op: &mut Operator,
    topic: &str,
    within: Duration,
    mut done: impl FnMut(&[u8]) -> Option<T>,
) -> Result<T> {
    op.subscribe(&[topic.to_string()]).await?;
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    loop {
        match op.recv_until(deadline).await? {
            Some(m) if m.topic == topic => {
                if let Some(t) = done(&m.payload) {
                    return Ok(t);
                }
                last = Some(String::from_utf8_lossy(&m.payload).into_owned());
            }
            Some(_) => {}
            None => bail!("no matching message on {topic} within {within:?}; last: {last:?}"),
        }
    }
}

/// Waits until the device's retained state satisfies `pred`.
pub async fn wait_for_state(
    op: &mut Operator,
    device: &str,
    within: Duration,
    pred: impl Fn(&ReportedState) -> bool,
) -> Result<ReportedState> {
    let topic = format!("outpost/{device}/state");
    wait_for_message(op, &topic, within, |bytes| {
        serde_json::from_slice::<ReportedState>(bytes)
            .ok()
            .filter(|s| pred(s))
    })
    .await
}

/// Runs `outpost-ctl ARGS...` in-process (on a blocking thread, since the CLI makes its own
/// runtime) and returns its exit code.
pub async fn ctl(args: Vec<String>) -> u8 {
    tokio::task::spawn_blocking(move || {
        outpost_ctl::run_args(std::iter::once("outpost-ctl".to_string()).chain(args))
    })
    .await
    .expect("the CLI panicked")
}

/// A small valid manifest.
pub fn manifest(id: &str, version: u64, priority: u32) -> String {
    format!(
        r#"{{"schemaVersion":"1.0","id":"{id}","version":{version},"priority":{priority},"modules":{{"app":{{"image":"127.0.0.1:5000/app:{version}"}}}}}}"#
    )
}
