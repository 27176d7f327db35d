//! The model in service and its replacement: [`ModelSlot`] swaps a newly loaded model in
//! atomically, and watches the file for changes ([`FileStamp`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;

use super::load::{LoadError, LoadOptions, load};
use super::{InferError, LoadedModel};
use crate::metrics::Metrics;

/// What identifies a version of the model file: replacing it by rename changes the inode,
/// rewriting it in place changes the length or the modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode,
        })
    }
}

/// What the slot reports about its last load attempt.
#[derive(Debug, Clone, Default)]
struct SlotStatus {
    /// The last load's error, cleared by a successful load.
    last_error: Option<String>,
    loads: u64,
}

/// The model being served, and how to replace it. Cheap to read from any thread.
pub struct ModelSlot {
    /// The served name (`/v2/models/{name}`).
    pub name: String,
    pub path: PathBuf,
    options: LoadOptions,
    current: ArcSwapOption<LoadedModel>,
    status: Mutex<SlotStatus>,
    metrics: Arc<Metrics>,
}

impl ModelSlot {
    /// A slot with nothing loaded yet.
    pub fn new(name: String, path: PathBuf, options: LoadOptions, metrics: Arc<Metrics>) -> Self {
        ModelSlot {
            name,
            path,
            options,
            current: ArcSwapOption::empty(),
            status: Mutex::new(SlotStatus::default()),
            metrics,
        }
    }

    /// The model in service, if any. Holding the `Arc` keeps it alive through a swap.
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.current.load_full()
    }

    /// Why the slot is not ready (or why the last reload failed while an older model serves).
    pub fn last_error(&self) -> Option<String> {
        self.status.lock().ok().and_then(|s| s.last_error.clone())
    }

    /// The model, or the reason there is none, as a request error.
    pub fn require(&self) -> Result<Arc<LoadedModel>, InferError> {
        self.current().ok_or_else(|| {
            InferError::NotReady(self.last_error().unwrap_or_else(|| "still loading".into()))
        })
    }

    /// Loads the file now (blocking) and, when it loads, swaps it in. A failure leaves the
    /// model in service untouched and is kept as the slot's last error.
    pub fn load_now(&self) -> Result<Arc<LoadedModel>, LoadError> {
        let version = self.status.lock().map(|s| s.loads + 1).unwrap_or(1);
        match load(&self.path, &self.options, version) {
            Ok(model) => {
                let model = Arc::new(model);
                tracing::info!(
                    model = %self.name,
                    path = %self.path.display(),
                    version,
                    load_ms = model.load_time.as_secs_f64() * 1e3,
                    threads = model.threads,
                    plans = model.plans.made(),
                    inputs = %serde_json::to_string(&model.metadata_inputs()).unwrap_or_default(),
                    outputs = %serde_json::to_string(&model.metadata_outputs()).unwrap_or_default(),
                    "model loaded"
                );
                self.metrics.model_loaded(model.load_time);
                self.current.store(Some(model.clone()));
                if let Ok(mut s) = self.status.lock() {
                    s.loads = version;
                    s.last_error = None;
                }
                Ok(model)
            }
            Err(e) => {
                tracing::error!(model = %self.name, error = %e, serving_previous = self.current.load().is_some(), "model load failed");
                self.metrics.model_load_failed();
                if let Ok(mut s) = self.status.lock() {
                    s.last_error = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Watches the model file and reloads it when it changes, until `shutdown`.
    ///
    /// Polls the file's identity (inode, length, mtime) every `interval`: inotify does not see
    /// a file replaced through a bind mount, and polling a `stat` is cheap. A file that keeps
    /// changing is loaded once it has been stable for one interval, so a copy in progress is
    /// not loaded half-written (replace by rename to make it immediate).
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut tried: Option<FileStamp> = self
            .current()
            .map(|m| m.stamp.clone())
            .or_else(|| FileStamp::of(&self.path).ok());
        let mut pending: Option<FileStamp> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let Ok(now) = FileStamp::of(&self.path) else {
                continue;
            };
            if Some(&now) == tried.as_ref() {
                pending = None;
                continue;
            }
            if pending.as_ref() != Some(&now) {
                pending = Some(now);
                continue;
            }
            pending = None;
            tried = Some(now);
            tracing::info!(model = %self.name, "model file changed; loading it beside the current one");
            let slot = self.clone();
            // Loading takes hundreds of milliseconds of CPU: keep it off the async threads.
            let _ = tokio::task::spawn_blocking(move || slot.load_now()).await;
        }
    }
}
