//! `outpost demo`: the whole story on one machine, from a fresh build. A hub broker on
//! loopback (Mosquitto), this agent with a throwaway state directory, a signed deployment that
//! runs `outpost-infer` with a small ONNX model (a digest-pinned artifact), inferences on the
//! device, and the telemetry that reaches the hub — printed as it happens. It runs the module
//! in the Docker engine when one answers (building its image locally, FROM scratch, from the
//! `outpost-infer` beside this binary) and as a process otherwise, and says which. Ctrl-C (or
//! the end of `--once`) stops everything it started and removes the module: nothing is left.
//!
//! This is the program's edge: errors are `anyhow` with the step that failed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::runtime::Runtime as _;

/// The model the demo serves (16 sensor values → a score; batch dimension symbolic).
const MODEL: &[u8] = include_bytes!("../../module/testdata/models/mlp.onnx");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoRuntime {
    /// Docker when an engine answers, else a process.
    Auto,
    Docker,
    Process,
}

pub struct Options {
    pub runtime: DemoRuntime,
    /// Inference requests to send.
    pub requests: usize,
    /// Stop after the first telemetry from the hub instead of waiting for Ctrl-C.
    pub once: bool,
    /// No hub broker even when Mosquitto is installed: the local API instead.
    pub no_hub: bool,
}

/// Prints a step with the time since the start.
struct Say(Instant);

impl Say {
    fn line(&self, text: impl AsRef<str>) {
        println!(
            "[{:>5.1}s] {}",
            self.0.elapsed().as_secs_f64(),
            text.as_ref()
        );
    }
}

/// A folder of the demo's own, removed at the end.
struct Folder(PathBuf);

