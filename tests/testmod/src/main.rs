//! `outpost-testmod`: the module the end-to-end tests deploy. Built as a static binary into a
//! FROM-scratch image. Behaviour comes from the environment:
//!
//! - `TESTMOD_EXIT_AFTER_MS` / `TESTMOD_EXIT_CODE`: exit after that long with that code;
//! - `TESTMOD_UNHEALTHY_AFTER_MS`: from then on, `outpost-testmod health` fails;
//! - on the local bus (`OUTPOST_BUS_URL`, `OUTPOST_BUS_USER`, `OUTPOST_BUS_PASSWORD`):
//!   `TESTMOD_PUBLISH_COUNT` records of `TESTMOD_PUBLISH_SIZE` bytes (default 200) to
//!   `modules/{name}/outputs/{TESTMOD_PUBLISH_TOPIC or data}` at QoS 1, one every
//!   `TESTMOD_PUBLISH_EVERY_MS` (default: as fast as acknowledged), each `{"n": i, ...}`;
//!   prints `published N` once the bus acknowledged all of them. `TESTMOD_SUBSCRIBE`: a filter
//!   to subscribe to; prints `received TOPIC PAYLOAD` for each message;
//! - otherwise it runs until SIGTERM, and exits 0 on it (as a well-behaved module should).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const UNHEALTHY_MARK: &str = "/unhealthy";

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("health") {
        std::process::exit(if std::path::Path::new(UNHEALTHY_MARK).exists() {
            1
        } else {
            0
        });
    }
    let term = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, term.clone()) {
            eprintln!("testmod: cannot handle signal {signal}: {e}");
        }
    }
    let exit_after = env_ms("TESTMOD_EXIT_AFTER_MS");
    let code: i32 = std::env::var("TESTMOD_EXIT_CODE")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let unhealthy_after = env_ms("TESTMOD_UNHEALTHY_AFTER_MS");
    let started = Instant::now();
    println!("testmod started (pid {})", std::process::id());
    if let Ok(url) = std::env::var("OUTPOST_BUS_URL") {
        bus(&url);
    }
    loop {
        if term.load(Ordering::Relaxed) {
            println!("testmod stopping on signal");
            return;
        }
        if exit_after.is_some_and(|a| started.elapsed() >= a) {
            println!("testmod exiting with code {code}");
            std::process::exit(code);
        }
        if unhealthy_after.is_some_and(|a| started.elapsed() >= a)
            && std::fs::write(UNHEALTHY_MARK, b"1").is_err()
        {
            eprintln!("testmod: cannot write {UNHEALTHY_MARK}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to the local bus and starts publishing and/or subscribing on threads of their own.
fn bus(url: &str) {
    let env = |k: &str| std::env::var(k).ok();
    let Some(hostport) = url.strip_prefix("mqtt://") else {
        eprintln!("testmod: bus url {url} is not mqtt://");
        return;
    };
    let Some((host, port)) = hostport.rsplit_once(':') else {
        eprintln!("testmod: bus url {url} has no port");
        return;
    };
    let name = env("OUTPOST_MODULE_NAME").unwrap_or_else(|| "testmod".into());
    let mut options = rumqttc::MqttOptions::new(
        format!("{name}-{}", std::process::id()),
        host,
        port.parse().unwrap_or(1884),
    );
    if let (Some(user), Some(password)) = (env("OUTPOST_BUS_USER"), env("OUTPOST_BUS_PASSWORD")) {
        options.set_credentials(user, password);
    }
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut connection) = rumqttc::Client::new(options, 100);
    let count: u64 = env("TESTMOD_PUBLISH_COUNT")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let subscribe = env("TESTMOD_SUBSCRIBE");
    std::thread::spawn({
        let client = client.clone();
        let subscribe = subscribe.clone();
        move || {
            let mut acked = 0u64;
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        println!("bus connected");
                        if let Some(filter) = &subscribe {
                            let _ =
                                client.try_subscribe(filter.as_str(), rumqttc::QoS::AtLeastOnce);
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        acked += 1;
                        if acked == count {
                            println!("published {count}");
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) => {
                        println!("subscribed {:?}", a.return_codes);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        println!(
                            "received {} {}",
                            p.topic,
                            String::from_utf8_lossy(&p.payload)
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        println!("bus error: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        }
    });
    if count == 0 {
        return;
    }
    let topic = format!(
        "modules/{name}/outputs/{}",
        env("TESTMOD_PUBLISH_TOPIC").unwrap_or_else(|| "data".into())
    );
    let size: usize = env("TESTMOD_PUBLISH_SIZE")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let every = env_ms("TESTMOD_PUBLISH_EVERY_MS");
    std::thread::spawn(move || {
        for n in 0..count {
            let head = format!("{{\"n\":{n},\"pad\":\"");
            let pad = size.saturating_sub(head.len() + 2);
            let payload = format!("{head}{}\"}}", "x".repeat(pad));
            if let Err(e) =
                client.publish(topic.as_str(), rumqttc::QoS::AtLeastOnce, false, payload)
            {
                eprintln!("testmod: publish failed: {e}");
                return;
            }
            if let Some(every) = every {
                std::thread::sleep(every);
            }
        }
    });
}
