//! The hub broker the end-to-end tests run against, and the test PKI it uses.
//!
//! Outpost's hub is *any* MQTT broker, so the harness can start several real ones; which one a
//! test run uses comes from `OUTPOST_TEST_BROKER` (default `mosquitto`, what CI runs on every
//! run; `scripts/test-brokers` runs the matrix):
//!
//! | kind        | from                     | TLS | client certificates | login      | sessions across a restart |
//! |-------------|--------------------------|-----|---------------------|------------|---------------------------|
//! | `mosquitto` | Debian `mosquitto`       | yes | required, verified  | optional   | kept (persistence file)   |
//! | `ejabberd`  | Debian `ejabberd`        | yes | not used here       | required   | lost                      |
//! | `amqtt`     | PyPI `amqtt` (a venv)    | yes | verified if offered | required   | lost                      |
//! | `rumqttd`   | crates.io `rumqttd`      | yes | required, verified  | optional   | lost                      |
//!
//! A test asks for an [`Auth`] mode; a broker that cannot do it exactly runs the nearest mode
//! that still authenticates the device (ejabberd: TLS and a password instead of a client
//! certificate; rumqttd, which verifies client certificates on every TLS connection: mutual
//! TLS instead of server-only TLS). Tests about one mode itself use [`Broker::start_exact`],
//! which says `UNSUPPORTED` and skips on brokers without it. Telemetry outages use
//! [`Broker::outage_begin`]: a broker restart where sessions survive it, else a cut of the
//! devices' connections through a [`Relay`], so the hub-side consumer keeps its session.
//!
//! - [`Pki`]: a CA, a server certificate (SAN `DNS:localhost`, `IP:127.0.0.1`), a client
//!   certificate, and a second CA with its own client certificate for the negative tests, all
//!   generated with rcgen.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use outpost_agent::hub::link::Settings;
use outpost_agent::hub::tls::TlsFiles;
use outpost_ctl::hub::Operator;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

// ---------------------------------------------------------------- certificates

/// PEM files of a test PKI, in a directory readable by the broker.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    /// The CA's private key: a provisioning responder signs device certificates with it.
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA the broker does not trust, and a client certificate it signed.
    pub other_ca: PathBuf,
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

/// Five years from last year: rcgen's default (valid until 4096) overflows ejabberd 23.01's
/// expiry timer and its certificate store crashes ("certificate not configured").
fn validity(params: &mut CertificateParams) {
    let year = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(2026, |d| 1970 + (d.as_secs() / 31_556_952) as i32);
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 5, 1, 1);
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    validity(&mut params);
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
    server_ips: &[std::net::IpAddr],
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
        for ip in server_ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
    }
    params.distinguished_name.push(DnType::CommonName, name);
    validity(&mut params);
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
        Pki::generate_for(dir, client_name, &[])
    }

    /// [`Pki::generate`] with a server certificate also valid for `server_ips` (the nodes
    /// of a clustered hub).
    pub fn generate_for(
        dir: &Path,
        client_name: &str,
        server_ips: &[std::net::IpAddr],
    ) -> Result<Pki> {
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let ca1 = ca("outpost test CA")?;
        let ca2 = ca("some other CA")?;
        let (server_cert, server_key) = leaf(&ca1, "localhost", true, server_ips)?;
        let (client_cert, client_key) = leaf(&ca1, client_name, false, &[])?;
        let (other_cert, other_key) = leaf(&ca2, client_name, false, &[])?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca: write("ca.pem", &ca1.pem())?,
            ca_key: write("ca.key", &ca1.key().serialize_pem())?,
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

impl Pki {
    /// Another client certificate from the test CA, for `name` (`{name}.pem`, `{name}.key`).
    pub fn issue_client(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&self.ca_key)?)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(&self.ca)?, key)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        validity(&mut params);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let leaf_key = KeyPair::generate()?;
        let cert = params.signed_by(&leaf_key, &issuer)?;
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, leaf_key.serialize_pem())?;
        set_mode(&cert_path, 0o644)?;
        Ok((cert_path, key_path))
    }
}

// ---------------------------------------------------------------- broker kinds

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

