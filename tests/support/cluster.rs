//! A clustered hub: ejabberd nodes joined over Erlang distribution, each in a network
//! namespace of its own with its own address on a bridge of the test's, so devices and the
//! operator reach different nodes and a node can be lost as a machine would be.
//!
//! Addresses: `10.(231+k).N.0/24` with `N` from the process id and `k` counting the clusters
//! of the process; the host is `.1`, node `i` is
//! `.1{i+1}` (mqtts on 8883). The bridge, the namespaces and the firewall rule that lets the
//! nodes talk across the bridge (Docker's FORWARD policy drops bridged traffic otherwise) are
//! removed on drop.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use outpost_agent::hub::link::Settings;
use outpost_agent::hub::tls::TlsFiles;

use crate::broker::{Kind, Pki, ejabberdctl_args, kill_broker, set_mode, tls_transport};

/// The MQTT port of every node (TLS).
pub const NODE_PORT: u16 = 8883;

/// Runs `ip ARGS` and fails with its output.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The test's network: a bridge on the host and one namespace per node.
struct Net {
    bridge: String,
    namespaces: Vec<String>,
    subnet: String,
    forward_rule: bool,
}

impl Net {
    fn create(tag: &str, subnet: &str, nodes: usize) -> Result<Net> {
        let mut net = Net {
            bridge: format!("{tag}b"),
            namespaces: Vec::new(),
            subnet: subnet.to_string(),
            forward_rule: false,
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        let status = Command::new("iptables")
            .args([
                "-I",
                "FORWARD",
                "-i",
                &net.bridge,
                "-o",
                &net.bridge,
                "-j",
                "ACCEPT",
            ])
            .status();
        net.forward_rule = status.is_ok_and(|s| s.success());
        for i in 0..nodes {
            let ns = format!("{tag}n{i}");
            let host_end = format!("{tag}h{i}");
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &host_end, "master", &net.bridge, "up"])?;
            let addr = format!("{subnet}.1{}/24", i + 1);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        if self.forward_rule {
            let _ = Command::new("iptables")
                .args([
                    "-D",
                    "FORWARD",
                    "-i",
                    &self.bridge,
                    "-o",
                    &self.bridge,
                    "-j",
                    "ACCEPT",
                ])
                .status();
        }
        let _ = &self.subnet;
    }
}

/// One ejabberd node.
pub struct Node {
    pub ip: IpAddr,
    name: String,
    ns: String,
    dir: PathBuf,
    process: Option<Child>,
}

impl Node {
    fn ctl_args(&self) -> Vec<String> {
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            self.ns.clone(),
            "ejabberdctl".into(),
        ];
        args.extend(ejabberdctl_args(&self.dir, &self.name));
        args
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .current_dir(&self.dir)
            .args(self.ctl_args())
            .args(args)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("ejabberdctl {args:?} on {}: {text}", self.name);
        }
        Ok(text)
    }

    fn start(&mut self) -> Result<()> {
        use std::os::unix::process::CommandExt as _;
        let log = std::fs::File::create(self.dir.join("console.log"))?;
        let child = Command::new("ip")
            .current_dir(&self.dir)
            .args(self.ctl_args())
            .arg("foreground")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.process = Some(child);
        self.ctl(&["started"])?;
        Ok(())
    }

    /// Drops every packet clients send to the node's MQTT port (a firewall rule in its
    /// namespace), so it acknowledges nothing more while it goes on routing what it already
    /// acknowledged to the other nodes; its cluster links stay up.
    pub fn cut_clients(&self) -> Result<()> {
        let port = NODE_PORT.to_string();
        let status = Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "iptables", "-I", "INPUT", "-p", "tcp",
            ])
            .args(["--dport", &port, "-j", "DROP"])
            .status()?;
        if !status.success() {
            bail!("iptables in {}: {status}", self.ns);
        }
        Ok(())
    }

    /// Ends the node as a power cut would.
    pub fn kill(&mut self) {
        if let Some(child) = self.process.take() {
            kill_broker(child, Some(&self.name));
        }
    }

    /// The node's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/ejabberd.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Several ejabberd nodes in one cluster, a login every client uses, and a PKI whose server