impl Folder {
    fn new(name: &str) -> Result<Folder> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::update::record::private_dir(&dir)
            .with_context(|| format!("cannot make {}", dir.display()))?;
        // Run as root, the agent starts the process module as `nobody`, which must pass
        // through here to its model (it may pass, not list).
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
                .with_context(|| format!("cannot open up {}", dir.display()))?;
        }
        Ok(Folder(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What was started, stopped in reverse on the way out.
struct Started {
    /// `demo-PID`: its own on a shared engine.
    device: String,
    dir: Folder,
    broker: Option<tokio::process::Child>,
    agent: Option<tokio::process::Child>,
}

pub async fn run(opts: Options) -> Result<u8> {
    let say = Say(Instant::now());
    let dir = Folder::new("outpost-demo")?;
    let mut started = Started {
        device: format!("demo-{}", std::process::id()),
        dir,
        broker: None,
        agent: None,
    };
    let outcome = tokio::select! {
        r = story(&say, &opts, &mut started) => r,
        _ = tokio::signal::ctrl_c() => { say.line("Ctrl-C: stopping"); Ok(()) }
    };
    clean_up(&say, &mut started).await;
    match outcome {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!(
                "demo failed: {e:#}\n(the agent's log was {}/agent.log)",
                started.dir.path().display()
            );
            Ok(1)
        }
    }
}

async fn story(say: &Say, opts: &Options, started: &mut Started) -> Result<()> {
    let root = started.dir.path().to_path_buf();
    let device = started.device.clone();
    let me = std::env::current_exe().context("cannot find this program")?;
    let infer = me
        .parent()
        .map(|d| d.join("outpost-infer"))
        .filter(|p| p.is_file())
        .context("outpost-infer is not beside this binary: build it first (cargo build -p outpost-module)")?;

    // Docker or a process.
    let engine = crate::runtime::DockerRuntime::connect(Path::new("/var/run/docker.sock"))
        .await
        .ok();
    let engine_up = match &engine {
        Some(e) => e.info().await.is_ok(),
        None => false,
    };
    let docker = match opts.runtime {
        DemoRuntime::Docker if !engine_up => {
            bail!("--runtime docker: no Docker engine answers on /var/run/docker.sock")
        }
        DemoRuntime::Docker => true,
        DemoRuntime::Process => false,
        DemoRuntime::Auto => engine_up,
    };
    say.line(if docker {
        "runtime: the Docker engine answers — the module runs as a container"
    } else if engine_up {
        "runtime: process (asked for) — the module runs as a native process, no container"
    } else {
        "runtime: no container engine here — the module runs as a native process"
    });

    // The hub: Mosquitto on loopback when it is installed (and not declined); otherwise the
    // deployment goes through the agent's local API, as `outpost deploy --local` does.
    let mosquitto = if opts.no_hub {
        None
    } else {
        which("mosquitto")
    };
    let port = free_port()?;
    if let Some(mosquitto) = &mosquitto {
        let conf = root.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )?;
        started.broker = Some(
            tokio::process::Command::new(mosquitto)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start mosquitto")?,
        );
        wait_port(port, Duration::from_secs(10))
            .await
            .context("mosquitto did not listen")?;
        say.line(format!(
            "hub: Mosquitto on 127.0.0.1:{port} (plain MQTT, loopback only)"
        ));
    } else {
        say.line(if opts.no_hub {
            "hub: none (asked for) — the deployment goes through the agent's local API; telemetry stays in the device's outbox"
        } else {
            "hub: none — Mosquitto is not installed (apt-get install mosquitto for the hub part); the deployment goes through the agent's local API, and telemetry stays in the device's outbox"
        });
    }

    // The operator's key; the device trusts it.
    let key = crate::signing::generate_key().context("cannot make a signing key")?;
    let (_, public) = crate::signing::write_key_pair(&key, &root.join("operator"))
        .context("cannot write the key pair")?;

    // The model, as an artifact.
    let model = root.join("model.onnx");
    std::fs::write(&model, MODEL)?;
    let sha: String = <sha2::Sha256 as sha2::Digest>::digest(MODEL)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    // The module.
    let http = free_port()?;
    let state = root.join("state");
    let module = if docker {
        let image = infer_image(say, &infer).await?;
        json!({
            "image": image,
            "imagePullPolicy": "never",
            "artifacts": ["model"],
            "createOptions": {
                "Cmd": ["serve", "--model", "/outpost/artifacts/model", "--name", "sensor-score", "--listen", "0.0.0.0:8000"],
                "HostConfig": { "PortBindings": { "8000/tcp": [{ "HostIp": "127.0.0.1", "HostPort": http.to_string() }] } }
            }
        })
    } else {
        json!({
            "runtime": "process",
            "command": [infer.display().to_string(), "serve", "--model",
                state.join("artifacts/modules/infer/model").display().to_string(),
                "--name", "sensor-score", "--listen", format!("127.0.0.1:{http}")],
            "artifacts": ["model"]
        })
    };
    let config = root.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"{device}\"\nstate_dir = \"{state}\"\nlog_level = \"info\"\n\
             [api]\nsocket = \"{root}/api.sock\"\n\
             {hub}\
             [runtime]\nkind = \"{kind}\"\nstop_grace_secs = 5\n\
             [policy]\ntrusted_keys = [\"{public}\"]\nallow_image_tags = true\nallowed_executables = [\"{infer}\"]\n\
             [telemetry]\ninterval_secs = 2\n\
             [bus]\nlisten = \"127.0.0.1:{bus}\"\n",
            state = state.display(),
            root = root.display(),
            hub = if mosquitto.is_some() {
                format!("[hub]\nurl = \"mqtt://127.0.0.1:{port}\"\n")
            } else {
                String::new()
            },
            kind = if docker { "docker" } else { "process" },
            public = public.display(),
            infer = infer.display(),
            bus = free_port()?,
        ),
    )?;
    let log = std::fs::File::create(root.join("agent.log"))?;
    started.agent = Some(
        tokio::process::Command::new(&me)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the agent")?,
    );
    say.line(format!(
        "agent: `outpost run` started as device {device}, state in {} (throwaway)",
        state.display()
    ));

    let manifest = json!({
        "schemaVersion": "1.0",
        "id": "demo",
        "version": 1,
        "artifacts": { "model": { "url": format!("file://{}", model.display()), "sha256": sha, "size": MODEL.len() } },
        "modules": { "infer": module }
    });
    let expires = outpost_core::time::format_rfc3339(outpost_core::time::unix_now() + 3600);
    let bound = crate::binding::bind(
        manifest.to_string().as_bytes(),
        Some(&crate::manifest::Target::Device(device.clone())),
        &expires,
    )
    .map_err(anyhow::Error::msg)?;
    let envelope = crate::signing::sign(&bound, &key);
    if mosquitto.is_none() {
        return via_local_api(say, opts, &root.join("api.sock"), &envelope, http).await;
    }
    // The hub side: a client that publishes the deployment and hears the device.
    let topics = crate::hub::topics::Topics::new("outpost", &device);
    let mut mqtt = rumqttc::MqttOptions::new("demo-operator", "127.0.0.1", port);
    mqtt.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = rumqttc::AsyncClient::new(mqtt, 64);
    client
        .subscribe(topics.state(), rumqttc::QoS::AtLeastOnce)
        .await?;
    client
        .subscribe(topics.telemetry("#"), rumqttc::QoS::AtLeastOnce)
        .await?;

    client
        .publish(
            topics.deployment(),
            rumqttc::QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&envelope)?,
        )
        .await?;
    say.line("deployment demo v1: signed and published to the hub (retained)");

    // Follow the device until the module serves, then infer, then wait for telemetry.
    let mut inferred = false;
    let mut last_status = String::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if Instant::now() > deadline {
            bail!("the demo did not get through within 3 minutes");
        }
        let event = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
        let Ok(event) = event else {
            continue;
        };
        let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
            event.context("the hub connection failed")?
        else {
            continue;
        };
        if p.topic == topics.state() {
            let Ok(s) = serde_json::from_slice::<Value>(&p.payload) else {
                continue;
            };
            if s["deployment"].is_null() {
                continue;
            }
            let status = format!(
                "deployment {}: {}; module infer: {}",
                s["deployment"]["version"],
                s["deployment"]["status"].as_str().unwrap_or("-"),
                s["modules"]["infer"]["status"].as_str().unwrap_or("-")
            );
            if status != last_status {
                say.line(format!("device reports: {status}"));
                last_status = status;
            }
            let applied = s["deployment"]["status"] == "applied"
                && s["modules"]["infer"]["status"] == "running";
            if applied && !inferred {
                infer_some(say, http, opts.requests).await?;
                inferred = true;
                say.line("waiting for the device's telemetry at the hub…");
            }
        } else if inferred && p.topic.starts_with(&topics.telemetry("")) {
            say.line(format!(
                "telemetry at the hub: {} bytes on {}",
                p.payload.len(),
                p.topic
            ));
            if opts.once {
                return Ok(());
            }
        }
    }
}