/// Topic access rules for [`Broker::start_acl`]: one user who may read everything but
/// publish only under `publish` (MQTT filters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub username: String,
    pub password: String,
    pub publish: Vec<String>,
}

/// A broker implementation the harness can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mosquitto,
    Ejabberd,
    Amqtt,
    Rumqttd,
}

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Mosquitto, Kind::Ejabberd, Kind::Amqtt, Kind::Rumqttd];

    /// `OUTPOST_TEST_BROKER`, default Mosquitto. An unknown name is a mistake, not a skip.
    pub fn from_env() -> Kind {
        match std::env::var("OUTPOST_TEST_BROKER") {
            Err(_) => Kind::Mosquitto,
            Ok(name) => Kind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .unwrap_or_else(|| {
                    panic!("OUTPOST_TEST_BROKER=`{name}` is not one of mosquitto, ejabberd, amqtt, rumqttd")
                }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mosquitto => "mosquitto",
            Kind::Ejabberd => "ejabberd",
            Kind::Amqtt => "amqtt",
            Kind::Rumqttd => "rumqttd",
        }
    }

    fn candidates(self) -> Vec<PathBuf> {
        let mut c: Vec<PathBuf> = match self {
            Kind::Mosquitto => vec![
                "/usr/sbin/mosquitto".into(),
                "/usr/bin/mosquitto".into(),
                "/usr/local/sbin/mosquitto".into(),
            ],
            Kind::Ejabberd => vec!["/usr/sbin/ejabberdctl".into()],
            Kind::Amqtt => vec!["/var/tmp/outpost-amqtt/bin/amqtt".into()],
            Kind::Rumqttd => vec!["/var/tmp/outpost-rumqttd/bin/rumqttd".into()],
        };
        // scripts/setup's places can be moved with the same variables setup reads.
        let dir = match self {
            Kind::Amqtt => std::env::var("OUTPOST_AMQTT_DIR").ok(),
            Kind::Rumqttd => std::env::var("OUTPOST_RUMQTTD_DIR").ok(),
            _ => None,
        };
        if let Some(dir) = dir {
            c.insert(0, Path::new(&dir).join("bin").join(self.name()));
        }
        c
    }

    /// The broker's program; `None` (test skipped) when missing, except on CI where it must
    /// exist.
    pub fn program(self) -> Option<PathBuf> {
        if let Some(p) = self.candidates().into_iter().find(|p| p.is_file()) {
            return Some(p);
        }
        let install = match self {
            Kind::Mosquitto => "apt-get install -y mosquitto mosquitto-clients",
            Kind::Ejabberd => "apt-get install -y ejabberd",
            Kind::Amqtt | Kind::Rumqttd => "OUTPOST_BROKERS=all scripts/setup",
        };
        if on_ci() {
            panic!("{} is not installed; on CI: {install}", self.name());
        }
        eprintln!("SKIPPED: {} is not installed ({install})", self.name());
        None
    }

    /// Whether a client certificate the broker does not trust is refused with a TLS alert
    /// (which the agent explains and gives up on at start-up); amqtt (Python's ssl) closes
    /// the connection without one.
    pub fn alerts_refused_certificates(self) -> bool {
        self != Kind::Amqtt
    }

    /// Whether the broker keeps sessions and queued messages across a restart (as the
    /// harness configures it).
    pub fn keeps_sessions(self) -> bool {
        self == Kind::Mosquitto
    }

    /// The mode this broker runs when a test asks for `auth`, and whether it needs a login
    /// from every client: `None` when it has no mode close enough.
    fn effective(self, auth: &Auth) -> Option<(Auth, bool)> {
        match (self, auth) {
            (Kind::Mosquitto, a) => Some((a.clone(), false)),
            // amqtt keeps no session (nor QoS 1 messages queued for one) for anonymous
            // clients: every client logs in, as a hub-side consumer must.
            (Kind::Amqtt, a) => Some((a.clone(), true)),
            // mod_mqtt authenticates every client against ejabberd's users.
            (Kind::Ejabberd, Auth::MutualTls) => Some((Auth::Tls, true)),
            (Kind::Ejabberd, a) => Some((a.clone(), true)),
            // Built with `verify-client-cert`: every TLS client presents a certificate.
            (Kind::Rumqttd, Auth::Tls) => Some((Auth::MutualTls, false)),
            (Kind::Rumqttd, Auth::Password { .. }) => None,
            (Kind::Rumqttd, a) => Some((a.clone(), false)),
        }
    }
}