/// certificate is valid for every node's address.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub pki: Pki,
    pub login: (String, String),
    _net: Net,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes and joins them; `None` when ejabberd is missing (not on CI).
    pub fn start(n: usize) -> Result<Option<Cluster>> {
        if Kind::Ejabberd.program().is_none() {
            return Ok(None);
        }
        // Unique per process and per cluster in it (tests run in parallel threads).
        static CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 20;
        let pid = std::process::id();
        let tag = format!("opc{}x{k}", pid % 10_000);
        let subnet = format!("10.{}.{}", 231 + k, pid % 250);
        let net = Net::create(&tag, &subnet, n)?;
        let dir = tempfile::tempdir()?;
        set_mode(dir.path(), 0o755)?;
        let ips: Vec<IpAddr> = (0..n)
            .map(|i| format!("{subnet}.1{}", i + 1).parse())
            .collect::<Result<_, _>>()?;
        let pki = Pki::generate_for(dir.path(), "device", &ips)?;
        let pem = format!(
            "{}{}",
            std::fs::read_to_string(&pki.server_cert)?,
            std::fs::read_to_string(&pki.server_key)?
        );
        std::fs::write(dir.path().join("server-and-key.pem"), pem)?;
        let mut nodes = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let d = dir.path().join(format!("node{i}"));
            for sub in ["spool", "logs"] {
                std::fs::create_dir_all(d.join(sub))?;
            }
            std::fs::write(
                d.join("ejabberd.yml"),
                format!(
                    "hosts: [localhost]\nloglevel: info\ncertfiles: [\"{}\"]\nauth_method: [internal]\n\
                     listen:\n  - port: {NODE_PORT}\n    ip: \"{ip}\"\n    module: mod_mqtt\n    tls: true\n    max_payload_size: {max}\n\
                     acl:\n  local:\n    user_regexp: \"\"\naccess_rules:\n  local:\n    allow: local\n\
                     modules:\n  mod_mqtt: {{}}\n",
                    dir.path().join("server-and-key.pem").display(),
                    max = outpost_agent::hub::link::MAX_OUTGOING_PACKET * 2,
                ),
            )?;
            std::fs::write(
                d.join("ejabberdctl.cfg"),
                "ERL_OPTIONS=\"-env ERL_CRASH_DUMP_BYTES 0\"\n",
            )?;
            nodes.push(Node {
                ip: *ip,
                name: format!("outpost@{ip}"),
                ns: net.namespaces[i].clone(),
                dir: d,
                process: None,
            });
        }
        let status = Command::new("chown")
            .args(["-R", "ejabberd:ejabberd"])
            .arg(dir.path())
            .status()?;
        if !status.success() {
            bail!("cannot give the ejabberd user the cluster's directory");
        }
        let mut cluster = Cluster {
            nodes,
            pki,
            login: ("outpost".into(), format!("cluster-{pid}")),
            _net: net,
            dir,
        };
        for node in &mut cluster.nodes {
            node.start()?;
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            node.ctl(&["join_cluster", &first])?;
        }
        // Joined nodes restart their applications: wait for each, then check membership.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let members = cluster.nodes[0].ctl(&["list_cluster"])?;
            if cluster.nodes.iter().all(|n| members.contains(&n.name)) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the nodes did not form one cluster: {members}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for node in &cluster.nodes {
            node.ctl(&["started"])?;
        }
        let (user, password) = cluster.login.clone();
        cluster.nodes[0].ctl(&["register", &user, "localhost", &password])?;
        Ok(Some(cluster))
    }

    pub fn url(&self, node: usize) -> String {
        format!("mqtts://{}:{NODE_PORT}", self.nodes[node].ip)
    }

    /// A device's `[hub]` section: `primary` first, then `failover` in order.
    pub fn device_hub_section(&self, primary: usize, failover: &[usize]) -> Result<String> {
        let file = self.dir.path().join("device-password");
        std::fs::write(&file, format!("{}\n", self.login.1))?;
        let others: Vec<String> = failover
            .iter()
            .map(|&i| format!("\"{}\"", self.url(i)))
            .collect();
        Ok(format!(
            "[hub]\nurl = \"{}\"\nfailover_urls = [{}]\nca_file = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\nreconnect_max_secs = 1\nkeep_alive_secs = 5\n",
            self.url(primary),
            others.join(", "),
            self.pki.ca.display(),
            self.login.0,
            file.display()
        ))
    }

    /// `outpost-ctl` connection flags for node `node`.
    pub fn cli_flags(&self, node: usize) -> Result<Vec<String>> {
        let file = self.dir.path().join("cli-password");
        std::fs::write(&file, &self.login.1)?;
        Ok(vec![
            "--hub".into(),
            self.url(node),
            "--ca".into(),
            self.pki.ca.display().to_string(),
            "--username".into(),
            self.login.0.clone(),
            "--password-file".into(),
            file.display().to_string(),
        ])
    }

    /// A plain MQTT client's options for node `node`.
    pub fn mqtt_options(&self, node: usize, client_id: &str) -> rumqttc::MqttOptions {
        let mut options =
            rumqttc::MqttOptions::new(client_id, self.nodes[node].ip.to_string(), NODE_PORT);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_credentials(&self.login.0, &self.login.1);
        options.set_transport(tls_transport(&self.pki, false));
        options
    }

    /// Operator settings for node `node` (the library's client).
    pub fn operator_settings(&self, node: usize) -> Result<Settings> {
        let file = self.dir.path().join("operator-password");
        std::fs::write(&file, format!("{}\n", self.login.1))?;
        Ok(Settings {
            client_id: "operator".into(),
            host: self.nodes[node].ip.to_string(),
            port: NODE_PORT,
            failover: Vec::new(),
            tls: Some(TlsFiles {
                ca_file: Some(self.pki.ca.clone()),
                client_auth: None,
                ca_setting: "--ca",
            }),
            credentials: Some((
                self.login.0.clone(),
                outpost_agent::hub::link::Password::read(&file)?,
            )),
            keep_alive: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
        })
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("---- {}\n{}", n.name, n.log()))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