/// Without a hub: the signed deployment through the agent's local API, then inferences.
async fn via_local_api(
    say: &Say,
    opts: &Options,
    socket: &Path,
    envelope: &crate::signing::Envelope,
    http: u16,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("the agent's local API did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let request = crate::api::ApiRequest::Deploy {
        manifest: serde_json::to_string(envelope)?,
        wait_secs: 120,
    };
    let mut outcome = None;
    crate::api::call(socket, &request, |event| match event {
        crate::api::ApiEvent::Accepted { id, version } => say.line(format!(
            "deployment {id} v{version}: signed, accepted by the agent's local API; applying"
        )),
        crate::api::ApiEvent::Done { status, reasons } => {
            say.line(format!("device reports: deployment 1: {status}"));
            for r in reasons {
                say.line(format!("  {r}"));
            }
            outcome = Some(status);
        }
        crate::api::ApiEvent::Rejected { issues } => {
            outcome = Some(format!(
                "rejected: {}",
                issues
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        _ => {}
    })
    .await
    .context("cannot reach the agent's local API")?;
    match outcome.as_deref() {
        Some("applied") => {}
        Some(other) => bail!("the deployment was not applied: {other}"),
        None => bail!("the agent did not say how the deployment went"),
    }
    infer_some(say, http, opts.requests).await?;
    if opts.once {
        return Ok(());
    }
    say.line("running; Ctrl-C stops it all");
    std::future::pending().await
}

/// Sends `n` inferences of 16 sensor values and prints the scores and latencies.
async fn infer_some(say: &Say, port: u16, n: usize) -> Result<()> {
    wait_port(port, Duration::from_secs(30))
        .await
        .context("outpost-infer did not listen")?;
    // Ready means the model is loaded.
    let ready = Instant::now() + Duration::from_secs(30);
    while !matches!(
        http(port, "GET", "/v2/health/ready", None).await,
        Ok((200, _))
    ) {
        if Instant::now() > ready {
            bail!("outpost-infer did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..n.max(1) {
        let data: Vec<f32> = (0..16).map(|j| ((i * 16 + j) % 7) as f32 / 7.0).collect();
        let body = json!({ "inputs": [{ "name": "sensor", "shape": [1, 16], "datatype": "FP32", "data": data }] });
        let t = Instant::now();
        let (status, reply) = http(
            port,
            "POST",
            "/v2/models/sensor-score/infer",
            Some(body.to_string()),
        )
        .await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if status != 200 {
            bail!("inference {i} answered {status}: {reply}");
        }
        let v: Value = serde_json::from_str(&reply).unwrap_or(Value::Null);
        say.line(format!(
            "inference {}: score {} ({ms:.1} ms over HTTP)",
            i + 1,
            v["outputs"][0]["data"][0]
        ));
    }
    Ok(())
}

/// One HTTP/1.1 request on loopback; the status and the body.
async fn http(port: u16, method: &str, path: &str, body: Option<String>) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let body = body.unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut out))
        .await
        .context("no answer in 30 s")??;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The module's image: `outpost-demo/infer:VERSION`, built once FROM scratch with the
/// `outpost-infer` binary and the shared libraries it links (`ldd`), so a debug build works too.
async fn infer_image(say: &Say, infer: &Path) -> Result<String> {
    // Tagged by the binary's digest: a rebuilt outpost-infer makes a new image.
    let (digest, _) = crate::fetch::digest_of(infer)
        .with_context(|| format!("cannot read {}", infer.display()))?;
    let tag = format!("outpost-demo/infer:{}", &digest[..12]);
    let have = tokio::process::Command::new("docker")
        .args(["image", "inspect", &tag])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if have {
        say.line(format!("image {tag}: on the engine already"));
        return Ok(tag);
    }
    say.line(format!(
        "image {tag}: building it (FROM scratch, {} and its libraries)",
        infer.display()
    ));
    let ctx = Folder::new("outpost-demo-image")?;
    let mut files: Vec<PathBuf> = vec![infer.to_path_buf()];
    let ldd = tokio::process::Command::new("ldd")
        .arg(infer)
        .output()
        .await;
    if let Ok(out) = ldd {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
            if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(PathBuf::from(path));
            }
        }
    }
    let mut dockerfile = String::from("FROM scratch\n");
    for (i, f) in files.iter().enumerate() {
        let name = format!("f{i}");
        std::fs::copy(f, ctx.path().join(&name))
            .with_context(|| format!("cannot copy {}", f.display()))?;
        let to = if i == 0 {
            PathBuf::from("/outpost-infer")
        } else {
            f.clone()
        };
        dockerfile.push_str(&format!("COPY {name} {}\n", to.display()));
    }
    dockerfile.push_str("ENTRYPOINT [\"/outpost-infer\"]\n");
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile)?;
    let out = tokio::process::Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(ctx.path())
        .output()
        .await
        .context("cannot run docker build")?;
    if !out.status.success() {
        bail!(
            "docker build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    say.line(format!("image {tag}: built"));
    Ok(tag)
}

/// Stops the agent, removes the module (container or process), stops the hub, removes the
/// folder.
async fn clean_up(say: &Say, started: &mut Started) {
    if let Some(mut agent) = started.agent.take() {
        if let Some(pid) = agent
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(Duration::from_secs(15), agent.wait())
            .await
            .is_err()
        {
            let _ = agent.kill().await;
        }
    }
    // The module outlives the agent by design: remove it as an operator would.
    let state = started.dir.path().join("state");
    let docker = crate::runtime::DockerRuntime::connect(Path::new("/var/run/docker.sock"))
        .await
        .ok();
    if let Ok(process) = crate::runtime::process::ProcessRuntime::new(&state) {
        let rt = crate::runtime::combined::Combined { docker, process };
        if let Ok(all) = rt.list(&started.device).await {
            for m in all {
                let _ = rt.stop(&m.id, Duration::from_secs(5)).await;
                let _ = rt.remove(&m.id).await;
            }
        }
    }
    if let Some(mut broker) = started.broker.take() {
        let _ = broker.kill().await;
    }
    say.line("stopped: the agent, the module and the hub; nothing of the demo is left running");
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_port(port: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .chain(
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(program)),
        )
        .find(|p| p.is_file())
}
