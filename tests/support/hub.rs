//! Shared harness for the end-to-end tests.
//!
//! - [`Pki`]: a CA, a server certificate (SAN `DNS:localhost`, `IP:127.0.0.1`), a client
//!   certificate, and a second CA with its own client certificate for the negative tests, all
//!   generated with rcgen.
//! - [`Broker`]: a real Mosquitto started on a free loopback port with a config written to a
//!   temporary directory, stopped (and restartable) by the test, killed on drop.
//! - [`TestAgent`]: the real reconciler and store behind an `AgentHandle`, over the in-memory
//!   fake engine (the hub tests are about the link; the engine is covered by the e2e tests).
//! - [`Device`]: `outpost_agent::hub::run` with a device configuration file, and that agent.
//! - helpers to wait on reported state with a deadline (never fixed sleeps) and to run the
//!   `outpost` CLI in-process.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use outpost_agent::control::{AgentHandle, REQUEST_CAPACITY, Request};
use outpost_agent::hub::HubError;
use outpost_agent::hub::link::Settings;
use outpost_agent::hub::tls::TlsFiles;
use outpost_agent::state::ReportedState;
use outpost_ctl::hub::Operator;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Sets up logging (once) and the crypto provider, as the binary does.
pub fn init() {
    outpost_agent::logging::init(
        outpost_agent::logging::LogFormat::Human,
        "warn,outpost_agent=info",
    );
    outpost_agent::hub::install_crypto_provider();
}

// ---------------------------------------------------------------- certificates

/// PEM files of a test PKI, in a directory readable by the broker.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA the broker does not trust, and a client certificate it signed.
    pub other_ca: PathBuf,
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    server: bool,
) -> Result<(String, String)> {
    let mut params = CertificateParams::new(if server {
        vec!["localhost".to_string()]
    } else {
        Vec::new()
    })?;
    if server {
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Pki {
    /// Generates everything into `dir`. Client certificates are for `client_name`.
    pub fn generate(dir: &Path, client_name: &str) -> Result<Pki> {
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let ca1 = ca("outpost test CA")?;
        let ca2 = ca("some other CA")?;
        let (server_cert, server_key) = leaf(&ca1, "localhost", true)?;
        let (client_cert, client_key) = leaf(&ca1, client_name, false)?;
        let (other_cert, other_key) = leaf(&ca2, client_name, false)?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca: write("ca.pem", &ca1.pem())?,
            server_cert: write("server.pem", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            client_cert: write("client.pem", &client_cert)?,
            client_key: write("client.key", &client_key)?,
            other_ca: write("other-ca.pem", &ca2.pem())?,
            other_client_cert: write("other-client.pem", &other_cert)?,
            other_client_key: write("other-client.key", &other_key)?,
        })
    }
}

// ---------------------------------------------------------------- broker

/// How the broker authenticates clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Plaintext MQTT on loopback, anonymous (allowed without `allow_insecure` on loopback).
    Plain,
    /// TLS (server certificate only), anonymous clients.
    Tls,
    /// TLS and a client certificate signed by the test CA.
    MutualTls,
    /// TLS and a user name and password.
    Password { username: String, password: String },
}

