//! `outpost-testmod`: the module the end-to-end tests deploy. Built as a static binary into a
//! FROM-scratch image. Behaviour comes from the environment:
//!
//! - `TESTMOD_EXIT_AFTER_MS` / `TESTMOD_EXIT_CODE`: exit after that long with that code;
//! - `TESTMOD_UNHEALTHY_AFTER_MS`: from then on, `outpost-testmod health` fails;
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
