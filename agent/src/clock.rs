//! Time the agent can trust, and time it cannot.
//!
//! A device without a real-time clock boots at 1970 and jumps decades when NTP answers; an
//! operator may set the clock by hand. So every deadline (restart backoff, rollback window,
//! retries, image cleanup) runs on the **monotonic** clock (`CLOCK_MONOTONIC`: time since boot,
//! never jumps), and the **wall** clock is only used for what people read (timestamps in
//! reports, telemetry) — never to decide when something happens.
//!
//! Monotonic readings compare only within one boot: each is paired with the boot's id
//! (`/proc/sys/kernel/random/boot_id`) when it is persisted, and a reading from another boot is
//! treated as "unknown", which every user resolves on the safe side (a deadline restarts rather
//! than firing early).
//!
//! The [`Clock`] trait lets tests drive both clocks: [`FakeClock`] follows tokio's (pausable)
//! time for the monotonic clock and lets a test set or jump the wall clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

pub use outpost_core::time::{PLAUSIBLE_AFTER_MS, format_rfc3339, parse_rfc3339, wall_now_ms};

/// A source of wall and monotonic time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Unix milliseconds by the wall clock: may read 1970, and may jump either way.
    fn wall_ms(&self) -> u64;
    /// Milliseconds of the monotonic clock (since boot): never goes back, never jumps.
    fn mono_ms(&self) -> u64;
    /// This boot's id: monotonic readings from another boot cannot be compared with ours.
    fn boot_id(&self) -> String;

    /// Whether the wall clock reads a time this build could be running at.
    fn wall_is_plausible(&self) -> bool {
        self.wall_ms() >= PLAUSIBLE_AFTER_MS
    }

    /// The tokio instant at which the monotonic clock reads `mono_ms` (now if it has passed).
    fn instant_at(&self, mono_ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(mono_ms.saturating_sub(self.mono_ms()))
    }
}

/// The shared handle the agent's parts hold.
pub type SharedClock = Arc<dyn Clock>;

/// The real clocks. The monotonic one is read with a direct system call (vDSO), so a clock
/// faked for the C library (libfaketime, in the drills) fakes the wall clock only.
#[derive(Debug, Clone)]
pub struct SystemClock {
    boot_id: String,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            boot_id: read_boot_id(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

/// The kernel's id of this boot; without `/proc` (some containers), a value unique to this
/// process, which makes every persisted monotonic reading "from another boot" — the safe side.
fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("process-{}-{}", std::process::id(), wall_now_ms()))
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        wall_now_ms()
    }

    fn mono_ms(&self) -> u64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        u64::try_from(t.tv_sec).unwrap_or(0) * 1000
            + u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000_000
    }

    fn boot_id(&self) -> String {
        self.boot_id.clone()
    }
}

/// Notes this boot in `{state_dir}/boot` and says whether the agent's last start was in another
/// boot (or it cannot tell: no file, no boot id): whether this start follows a reboot.
pub fn note_boot(state_dir: &std::path::Path, clock: &dyn Clock) -> bool {
    let path = state_dir.join("boot");
    let now = clock.boot_id();
    let before = std::fs::read_to_string(&path).ok();
    if !now.is_empty()
        && let Err(e) = crate::fsutil::write_atomic(&path, now.as_bytes(), 0o600)
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot note this boot; the next start will count as after a reboot");
    }
    now.is_empty() || before.is_none_or(|b| b.trim() != now)
}

/// A monotonic deadline remembered across agent restarts: valid in the boot that set it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootInstant {
    pub boot_id: String,
    pub mono_ms: u64,
}

impl BootInstant {
    pub fn now(clock: &dyn Clock) -> BootInstant {
        BootInstant {
            boot_id: clock.boot_id(),
            mono_ms: clock.mono_ms(),
        }
    }

    /// This instant on the current boot's monotonic clock; `None` when it was taken in another
    /// boot (its relation to now is unknown).
    pub fn in_this_boot(&self, clock: &dyn Clock) -> Option<u64> {
        (self.boot_id == clock.boot_id()).then_some(self.mono_ms)
    }
}