/// A broker on a loopback port, stopped on drop.
pub struct Broker {
    pub kind: Kind,
    /// Where clients connect directly (operators, the hub-side consumer).
    pub port: u16,
    /// The mode in effect (see [`Kind`] for how it can differ from the one asked for).
    pub auth: Auth,
    /// The user name and password every client presents, when the mode needs one.
    pub login: Option<(String, String)>,
    pub pki: Pki,
    /// Devices' way in on brokers that lose sessions on restart (see [`Broker::outage_begin`]).
    relay: Option<Relay>,
    process: Option<Child>,
    dir: tempfile::TempDir,
    log: PathBuf,
    /// Ejabberd's node name (one per broker, so several can run at once).
    node: String,
    acl: Option<Acl>,
    /// A whole Mosquitto ACL file (see [`Broker::start_mosquitto_acl_file`]).
    acl_file: Option<String>,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A random password: 24 hex characters.
fn random_password() -> String {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Broker {
    /// Starts the broker of [`Kind::from_env`] in the mode nearest to `auth`; `None` when the
    /// broker is missing (and not on CI).
    pub fn start(auth: Auth) -> Result<Option<Broker>> {
        Broker::start_with(Kind::from_env(), auth, false, false)
    }

    /// A broker that keeps the hub-side consumer's session and queued messages across an
    /// [`Broker::outage_begin`] (see there).
    pub fn start_persistent(auth: Auth) -> Result<Option<Broker>> {
        Broker::start_with(Kind::from_env(), auth, true, false)
    }

    /// Exactly `auth`, or `None` with an `UNSUPPORTED` line on brokers without that mode:
    /// for tests about the mode itself (a refused certificate, a wrong password).
    pub fn start_exact(auth: Auth) -> Result<Option<Broker>> {
        Broker::start_with(Kind::from_env(), auth, false, true)
    }

    /// A Mosquitto whatever the matrix says: for what is not the hub (a device's own bus).
    pub fn start_mosquitto(auth: Auth) -> Result<Option<Broker>> {
        Broker::start_with(Kind::Mosquitto, auth, false, false)
    }

    /// TLS, a login and topic access rules; `None` with an `UNSUPPORTED` line on brokers
    /// without topic ACLs.
    pub fn start_acl(acl: Acl) -> Result<Option<Broker>> {
        let kind = Kind::from_env();
        if kind == Kind::Rumqttd {
            eprintln!(
                "UNSUPPORTED on {}: topic ACLs (see the broker table in docs/hub.md)",
                kind.name()
            );
            return Ok(None);
        }
        let auth = Auth::Password {
            username: acl.username.clone(),
            password: acl.password.clone(),
        };
        Broker::start_full(kind, auth, false, true, Some(acl))
    }

    /// Mosquitto with mutual TLS, each client named by its certificate
    /// (`use_identity_as_username`), and the access rules of `acl_file` (the file's text).
    /// The operator's certificate ([`Pki::client_cert`], used by [`Broker::cli_flags`]) is
    /// issued to `operator`; [`Pki::issue_client`] makes more.
    pub fn start_mosquitto_acl_file(operator: &str, acl_file: &str) -> Result<Broker> {
        Broker::start_custom(
            Kind::Mosquitto,
            Auth::MutualTls,
            operator,
            Some(acl_file.to_string()),
        )?
        .context("Mosquitto is required (scripts/setup installs it)")
    }

    fn start_with(
        kind: Kind,
        asked: Auth,
        persistent: bool,
        exact: bool,
    ) -> Result<Option<Broker>> {
        Broker::start_full(kind, asked, persistent, exact, None)
    }

    fn start_custom(
        kind: Kind,
        auth: Auth,
        client_name: &str,
        acl_file: Option<String>,
    ) -> Result<Option<Broker>> {
        Broker::start_inner(kind, auth, false, true, None, client_name, acl_file)
    }

    fn start_full(
        kind: Kind,
        asked: Auth,
        persistent: bool,
        exact: bool,
        acl: Option<Acl>,
    ) -> Result<Option<Broker>> {
        Broker::start_inner(kind, asked, persistent, exact, acl, "device", None)
    }

    fn start_inner(
        kind: Kind,
        asked: Auth,
        persistent: bool,
        exact: bool,
        acl: Option<Acl>,
        client_name: &str,
        acl_file: Option<String>,
    ) -> Result<Option<Broker>> {
        let Some(_) = kind.program() else {
            return Ok(None);
        };
        let (auth, needs_login) = match kind.effective(&asked) {
            Some((auth, login)) if !exact || auth == asked => (auth, login),
            _ => {
                eprintln!(
                    "UNSUPPORTED on {}: {asked:?} (see the broker table in docs/hub.md)",
                    kind.name()
                );
                return Ok(None);
            }
        };
        let login = match &auth {
            Auth::Password { username, password } => Some((username.clone(), password.clone())),
            _ if needs_login => Some(("outpost".to_string(), random_password())),
            _ => None,
        };
        let dir = tempfile::tempdir()?;
        // Brokers drop root (Mosquitto to `mosquitto`, ejabberd runs as `ejabberd`): they must
        // be able to read the files.
        set_mode(dir.path(), 0o755)?;
        let pki = Pki::generate(dir.path(), client_name)?;
        let port = free_port()?;
        let log = dir.path().join(format!("{}.log", kind.name()));
        let mut broker = Broker {
            kind,
            port,
            auth,
            login,
            pki,
            relay: None,
            process: None,
            node: format!("outpost{port}@localhost"),
            log,
            dir,
            acl,
            acl_file,
        };
        broker.configure(persistent)?;
        for entry in std::fs::read_dir(broker.dir.path())? {
            let path = entry?.path();
            set_mode(&path, if path.is_dir() { 0o755 } else { 0o644 })?;
        }
        if kind == Kind::Ejabberd {
            let status = Command::new("chown")
                .args(["-R", "ejabberd:ejabberd"])
                .arg(broker.dir.path())
                .status()?;
            if !status.success() {
                bail!("cannot give the ejabberd user its test directory");
            }
        }
        broker.restart()?;
        if persistent && !kind.keeps_sessions() {
            broker.relay = Some(Relay::start(port)?);
        }
        Ok(Some(broker))
    }

    /// Writes the broker's configuration into its directory.
    fn configure(&self, persistent: bool) -> Result<()> {
        let d = self.dir.path();
        let tls = self.auth != Auth::Plain;
        let (ca, cert, key) = (
            self.pki.ca.display(),
            self.pki.server_cert.display(),
            self.pki.server_key.display(),
        );
        let port = self.port;
        match self.kind {
            Kind::Mosquitto => {
                let persistence = if persistent {
                    // Root keeps root (no drop to `mosquitto`) so it can write its file here.
                    format!(
                        "persistence true\npersistence_location {}/\nmax_queued_messages 0\nuser root\n",
                        d.display()
                    )
                } else {
                    "persistence false\n".to_string()
                };
                let mut conf = format!(
                    "per_listener_settings false\n{persistence}log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
                     set_tcp_nodelay true\nlistener {port} 127.0.0.1\n"
                );
                if tls {
                    conf.push_str(&format!("cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"));
                }
                match &self.auth {
                    Auth::Plain | Auth::Tls => conf.push_str("allow_anonymous true\n"),
                    Auth::MutualTls => conf.push_str(
                        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
                    ),
                    Auth::Password { username, password } => {
                        let file = d.join("passwords");
                        let status = Command::new("mosquitto_passwd")
                            .args(["-b", "-c"])
                            .arg(&file)
                            .args([username, password])
                            .status()
                            .context("mosquitto_passwd (package mosquitto) is needed")?;
                        if !status.success() {
                            bail!("mosquitto_passwd failed");
                        }
                        conf.push_str(&format!(
                            "allow_anonymous false\npassword_file {}\n",
                            file.display()
                        ));
                    }
                }
                if let Some(acl) = &self.acl {
                    let mut rules = format!("user {}\ntopic read #\n", acl.username);
                    for t in &acl.publish {
                        rules.push_str(&format!("topic write {t}\n"));
                    }
                    std::fs::write(d.join("acl"), rules)?;
                    conf.push_str(&format!("acl_file {}\n", d.join("acl").display()));
                }
                if let Some(text) = &self.acl_file {
                    std::fs::write(d.join("acl"), text)?;
                    conf.push_str(&format!("acl_file {}\n", d.join("acl").display()));
                }
                std::fs::write(d.join("mosquitto.conf"), conf)?;
            }
            Kind::Ejabberd => {
                // ejabberd reads its certificate and key from one file.
                let pem = format!(
                    "{}{}",
                    std::fs::read_to_string(&self.pki.server_cert)?,
                    std::fs::read_to_string(&self.pki.server_key)?
                );
                std::fs::write(d.join("server-and-key.pem"), pem)?;
                let head = format!(
                    "hosts: [localhost]\nloglevel: warning\ncertfiles: [\"{}\"]\nauth_method: [internal]\n",
                    d.join("server-and-key.pem").display()
                );
                let conf = format!(
                    "{head}listen:\n  - port: {port}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n    tls: {tls}\n    max_payload_size: {max}\n\
                     acl:\n  local:\n    user_regexp: \"\"\naccess_rules:\n  local:\n    allow: local\n\
                     modules:\n  mod_mqtt:\n{access}",
                    max = outpost_agent::hub::link::MAX_OUTGOING_PACKET * 2,
                    access = match &self.acl {
                        // Publishing: the allowed filters for everyone, nothing else.
                        Some(acl) => {
                            let mut a = "    access_publish:\n".to_string();
                            for t in &acl.publish {
                                a.push_str(&format!("      \"{t}\": all\n"));
                            }
                            a.push_str("      \"#\": none\n");
                            a
                        }
                        None => "    {}\n".to_string(),
                    },
                );
                // Booted without the MQTT listener, so no client comes before the login
                // exists (see `restart`).
                std::fs::write(d.join("ejabberd-listening.yml"), conf)?;
                std::fs::write(
                    d.join("ejabberd-boot.yml"),
                    format!("{head}listen: []\nmodules:\n  mod_mqtt: {{}}\n"),
                )?;
                std::fs::write(
                    d.join("ejabberdctl.cfg"),
                    "ERL_OPTIONS=\"-env ERL_CRASH_DUMP_BYTES 0\"\n",
                )?;
                for sub in ["spool", "logs"] {
                    std::fs::create_dir_all(d.join(sub))?;
                }
            }
            Kind::Amqtt => {
                let mut conf =
                    format!("listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n");
                if tls {
                    conf.push_str(&format!(
                        "    ssl: true\n    cafile: {ca}\n    certfile: {cert}\n    keyfile: {key}\n"
                    ));
                }
                conf.push_str("plugins:\n");
                match &self.login {
                    Some((user, password)) => {
                        // amqtt verifies sha512-crypt hashes (`$6$`) with Python's crypt.
                        let out = Command::new("openssl")
                            .args(["passwd", "-6", password])
                            .output()
                            .context("openssl is needed for amqtt's password file")?;
                        let hash = String::from_utf8(out.stdout)?;
                        std::fs::write(d.join("passwords"), format!("{user}:{}", hash.trim()))?;
                        conf.push_str(&format!(
                            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: false\n\
                             \x20 amqtt.plugins.authentication.FileAuthPlugin:\n    password_file: {}\n",
                            d.join("passwords").display()
                        ));
                    }
                    None => conf.push_str(
                        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n",
                    ),
                }
                if let Some(acl) = &self.acl {
                    conf.push_str(&format!(
                        "  amqtt.plugins.topic_checking.TopicAccessControlListPlugin:\n    acl:\n      {u}: [\"#\"]\n    publish_acl:\n      {u}: [{}]\n",
                        acl.publish.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", "),
                        u = acl.username,
                    ));
                }
                std::fs::write(d.join("amqtt.yaml"), conf)?;
            }
            Kind::Rumqttd => {
                let max = outpost_agent::hub::link::MAX_OUTGOING_PACKET * 2;
                let mut conf = format!(
                    "id = 0\n[router]\nid = 0\nmax_connections = 1000\nmax_outgoing_packet_count = 200\n\
                     max_segment_size = 104857600\nmax_segment_count = 10\n\
                     [v4.1]\nname = \"v4-1\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 1\n"
                );
                if tls {
                    conf.push_str(&format!(
                        "[v4.1.tls]\ncapath = \"{ca}\"\ncertpath = \"{cert}\"\nkeypath = \"{key}\"\n"
                    ));
                }
                conf.push_str(&format!(
                    "[v4.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = {max}\nmax_inflight_count = 100\ndynamic_filters = true\n"
                ));
                std::fs::write(d.join("rumqttd.toml"), conf)?;
            }
        }
        Ok(())
    }

    fn ejabberdctl_args(&self) -> Vec<String> {
        ejabberdctl_args(self.dir.path(), &self.node)
    }

    fn ejabberdctl(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("ejabberdctl")
            .current_dir(self.dir.path())
            .args(self.ejabberdctl_args())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ejabberdctl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stops the broker as a crash would: no clean goodbye to clients, nothing saved.
    pub fn stop(&mut self) {
        if let Some(child) = self.process.take() {
            kill_broker(
                child,
                (self.kind == Kind::Ejabberd).then_some(self.node.as_str()),
            );
        }
    }

    /// Stops the broker with SIGTERM: Mosquitto saves its persistence file (sessions, queued
    /// messages) first. Clients see their connection drop.
    pub fn stop_gracefully(&mut self) {
        if self.kind == Kind::Ejabberd && self.process.is_some() {
            let _ = self.ejabberdctl(&["stop"]);
        }
        if let Some(mut child) = self.process.take() {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }

    /// A hub outage as the devices see it: on a broker that keeps sessions, the broker stops
    /// (gracefully, saving them); on the others the devices' connections are cut and refused
    /// at the relay while the broker and the hub-side consumer stay up. Needs
    /// [`Broker::start_persistent`].
    pub fn outage_begin(&mut self) {
        match &self.relay {
            Some(relay) => relay.cut(),
            None => self.stop_gracefully(),
        }
    }

    /// Ends the outage of [`Broker::outage_begin`].
    pub fn outage_end(&mut self) -> Result<()> {
        match &self.relay {
            Some(relay) => {
                relay.resume();
                Ok(())
            }
            None => self.restart(),
        }
    }

    /// Starts the broker again on the same port and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        use std::os::unix::process::CommandExt as _;
        self.stop();
        let d = self.dir.path();
        let program = self.kind.program().context("broker missing")?;
        let mut command = Command::new(&program);
        match self.kind {
            Kind::Mosquitto => command.arg("-c").arg(d.join("mosquitto.conf")),
            Kind::Ejabberd => command.args(self.ejabberdctl_args()).arg("foreground"),
            Kind::Amqtt => command.arg("-c").arg(d.join("amqtt.yaml")),
            Kind::Rumqttd => command.arg("-c").arg(d.join("rumqttd.toml")).arg("-q"),
        };
        if self.kind == Kind::Ejabberd {
            std::fs::copy(d.join("ejabberd-boot.yml"), d.join("ejabberd.yml"))?;
        }
        let log = std::fs::File::create(&self.log)?;
        let child = command
            // ejabberd runs as its own user, who may not read the test's working directory.
            .current_dir(d)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        self.process = Some(child);
        if self.kind == Kind::Ejabberd {
            // The node up, the login made (kept in its database across restarts, or made
            // again), then the listener: a device never meets a broker without its user.
            // `started` polls for a minute, each probe an Erlang VM of its own: on a loaded
            // machine (CI, with the ARM build beside it) the node once took longer. One more
            // minute, unless the node is gone; then the node's log says why.
            if let Err(first) = self.ejabberdctl(&["started"]) {
                let exited = match self.process.as_mut() {
                    Some(child) => child.try_wait()?.is_some(),
                    None => true,
                };
                if exited || self.ejabberdctl(&["started"]).is_err() {
                    bail!("{first} (the node's log: {})", self.log());
                }
            }
            if let Some((user, password)) = self.login.clone()
                && let Err(e) = self.ejabberdctl(&["register", &user, "localhost", &password])
                && !e.to_string().contains("already registered")
            {
                return Err(e);
            }
            std::fs::copy(d.join("ejabberd-listening.yml"), d.join("ejabberd.yml"))?;
            self.ejabberdctl(&["reload_config"])?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.process.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("{} exited with {status}: {}", self.kind.name(), self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on port {} within 60 s: {}",
                    self.kind.name(),
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The hub URL for operators (direct).
    pub fn url(&self) -> String {
        self.url_on(self.port)
    }

    /// The hub URL for devices: through the relay when there is one.
    pub fn device_url(&self) -> String {
        self.url_on(self.relay.as_ref().map_or(self.port, |r| r.port))
    }

    fn url_on(&self, port: u16) -> String {
        match self.auth {
            Auth::Plain => format!("mqtt://127.0.0.1:{port}"),
            _ => format!("mqtts://localhost:{port}"),
        }
    }

    /// The `[hub]` section of a device's configuration for this broker: its mode with the
    /// test PKI's files (and a login in `dir`), reconnecting within a second.
    pub fn device_hub_section(&self) -> String {
        let mut s = format!(
            "[hub]\nurl = \"{}\"\nreconnect_max_secs = 1\n",
            self.device_url()
        );
        if self.auth != Auth::Plain {
            s.push_str(&format!("ca_file = \"{}\"\n", self.pki.ca.display()));
        }
        if self.auth == Auth::MutualTls {
            s.push_str(&format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                self.pki.client_cert.display(),
                self.pki.client_key.display()
            ));
        }
        if let Some((user, password)) = &self.login {
            let file = self.dir.path().join(format!("device-password-{user}"));
            // The file is the broker's; the device only reads it.
            std::fs::write(&file, format!("{password}\n")).expect("password file");
            s.push_str(&format!(
                "username = \"{user}\"\npassword_file = \"{}\"\n",
                file.display()
            ));
        }
        s
    }

    /// The broker's log so far, for failure messages.
    pub fn log(&self) -> String {
        let mut text = std::fs::read_to_string(&self.log).unwrap_or_default();
        if self.kind == Kind::Ejabberd {
            text.push_str(
                &std::fs::read_to_string(self.dir.path().join("logs/ejabberd.log"))
                    .unwrap_or_default(),
            );
        }
        text
    }

    /// Operator connection settings (the test CA, the client certificate or login when
    /// needed), as client `client_id`.
    pub fn client_settings(&self, dir: &Path, client_id: &str) -> Result<Settings> {
        let credentials = match &self.login {
            Some((user, password)) => {
                let file = dir.join(format!("{client_id}-password"));
                std::fs::write(&file, format!("{password}\n"))?;
                Some((
                    user.clone(),
                    outpost_agent::hub::link::Password::read(&file)?,
                ))
            }
            None => None,
        };
        Ok(Settings {
            client_id: client_id.into(),
            host: "localhost".into(),
            port: self.port,
            failover: Vec::new(),
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

    /// Operator connection settings, as client `operator`.
    pub fn operator_settings(&self, dir: &Path) -> Result<Settings> {
        self.client_settings(dir, "operator")
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

    /// Options for a plain rumqttc client of this broker (the test's own probes and
    /// consumers): transport, credentials, client id.
    pub fn mqtt_options(&self, client_id: &str) -> rumqttc::MqttOptions {
        self.mqtt_options_via(client_id, self.port)
    }

    /// [`Broker::mqtt_options`] connecting to `port` on loopback (a [`Relay`] in front).
    pub fn mqtt_options_via(&self, client_id: &str, port: u16) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(client_id, "localhost", port);
        options.set_keep_alive(Duration::from_secs(5));
        if let Some((user, password)) = &self.login {
            options.set_credentials(user, password);
        }
        if self.auth != Auth::Plain {
            options.set_transport(tls_transport(&self.pki, self.auth == Auth::MutualTls));
        }
        options
    }

    /// `outpost-ctl` connection flags for this broker.
    pub fn cli_flags(&self, dir: &Path) -> Result<Vec<String>> {
        let mut flags = vec!["--hub".to_string(), self.url()];
        if self.auth != Auth::Plain {
            flags.extend(["--ca".into(), self.pki.ca.display().to_string()]);
        }
        if self.auth == Auth::MutualTls {
            flags.extend([
                "--cert".into(),
                self.pki.client_cert.display().to_string(),
                "--key".into(),
                self.pki.client_key.display().to_string(),
            ]);
        }
        if let Some((user, password)) = &self.login {
            let file = dir.join("cli-password");
            std::fs::write(&file, password)?;
            flags.extend([
                "--username".into(),
                user.clone(),
                "--password-file".into(),
                file.display().to_string(),
            ]);
        }
        Ok(flags)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        // For a failure to look at: the configuration and the logs outlive the test.
        if std::env::var_os("OUTPOST_KEEP_BROKER").is_some() {
            let to = std::env::temp_dir().join(format!("outpost-broker-{}", self.port));
            let _ = Command::new("cp")
                .arg("-a")
                .arg(self.dir.path())
                .arg(&to)
                .status();
            eprintln!("{} files kept in {}", self.kind.name(), to.display());
        }
    }
}

/// `ejabberdctl`'s options for a node whose configuration, spool and logs are all in `dir`.
pub(crate) fn ejabberdctl_args(dir: &Path, node: &str) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    vec![
        "--config".into(),
        path("ejabberd.yml"),
        "--ctl-config".into(),
        path("ejabberdctl.cfg"),
        "--spool".into(),
        path("spool"),
        "--logs".into(),
        path("logs"),
        "--node".into(),
        node.to_string(),
    ]
}

/// Kills a broker started in its own process group (amqtt's Python, a shell in between), and
/// an ejabberd node's Erlang VM, which `su` starts in a session of its own: it is found by
/// its node name.
pub(crate) fn kill_broker(mut child: Child, erlang_node: Option<&str>) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    if let Some(node) = erlang_node {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &format!("name {node}( |$)")])
            .status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// TLS for a test client trusting the test CA, with its client certificate when asked.
pub(crate) fn tls_transport(pki: &Pki, client_certificate: bool) -> rumqttc::Transport {
    let files = TlsFiles {
        ca_file: Some(pki.ca.clone()),
        client_auth: client_certificate.then(|| (pki.client_cert.clone(), pki.client_key.clone())),
        ca_setting: "--ca",
    };
    let tls = outpost_agent::hub::tls::client_config(&files).expect("client TLS");
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(tls)))
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

// ---------------------------------------------------------------- relay

/// A TCP relay in front of a broker: what a device's network path is, so the test can cut it
/// (every connection closed, new ones refused) while the broker keeps running.
pub struct Relay {
    pub port: u16,
    state: Arc<RelayState>,
}

#[derive(Default)]
struct RelayState {
    cut: AtomicBool,
    stopped: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
}

impl RelayState {
    fn close_all(&self) {
        for s in self.open.lock().expect("relay lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Relay {
    /// Listens on a free loopback port and forwards to `upstream` on loopback.
    pub fn start(upstream: u16) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(RelayState::default());
        let s = state.clone();
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                if s.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = incoming else { continue };
                if s.cut.load(Ordering::SeqCst) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let pairs = (
                    down.try_clone(),
                    up.try_clone(),
                    down.try_clone(),
                    up.try_clone(),
                );
                let (Ok(d2), Ok(u2), Ok(d3), Ok(u3)) = pairs else {
                    continue;
                };
                s.open.lock().expect("relay lock").extend([d3, u3]);
                std::thread::spawn(move || pipe(down, up));
                std::thread::spawn(move || pipe(u2, d2));
            }
        });
        Ok(Relay { port, state })
    }

    /// Closes every connection and refuses new ones until [`Relay::resume`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.close_all();
    }

    pub fn resume(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.state.close_all();
        // Wakes the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies one direction until either side closes, then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