/// A Mosquitto process on a loopback port, killed on drop.
pub struct Broker {
    pub port: u16,
    pub auth: Auth,
    pub pki: Pki,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

/// The broker's binary; `None` (test skipped) when missing, except on CI where it must exist.
pub fn mosquitto() -> Option<PathBuf> {
    for candidate in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(candidate).is_file() {
            return Some(PathBuf::from(candidate));
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("mosquitto is not installed; on CI install `mosquitto mosquitto-clients`");
    }
    eprintln!(
        "SKIPPED: mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)"
    );
    None
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Broker {
    /// Starts a broker; `None` when Mosquitto is missing (and not on CI).
    pub fn start(auth: Auth) -> Result<Option<Broker>> {
        Broker::start_with(auth, false)
    }

    /// A broker that keeps sessions and queued messages across [`Broker::stop_gracefully`]
    /// and [`Broker::restart`] (Mosquitto's persistence file), so a hub-side consumer with a
    /// persistent session misses nothing sent while it was reconnecting.
    pub fn start_persistent(auth: Auth) -> Result<Option<Broker>> {
        Broker::start_with(auth, true)
    }

    fn start_with(auth: Auth, persistent: bool) -> Result<Option<Broker>> {
        let Some(_) = mosquitto() else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        // Started as root, Mosquitto drops to its own user: it must be able to read the files.
        set_mode(dir.path(), 0o755)?;
        let pki = Pki::generate(dir.path(), "device")?;
        let port = free_port()?;
        let persistence = if persistent {
            // Root keeps root (no drop to `mosquitto`) so it can write its file in the test dir.
            format!(
                "persistence true\npersistence_location {}/\nmax_queued_messages 0\nuser root\n",
                dir.path().display()
            )
        } else {
            "persistence false\n".to_string()
        };
        let mut conf = format!(
            "per_listener_settings false\n{persistence}log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
             set_tcp_nodelay true\nlistener {port} 127.0.0.1\n"
        );
        if auth != Auth::Plain {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display()
            ));
        }
        match &auth {
            Auth::Plain => conf.push_str("allow_anonymous true\n"),
            Auth::Tls => conf.push_str("allow_anonymous true\n"),
            Auth::MutualTls => conf.push_str(
                "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
            ),
            Auth::Password { username, password } => {
                let file = dir.path().join("passwords");
                let status = Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&file)
                    .args([username, password])
                    .status()
                    .context("mosquitto_passwd (package mosquitto) is needed")?;
                if !status.success() {
                    bail!("mosquitto_passwd failed");
                }
                set_mode(&file, 0o644)?;
                conf.push_str(&format!(
                    "allow_anonymous false\npassword_file {}\n",
                    file.display()
                ));
            }
        }
        for entry in std::fs::read_dir(dir.path())? {
            set_mode(&entry?.path(), 0o644)?;
        }
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf)?;
        let mut broker = Broker {
            port,
            auth,
            pki,
            log: dir.path().join("mosquitto.log"),
            conf: conf_path,
            child: None,
            _dir: dir,
        };
        broker.restart()?;
        Ok(Some(broker))
    }

    /// Stops the broker (as a crash would: no clean goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker with SIGTERM: it saves its persistence file (sessions, queued
    /// messages) first. Clients see their connection drop.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let log = std::fs::File::create(&self.log)?;
        let child = Command::new(mosquitto().context("mosquitto missing")?)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start mosquitto")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "mosquitto exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on port {} within 10 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        match self.auth {
            Auth::Plain => format!("mqtt://127.0.0.1:{}", self.port),
            _ => format!("mqtts://localhost:{}", self.port),
        }
    }

    /// The `[hub]` section of a device's configuration for this broker: mutual TLS with the
    /// test PKI's client certificate, reconnecting within a second.
    pub fn device_hub_section(&self) -> String {
        format!(
            "[hub]\nurl = \"{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nreconnect_max_secs = 1\n",
            self.url(),
            self.pki.ca.display(),
            self.pki.client_cert.display(),
            self.pki.client_key.display()
        )
    }

    /// The broker's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Operator connection settings (the test CA, the client certificate when needed).
    pub fn operator_settings(&self, dir: &Path) -> Result<Settings> {
        let credentials = match &self.auth {
            Auth::Password { username, password } => {
                let file = dir.join("operator-password");
                std::fs::write(&file, format!("{password}\n"))?;
                Some((
                    username.clone(),
                    outpost_agent::hub::link::Password::read(&file)?,
                ))
            }
            _ => None,
        };
        Ok(Settings {
            client_id: "operator".into(),
            host: "localhost".into(),
            port: self.port,
            tls: (self.auth != Auth::Plain).then(|| TlsFiles {
                ca_file: Some(self.pki.ca.clone()),
                client_auth: (self.auth == Auth::MutualTls)
                    .then(|| (self.pki.client_cert.clone(), self.pki.client_key.clone())),
                ca_setting: "--ca",
            }),
            credentials,
            keep_alive: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
        })
    }

    /// A connected operator (the library's client, used here as the test's observer).
    pub async fn operator(&self, dir: &Path) -> Result<Operator> {
        Ok(Operator::connect(
            &self.operator_settings(dir)?,
            "outpost",
            Duration::from_secs(10),
        )
        .await?)
    }

    /// `outpost-ctl` connection flags for this broker.
    pub fn cli_flags(&self, dir: &Path) -> Result<Vec<String>> {
        let mut flags = vec!["--hub".to_string(), self.url()];
        if self.auth != Auth::Plain {
            flags.extend(["--ca".into(), self.pki.ca.display().to_string()]);
        }
        match &self.auth {
            Auth::MutualTls => flags.extend([
                "--cert".into(),
                self.pki.client_cert.display().to_string(),
                "--key".into(),
                self.pki.client_key.display().to_string(),
            ]),
            Auth::Password { username, password } => {
                let file = dir.join("cli-password");
                std::fs::write(&file, password)?;
                flags.extend([
                    "--username".into(),
                    username.clone(),
                    "--password-file".into(),
                    file.display().to_string(),
                ]);
            }
            Auth::Tls | Auth::Plain => {}
        }
        Ok(flags)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
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
        broker.url(),
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
    if let Auth::Password { username, password } = &broker.auth {
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
