//! Staying usable after an I/O error: every operation runs through [`Store::run`], which
//! records the failure, reopens the database (redb recovers to the last commit) and tries
//! once more; a critical write on a full disk first gets the reserve. Reopens are limited by
//! the [`ReopenLimiter`] so that a dead disk does not spin.

use std::collections::VecDeque;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use redb::Database;
use tracing::{debug, info, warn};

use super::files::{OpenFailure, open_db, wall_ms};
use super::{Inner, Kind, Store, StoreError, StoreIoError};

impl Store {
    /// Runs `f` on the database; after an error a reopen may cure, reopens and runs it once
    /// more. For lack of space, a critical write first gets the reserve; other operations are
    /// not tried again (nothing has freed space), but the store is still reopened so that reads
    /// keep working.
    pub(super) fn run<T>(
        &self,
        op: &'static str,
        kind: Kind,
        f: impl Fn(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut released = false;
        let mut retried = false;
        loop {
            let (result, generation) = {
                let slot = self
                    .inner
                    .slot
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                let result = match &slot.db {
                    Some(db) => f(db),
                    None => Err(StoreError::Closed {
                        op,
                        reason: self
                            .inner
                            .status()
                            .closed_reason
                            .clone()
                            .unwrap_or_else(|| "not reopened yet".into()),
                    }),
                };
                (result, slot.generation)
            };
            let err = match result {
                Ok(value) => {
                    self.inner.succeeded(kind);
                    return Ok(value);
                }
                Err(e) if !e.wants_reopen() => return Err(e),
                Err(e) => e,
            };
            let no_space = err.is_no_space();
            self.inner.failed(&err);
            if no_space && kind == Kind::Critical && !released {
                released = self.inner.release_reserve();
            }
            let reopened = self.inner.reopen(generation, kind == Kind::Critical);
            if retried || !reopened || (no_space && !released) {
                return Err(err);
            }
            retried = true;
        }
    }
}

impl Inner {
    fn succeeded(&self, kind: Kind) {
        let mut status = self.status();
        // A read proves nothing about writes on a full disk.
        let clears = match &status.io_error {
            None => false,
            Some(e) => kind != Kind::Read || !e.no_space,
        };
        if clears {
            status.io_error = None;
            info!(path = %self.path.display(), "the store works again");
        }
    }

    fn failed(&self, err: &StoreError) {
        let message = err.to_string();
        let no_space = err.is_no_space();
        let mut status = self.status();
        match &mut status.io_error {
            Some(e) => {
                e.message = message;
                e.no_space = no_space;
            }
            None => {
                warn!(path = %self.path.display(), error = %message, no_space, "store operation failed; reopening the store");
                status.io_error = Some(StoreIoError {
                    message,
                    no_space,
                    since_ms: wall_ms(),
                });
            }
        }
    }

    /// Drops the handle that failed on `generation` and opens the file again. Returns whether
    /// there is an open handle now (someone else's reopen counts).
    pub(super) fn reopen(&self, generation: u64, may_release: bool) -> bool {
        let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
        if slot.generation != generation {
            return slot.db.is_some();
        }
        if !self.status().limiter.allow(Instant::now()) {
            debug!(path = %self.path.display(), "store reopen held back (at most one a second)");
            return false;
        }
        if let Some(old) = slot.db.take() {
            // Closing flushes; after an I/O error that fails as well, which is expected.
            if let Err(e) = old.close() {
                debug!(error = %e, "closing the failed store handle");
            }
        }
        slot.generation += 1;
        match self.open_file(false, may_release) {
            Ok(db) => {
                slot.db = Some(db);
                self.status().closed_reason = None;
                info!(path = %self.path.display(), "store reopened");
                true
            }
            Err(failure) => {
                warn!(path = %self.path.display(), error = %failure, "cannot reopen the store; trying again later");
                self.status().closed_reason = Some(failure.to_string());
                false
            }
        }
    }

    /// Opens the file, giving back the reserve and trying again if that failed for lack of
    /// space (opening after a crash commits a repair).
    pub(super) fn open_file(
        &self,
        check: bool,
        may_release: bool,
    ) -> Result<Database, OpenFailure> {
        match open_db(&self.path, check) {
            Err(OpenFailure::NoSpace(_)) if may_release && self.release_reserve() => {
                open_db(&self.path, check)
            }
            other => other,
        }
    }
}

/// At most [`ReopenLimiter::BURST`] reopens in any [`ReopenLimiter::WINDOW`]: a dead disk
/// costs one reopen a second, while one disk-full event (a failed write, a reopen, a retry
/// that fails again and a reopen to leave the store readable) is not held back.
#[derive(Debug, Default)]
pub struct ReopenLimiter {
    recent: VecDeque<Instant>,
}

impl ReopenLimiter {
    pub const BURST: usize = 3;
    pub const WINDOW: Duration = Duration::from_secs(3);

    /// Whether a reopen may happen at `now`; counts it if so.
    pub fn allow(&mut self, now: Instant) -> bool {
        while let Some(&oldest) = self.recent.front() {
            if now.saturating_duration_since(oldest) >= Self::WINDOW {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= Self::BURST {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopens_are_limited_to_a_burst_then_one_a_second() {
        let mut limiter = ReopenLimiter::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(limiter.allow(ms(0)));
        assert!(limiter.allow(ms(1)));
        assert!(limiter.allow(ms(2)));
        assert!(!limiter.allow(ms(3)), "a fourth at once is held back");
        assert!(!limiter.allow(ms(2_999)));
        assert!(limiter.allow(ms(3_000)), "the first one left the window");
        assert!(!limiter.allow(ms(3_000)));
        // Steady state on a dead disk: one a second.
        let allowed = (0..10_000)
            .filter(|i| limiter.allow(ms(3_002 + i * 10)))
            .count();
        assert!((99..=101).contains(&allowed), "{allowed} in 100 s");
    }
}