/// Clocks a test controls. The monotonic clock follows tokio's time (so a test with paused
/// time advances it instantly); the wall clock is the monotonic one plus an offset the test
/// sets, so it can read 1970 and jump decades.
#[derive(Debug, Clone)]
pub struct FakeClock {
    start: tokio::time::Instant,
    base_mono_ms: u64,
    wall_offset_ms: Arc<AtomicI64>,
    boot_id: Arc<std::sync::Mutex<String>>,
}

impl FakeClock {
    /// Monotonic time starts at `mono_ms`, the wall clock at `wall_ms`.
    pub fn new(wall_ms: u64, mono_ms: u64) -> FakeClock {
        FakeClock {
            start: tokio::time::Instant::now(),
            base_mono_ms: mono_ms,
            wall_offset_ms: Arc::new(AtomicI64::new(wall_ms as i64 - mono_ms as i64)),
            boot_id: Arc::new(std::sync::Mutex::new("boot-1".into())),
        }
    }

    /// Sets the wall clock to `wall_ms` now; it goes on from there.
    pub fn set_wall(&self, wall_ms: u64) {
        self.wall_offset_ms
            .store(wall_ms as i64 - self.mono_ms() as i64, Ordering::SeqCst);
    }

    /// Pretends the device rebooted: a new boot id (monotonic time goes on; only the id is
    /// what readers compare).
    pub fn reboot(&self, boot_id: &str) {
        *self.boot_id.lock().unwrap_or_else(|p| p.into_inner()) = boot_id.to_string();
    }
}

impl Clock for FakeClock {
    fn wall_ms(&self) -> u64 {
        let wall = self.mono_ms() as i64 + self.wall_offset_ms.load(Ordering::SeqCst);
        wall.max(0) as u64
    }

    fn mono_ms(&self) -> u64 {
        self.base_mono_ms + self.start.elapsed().as_millis() as u64
    }

    fn boot_id(&self) -> String {
        self.boot_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_reads_both_clocks() {
        let c = SystemClock::new();
        let (a, b) = (c.mono_ms(), c.mono_ms());
        assert!(b >= a);
        assert!(!c.boot_id().is_empty());
        assert_eq!(
            c.boot_id(),
            SystemClock::new().boot_id(),
            "one boot, one id"
        );
    }

    #[tokio::test]
    async fn a_start_follows_a_reboot_unless_the_last_one_was_in_this_boot() {
        let dir = tempfile::tempdir().expect("a state folder");
        let clock = FakeClock::new(0, 0);
        assert!(note_boot(dir.path(), &clock), "no note yet: cannot tell");
        assert!(!note_boot(dir.path(), &clock), "the same boot");
        clock.reboot("boot-2");
        assert!(note_boot(dir.path(), &clock), "another boot");
        assert!(!note_boot(dir.path(), &clock));
    }

    #[tokio::test(start_paused = true)]
    async fn fake_wall_clock_jumps_while_monotonic_goes_on() {
        let c = FakeClock::new(0, 5_000);
        assert!(!c.wall_is_plausible(), "1970 is not a plausible time");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(c.mono_ms(), 15_000);
        assert_eq!(c.wall_ms(), 10_000);
        c.set_wall(PLAUSIBLE_AFTER_MS + 1);
        assert!(c.wall_is_plausible());
        assert_eq!(
            c.mono_ms(),
            15_000,
            "a wall jump does not move monotonic time"
        );
    }

    // Paused: the fake clock reads tokio's clock, which otherwise runs in real time (under
    // qemu, 6 ms passed between two lines).
    #[tokio::test(start_paused = true)]
    async fn boot_instants_compare_only_within_their_boot() {
        let c = FakeClock::new(0, 1_000);
        let at = BootInstant::now(&c);
        assert_eq!(at.in_this_boot(&c), Some(1_000));
        c.reboot("boot-2");
        assert_eq!(at.in_this_boot(&c), None);
    }
}
