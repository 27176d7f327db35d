//! What systemd does for the agent's unit, for tests: start `outpost run`, start it again a
//! second after it exits (`Restart=always`), except after exit code 78
//! (`RestartPreventExitStatus=78`) or when told to stop. systemd itself cannot run here (no
//! init in the test container); this follows the unit's settings.

use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// `RestartSec=` in the tests (the unit says 2 s).
const RESTART_DELAY: Duration = Duration::from_secs(1);

pub struct Supervisor {
    stop: Arc<AtomicBool>,
    pid: Arc<Mutex<Option<u32>>>,
    starts: Arc<AtomicU32>,
    last: Arc<Mutex<Option<ExitStatus>>>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts the command `make` builds, and keeps it started.
    pub fn start(make: impl Fn() -> Command + Send + 'static) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(Mutex::new(None));
        let starts = Arc::new(AtomicU32::new(0));
        let last = Arc::new(Mutex::new(None));
        let (s, p, n, l) = (stop.clone(), pid.clone(), starts.clone(), last.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let mut child = make().spawn().expect("start outpost run");
                *p.lock().expect("pid") = Some(child.id());
                n.fetch_add(1, Ordering::SeqCst);
                if s.load(Ordering::SeqCst) {
                    // Told to stop while it was being started: it never saw the signal.
                    let _ = child.kill();
                }
                let status = child.wait().expect("wait for outpost run");
                *p.lock().expect("pid") = None;
                *l.lock().expect("last") = Some(status);
                if s.load(Ordering::SeqCst) || status.code() == Some(78) {
                    return;
                }
                std::thread::sleep(RESTART_DELAY);
            }
        });
        Supervisor {
            stop,
            pid,
            starts,
            last,
            thread: Some(thread),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().expect("pid")
    }

    pub fn starts(&self) -> u32 {
        self.starts.load(Ordering::SeqCst)
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    /// `kill -9` of the supervised process; it is started again.
    pub fn kill9(&self) {
        self.signal("-KILL");
    }

    /// SIGTERM, no restart; the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop.store(true, Ordering::SeqCst);
        self.signal("-TERM");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *self.last.lock().expect("last")
    }

    /// `kill -9`, no restart.
    pub fn kill_all(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.signal("-KILL");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill_all();
    }
}
