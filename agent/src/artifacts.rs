//! Artifacts: the files a deployment names by URL, SHA-256 and size (models above all), and
//! the modules' view of them.
//!
//! Models change far more often than the code that serves them. A deployment pins each file
//! by digest in its top-level `artifacts`, each module lists the names it reads, and a new
//! model reaches a running module as a swapped link, without a new image or a restart.
//!
//! # On disk, under `{state_dir}/artifacts/`
//!
//! - `sha256/{digest}`: each file once, whatever modules or deployments name it. It gets that
//!   name only once its size and digest match ([`Fetcher`]); it grows as `{digest}.part` before
//!   (resumed after a lost link or a reboot). Stored read-only (0444).
//! - `modules/{module}/{name}`: one hard link per artifact the module names (file name = the
//!   artifact's name), so the module reads a path that never changes while its content is
//!   replaced atomically: a new link is made under a temporary name and renamed over the old
//!   one. A reader that holds the old file open keeps reading the old content; the next open
//!   sees the new. The folder is what a container gets read-only at
//!   [`ARTIFACTS_MOUNT`](crate::runtime::spec::ARTIFACTS_MOUNT) (a folder bind, not a file
//!   bind: a file bind would pin the old inode).
//!
//! # API
//!
//! - [`Artifacts::new`]: the store and its fetch tasks (bounded by a semaphore, retried with
//!   backoff while the error is transient).
//! - [`Artifacts::ensure`]: never waits on the network. Says, per module, what it still waits
//!   for ([`ArtifactWait`], what the planner reads) and starts the fetches that are missing.
//! - [`Artifacts::link`]: makes a module's folder hold its artifacts' links. New names are
//!   linked at once (nobody reads them yet); a name whose digest changed is swapped only when
//!   the caller says the deployment is staged (`swap`), which is stage, verify, switch.
//! - [`Artifacts::module_dir`]: the folder to give the module (a bind mount, or for a process
//!   `OUTPOST_ARTIFACTS_DIR` itself).
//! - [`Artifacts::collect`]: removes files, part files and module folders that the
//!   deployments to keep (the desired one and the last good one) no longer name, and stops
//!   their fetches. It runs at once: a file no kept deployment names cannot be used, and one
//!   still linked by a module folder is never removed.
//! - [`Artifacts::subscribe`]: a signal each time a fetch ends or fails (the reconciler passes
//!   then).
//! - [`Artifacts::shutdown`]: cancels the fetches and waits for their tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::fetch::{FetchError, Fetcher};
use crate::manifest::{Artifact, Deployment};
use crate::planner::ArtifactWait;

/// First wait before a transient failure is tried again; doubled up to [`RETRY_CAP`].
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);
/// A definitive failure (wrong digest or size) is tried again only after this long, or at
/// once when a deployment names another URL for the digest: the same URL would serve the
/// same wrong bytes, but the server may be fixed meanwhile.
const DEFINITIVE_RETRY: Duration = Duration::from_secs(600);
/// Progress is logged (and told to subscribers) at most this often per file.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Where temporary links are made before they are renamed over a module's artifact.
const TEMP_SUFFIX: &str = crate::fsutil::TEMP_SUFFIX;

/// Why the artifact store could not do something on disk.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("artifact `{name}` of module `{module}` is not fetched yet")]
    NotFetched { module: String, name: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ArtifactError + use<> {
    let path = path.to_path_buf();
    move |source| ArtifactError::Io { what, path, source }
}

/// The artifact store of a device. Cheap to clone: clones share the store and its fetches.
#[derive(Clone)]
pub struct Artifacts {
    inner: Arc<Inner>,
}

struct Inner {
    /// `{state_dir}/artifacts/sha256`: the files by digest.
    store: PathBuf,
    /// `{state_dir}/artifacts/modules`: the modules' folders of links.
    modules: PathBuf,
    fetcher: Fetcher,
    /// Bounds the fetches under way at once (a metered link, a small disk).
    slots: Arc<Semaphore>,
    /// Fetches by digest: running, or failed and not retried yet. A digest absent here and
    /// absent from the store has not been asked for.
    jobs: Mutex<BTreeMap<String, Job>>,
    /// Bumped each time a fetch ends, fails or makes progress worth telling.
    changed: watch::Sender<u64>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    progress: std::sync::OnceLock<tokio::sync::broadcast::Sender<crate::runtime::PullProgress>>,
}

/// One digest being fetched, or failed.
struct Job {
    /// The URL it is fetched from (a new URL for the digest restarts a failed fetch).
    url: String,
    state: JobState,
}

enum JobState {
    Running {
        /// Cancels this fetch alone (its digest is no longer wanted).
        cancel: CancellationToken,
        /// The last transient failure, being retried.
        problem: Option<String>,
    },
    Failed {
        message: String,
        definitive: bool,
        at: Instant,
    },
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

impl Artifacts {
    /// The store under `{state_dir}/artifacts`, fetching with `fetcher`, at most
    /// `max_concurrent` files at once. Nothing is read or created on disk until used.
    pub fn new(state_dir: &Path, fetcher: Fetcher, max_concurrent: usize) -> Artifacts {
        let root = state_dir.join("artifacts");
        Artifacts {
            inner: Arc::new(Inner {
                store: root.join("sha256"),
                modules: root.join("modules"),
                fetcher,
                slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
                jobs: Mutex::default(),
                changed: watch::channel(0).0,
                tasks: TaskTracker::new(),
                cancel: CancellationToken::new(),
                progress: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Where fetch progress goes besides the log: the reconciler's pull progress, which
    /// `outpost deploy --local` draws (as `artifact DIGEST12`). Set once.
    pub fn report_progress_to(
        &self,
        tx: tokio::sync::broadcast::Sender<crate::runtime::PullProgress>,
    ) {
        let _ = self.inner.progress.set(tx);
    }

    /// Where the verified file of `digest` is kept.
    pub fn file(&self, digest: &str) -> PathBuf {
        self.inner.store.join(digest)
    }

    /// The folder holding one link per artifact `module` names: what the module reads.
    pub fn module_dir(&self, module: &str) -> PathBuf {
        self.inner.modules.join(module)
    }

    /// A signal each time a fetch ends, fails or makes progress: call `changed()` on it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Whether the verified file of `artifact` is in the store. The name is given only after
    /// verification, so the length is checked but the content is not hashed again on every
    /// pass ([`Fetcher::fetch`] hashes it again when asked to fetch it).
    fn present(&self, artifact: &Artifact) -> bool {
        self.file(&artifact.sha256)
            .metadata()
            .is_ok_and(|m| m.is_file() && m.len() == artifact.size)
    }

    /// What each module of `deployment` still waits for; modules with every artifact present
    /// (or naming none) are absent from the answer. Starts the fetches that are needed and
    /// not under way, and restarts failed ones that are due. Never waits on the network.
    pub fn ensure(&self, deployment: &Deployment) -> BTreeMap<String, ArtifactWait> {
        let mut per_digest: BTreeMap<&str, Option<ArtifactWait>> = BTreeMap::new();
        let mut waits = BTreeMap::new();
        for (module, m) in &deployment.modules {
            let mut wait: Option<ArtifactWait> = None;
            for name in &m.artifacts {
                let Some(artifact) = deployment.artifacts.get(name) else {
                    // Validation refuses this; say so rather than panic if it got through.
                    wait = Some(ArtifactWait::Failed {
                        message: format!("artifact `{name}` is not in the deployment"),
                        definitive: true,
                    });
                    continue;
                };
                let state = per_digest
                    .entry(&artifact.sha256)
                    .or_insert_with(|| self.ensure_one(artifact))
                    .clone();
                wait = worse(
                    wait,
                    state.map(|s| match s {
                        ArtifactWait::Failed {
                            message,
                            definitive,
                        } => ArtifactWait::Failed {
                            message: format!("artifact `{name}`: {message}"),
                            definitive,
                        },
                        ArtifactWait::Fetching { problem } => ArtifactWait::Fetching {
                            problem: problem.map(|p| format!("artifact `{name}`: {p}")),
                        },
                    }),
                );
            }
            if let Some(wait) = wait {
                waits.insert(module.clone(), wait);
            }
        }
        waits
    }

    /// Where one artifact stands; starts its fetch when needed.
    fn ensure_one(&self, artifact: &Artifact) -> Option<ArtifactWait> {
        if self.present(artifact) {
            return None;
        }
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = jobs.get(&artifact.sha256) {
            match &job.state {
                JobState::Running { problem, .. } => {
                    return Some(ArtifactWait::Fetching {
                        problem: problem.clone(),
                    });
                }
                JobState::Failed {
                    message,
                    definitive,
                    at,
                } => {
                    let due = if *definitive {
                        DEFINITIVE_RETRY
                    } else {
                        Duration::ZERO
                    };
                    if job.url == artifact.url && at.elapsed() < due {
                        return Some(ArtifactWait::Failed {
                            message: message.clone(),
                            definitive: *definitive,
                        });
                    }
                }
            }
        }
        let cancel = self.inner.cancel.child_token();
        jobs.insert(
            artifact.sha256.clone(),
            Job {
                url: artifact.url.clone(),
                state: JobState::Running {
                    cancel: cancel.clone(),
                    problem: None,
                },
            },
        );
        drop(jobs);
        let (this, artifact) = (self.clone(), artifact.clone());
        self.inner
            .tasks
            .spawn(async move { this.fetch(artifact, cancel).await });
        Some(ArtifactWait::Fetching { problem: None })
    }

    /// One digest's fetch task: waits for a slot, fetches, retries transient failures with
    /// backoff, and records how it ended.
    async fn fetch(self, artifact: Artifact, cancel: CancellationToken) {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = self.inner.slots.clone().acquire_owned() => p,
        };
        // The semaphore is never closed; without a permit there is nothing to do anyway.
        let Ok(_permit) = permit else {
            return;
        };
        let digest = artifact.sha256.clone();
        let mut attempt = 0u32;
        loop {
            info!(digest = %digest, url = %artifact.url, size = artifact.size, attempt, "fetching artifact");
            let started = Instant::now();
            let mut last_told = Instant::now();
            let progress = |have: u64, total: u64| {
                if let Some(tx) = self.inner.progress.get() {
                    // No receiver (nobody is watching) is no error.
                    let _ = tx.send(crate::runtime::PullProgress {
                        image: format!("artifact {}", &digest[..12.min(digest.len())]),
                        status: "Downloading".to_string(),
                        current_bytes: have,
                        total_bytes: total,
                    });
                }
                if last_told.elapsed() >= PROGRESS_EVERY {
                    last_told = Instant::now();
                    info!(digest = %digest, have, total, percent = have * 100 / total.max(1), "fetching artifact");
                }
            };
            let result = self
                .inner
                .fetcher
                .fetch(&artifact, &self.inner.store, progress, &cancel)
                .await;
            match result {
                Ok(path) => {
                    // Read-only: a link in a module's folder is the same inode, and nothing
                    // should write through it.
                    if let Err(e) =
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
                    {
                        debug!(path = %path.display(), error = %e, "cannot make the artifact read-only");
                    }
                    info!(digest = %digest, size = artifact.size, secs = started.elapsed().as_secs_f64(), verified = true, "artifact fetched");
                    self.finish(&digest, None);
                    return;
                }
                Err(FetchError::Cancelled) => return,
                Err(e) if e.is_transient() => {
                    attempt = attempt.saturating_add(1);
                    let wait = RETRY_BASE
                        .saturating_mul(1 << attempt.min(6).saturating_sub(1))
                        .min(RETRY_CAP);
                    warn!(digest = %digest, error = %e, retry_secs = wait.as_secs(), "artifact fetch failed; retrying");
                    self.set_problem(
                        &digest,
                        format!("{e} (attempt {attempt}, retrying in {} s)", wait.as_secs()),
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    warn!(digest = %digest, error = %e, "artifact cannot be fetched as the deployment names it");
                    self.finish(&digest, Some(e.to_string()));
                    return;
                }
            }
        }
    }

    fn set_problem(&self, digest: &str, message: String) {
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Job {
            state: JobState::Running { problem, .. },
            ..
        }) = jobs.get_mut(digest)
        {
            *problem = Some(message);
        }
        drop(jobs);
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records the end of a fetch: forgotten when it succeeded (the file is the record),
    /// kept as a definitive failure otherwise.
    fn finish(&self, digest: &str, failure: Option<String>) {
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match failure {
            None => {
                jobs.remove(digest);
            }
            Some(message) => {
                if let Some(job) = jobs.get_mut(digest) {
                    job.state = JobState::Failed {
                        message,
                        definitive: true,
                        at: Instant::now(),
                    };
                }
            }
        }
        drop(jobs);
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The modules of `deployment` whose folder of links a swap would change: a name linked
    /// to another digest that is fetched now, or a name the module no longer reads. What
    /// [`Artifacts::link`] does with `swap` only, which windows and locks hold back. Reads only.
    pub fn pending_swaps(&self, deployment: &Deployment) -> BTreeSet<String> {
        deployment
            .modules
            .iter()
            .filter(|(module, m)| {
                let Ok(entries) = std::fs::read_dir(self.module_dir(module)) else {
                    // No folder yet: its first links are made at once, not swapped.
                    return false;
                };
                entries.flatten().any(|entry| {
                    let file = entry.file_name();
                    let file = file.to_string_lossy();
                    // A temporary link of an interrupted swap is no change to hold.
                    if file.starts_with('.') {
                        return false;
                    }
                    let Some(name) = m.artifacts.iter().find(|n| **n == *file) else {
                        return true;
                    };
                    let Some(artifact) = deployment.artifacts.get(name) else {
                        return false;
                    };
                    match (
                        entry.path().metadata(),
                        self.file(&artifact.sha256).metadata(),
                    ) {
                        (Ok(linked), Ok(wanted)) => {
                            linked.ino() != wanted.ino() || linked.dev() != wanted.dev()
                        }
                        // The new file is not fetched yet: staging waits for it anyway.
                        _ => false,
                    }
                })
            })
            .map(|(module, _)| module.clone())
            .collect()
    }

    /// Makes `{module_dir}` hold one link per artifact `module` names in `deployment`.
    ///
    /// A name not linked yet is linked at once. A name linked to another digest is swapped
    /// (atomically: a link under a temporary name renamed over it) only when `swap`, as are
    /// names the module no longer reads removed: the caller passes `swap` once the whole
    /// deployment is staged. Returns whether anything changed.
    ///
    /// Fails when an artifact is not fetched yet (call [`Artifacts::ensure`] first) or the
    /// folder cannot be written.
    pub fn link(
        &self,
        module: &str,
        deployment: &Deployment,
        swap: bool,
    ) -> Result<bool, ArtifactError> {
        let names: &[String] = deployment
            .modules
            .get(module)
            .map_or(&[], |m| &m.artifacts[..]);
        let dir = self.module_dir(module);
        if names.is_empty() && !dir.exists() {
            return Ok(false);
        }
        create_dir(&dir)?;
        let mut changed = false;
        for name in names {
            let Some(artifact) = deployment.artifacts.get(name) else {
                continue;
            };
            let target = self.file(&artifact.sha256);
            let source = target
                .metadata()
                .ok()
                .filter(|m| m.len() == artifact.size)
                .ok_or_else(|| ArtifactError::NotFetched {
                    module: module.to_string(),
                    name: name.clone(),
                })?;
            let path = dir.join(name);
            match path.symlink_metadata() {
                Ok(m) if m.ino() == source.ino() && m.dev() == source.dev() => continue,
                Ok(_) if !swap => continue,
                _ => {}
            }
            replace_link(&target, &path)?;
            info!(module, artifact = %name, digest = %artifact.sha256, "artifact linked");
            changed = true;
        }
        if swap {
            for entry in std::fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
                let entry = entry.map_err(io_err("cannot list", &dir))?;
                let file = entry.file_name();
                let file = file.to_string_lossy();
                // Temporary links of an interrupted swap go too.
                if names.iter().any(|n| *n == file) {
                    continue;
                }
                let path = entry.path();
                remove_any(&path)?;
                info!(module, file = %file, "artifact no longer named; unlinked");
                changed = true;
            }
        }
        if changed {
            crate::fsutil::sync_dir(&dir).map_err(io_err("cannot fsync", &dir))?;
        }
        Ok(changed)
    }

    /// Removes what none of `keep` (the desired and the last good deployment) names: stored
    /// files not linked by any module folder, part files, module folders of modules that
    /// none of them has, and the fetches under way for digests none of them names. Returns
    /// how many files and folders were removed.
    ///
    /// Fails when the store cannot be listed; a file that cannot be removed is logged and
    /// left for the next time.
    pub fn collect<'a>(
        &self,
        keep: impl IntoIterator<Item = &'a Deployment>,
    ) -> Result<usize, ArtifactError> {
        let mut digests: BTreeSet<String> = BTreeSet::new();
        let mut modules: BTreeSet<String> = BTreeSet::new();
        for d in keep {
            for (name, m) in &d.modules {
                if !m.artifacts.is_empty() {
                    modules.insert(name.clone());
                }
                digests.extend(
                    m.artifacts
                        .iter()
                        .filter_map(|a| d.artifacts.get(a))
                        .map(|a| a.sha256.clone()),
                );
            }
        }
        {
            let mut jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.retain(|digest, job| {
                let wanted = digests.contains(digest);
                if !wanted && let JobState::Running { cancel, .. } = &job.state {
                    info!(digest = %digest, "artifact no longer named; fetch stopped");
                    cancel.cancel();
                }
                wanted
            });
        }
        let mut removed = 0;
        if self.inner.modules.is_dir() {
            let dir = &self.inner.modules;
            for entry in std::fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
                let entry = entry.map_err(io_err("cannot list", dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if modules.contains(&name) {
                    continue;
                }
                match remove_any(&entry.path()) {
                    Ok(()) => {
                        info!(module = %name, "artifact folder of a module no longer named removed");
                        removed += 1;
                    }
                    Err(e) => warn!(error = %e, "cannot remove an artifact folder"),
                }
            }
        }
        if !self.inner.store.is_dir() {
            return Ok(removed);
        }
        let dir = &self.inner.store;
        for entry in std::fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
            let entry = entry.map_err(io_err("cannot list", dir))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let digest = file.strip_suffix(".part").unwrap_or(&file);
            if digests.contains(digest) {
                continue;
            }
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            // Still linked from a module's folder: the module may read it (its swap is
            // pending, or the deployment that named it failed); its folder goes first.
            if meta.is_file() && meta.nlink() > 1 {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    info!(file = %file, bytes = meta.len(), "artifact no longer named; removed");
                    removed += 1;
                }
                Err(e) => warn!(file = %file, error = %e, "cannot remove an artifact"),
            }
        }
        Ok(removed)
    }

    /// Stops every fetch and waits for the tasks (a part file stays, resumed on the next
    /// start).
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// The more serious of two waits: a definitive failure, then any failure, then a fetch
/// with a problem, then a plain fetch.
fn worse(a: Option<ArtifactWait>, b: Option<ArtifactWait>) -> Option<ArtifactWait> {
    fn rank(w: &ArtifactWait) -> u8 {
        match w {
            ArtifactWait::Failed {
                definitive: true, ..
            } => 3,
            ArtifactWait::Failed { .. } => 2,
            ArtifactWait::Fetching { problem: Some(_) } => 1,
            ArtifactWait::Fetching { problem: None } => 0,
        }
    }
    match (a, b) {
        (Some(a), Some(b)) => Some(if rank(&b) > rank(&a) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// A module's folder, which the module may read whatever its user (a container's, a process
/// module's), and the two it is reached through (`artifacts/modules/`, `artifacts/`). Set
/// after creating: the service's umask (0077) takes the bits off a new folder's mode. The
/// store's own folder stays private (its files are read through the links).
fn create_dir(dir: &Path) -> Result<(), ArtifactError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io_err("cannot create", dir))?;
    for d in dir.ancestors().take(3) {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("cannot open up", d))?;
    }
    Ok(())
}

/// Points `path` at `target`'s inode atomically: a reader sees the old file or the new one,
/// never no file.
fn replace_link(target: &Path, path: &Path) -> Result<(), ArtifactError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}{TEMP_SUFFIX}"));
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot remove", &temp)(e)),
    }
    std::fs::hard_link(target, &temp).map_err(io_err("cannot link", &temp))?;
    if let Err(e) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(io_err("cannot rename onto", path)(e));
    }
    Ok(())
}

fn remove_any(path: &Path) -> Result<(), ArtifactError> {
    let result = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io_err("cannot remove", path))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use sha2::{Digest as _, Sha256};

    use super::*;

    fn digest(content: &[u8]) -> String {
        Sha256::digest(content)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A deployment where `modules` read `model`, served from `source` holding `content`.
    fn deployment(source: &Path, content: &[u8], modules: &[&str]) -> Deployment {
        let mods: Vec<String> = modules
            .iter()
            .map(|m| format!(r#""{m}":{{"image":"r.io/a:1","artifacts":["model"]}}"#))
            .collect();
        serde_json::from_str(&format!(
            r#"{{"schemaVersion":"1.0","id":"d","version":1,
            "artifacts":{{"model":{{"url":"file://{}","sha256":"{}","size":{}}}}},
            "modules":{{{}}}}}"#,
            source.display(),
            digest(content),
            content.len(),
            mods.join(",")
        ))
        .unwrap()
    }

    async fn fetched(store: &Artifacts, d: &Deployment) -> BTreeMap<String, ArtifactWait> {
        let mut changed = store.subscribe();
        loop {
            let waits = store.ensure(d);
            if waits
                .values()
                .all(|w| !matches!(w, ArtifactWait::Fetching { .. }))
            {
                return waits;
            }
            tokio::time::timeout(Duration::from_secs(10), changed.changed())
                .await
                .expect("a fetch ends")
                .expect("the store lives");
        }
    }

    #[tokio::test]
    async fn a_new_digest_is_swapped_atomically_and_an_open_reader_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path(), Fetcher::new(None, 0), 2);
        let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
        std::fs::write(&a, b"model A").unwrap();
        std::fs::write(&b, b"model B, longer").unwrap();
        let v1 = deployment(&a, b"model A", &["infer", "annotate"]);
        assert!(fetched(&store, &v1).await.is_empty());
        assert!(store.link("infer", &v1, false).unwrap());
        assert!(store.link("annotate", &v1, false).unwrap());
        assert!(!store.link("infer", &v1, true).unwrap(), "idempotent");
        let model = store.module_dir("infer").join("model");
        assert_eq!(std::fs::read(&model).unwrap(), b"model A");
        // Stored once for both modules: three names, one inode.
        let stored = store.file(&digest(b"model A"));
        let meta = stored.metadata().unwrap();
        assert_eq!(meta.nlink(), 3);
        assert_eq!(meta.permissions().mode() & 0o777, 0o444);
        assert_eq!(
            store
                .module_dir("annotate")
                .join("model")
                .metadata()
                .unwrap()
                .ino(),
            meta.ino()
        );

        // A reader holds the old model open across the swap.
        let mut open = std::fs::File::open(&model).unwrap();
        let v2 = deployment(&b, b"model B, longer", &["infer", "annotate"]);
        assert!(fetched(&store, &v2).await.is_empty());
        assert!(
            !store.link("infer", &v2, false).unwrap(),
            "not staged: the old link stays"
        );
        assert_eq!(std::fs::read(&model).unwrap(), b"model A");
        assert!(store.link("infer", &v2, true).unwrap());
        assert_eq!(std::fs::read(&model).unwrap(), b"model B, longer");
        assert_eq!(
            model.metadata().unwrap().ino(),
            store
                .file(&digest(b"model B, longer"))
                .metadata()
                .unwrap()
                .ino()
        );
        let mut old = String::new();
        open.read_to_string(&mut old).unwrap();
        assert_eq!(old, "model A", "the open file is the old inode");
        let leftovers: Vec<_> = std::fs::read_dir(store.module_dir("infer"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["model"], "no temporary link is left");

        // A is still linked by `annotate`: not collected until its folder moves on.
        assert_eq!(store.collect([&v2]).unwrap(), 0);
        assert!(stored.exists());
        assert!(store.link("annotate", &v2, true).unwrap());
        assert_eq!(store.collect([&v2]).unwrap(), 1);
        assert!(!stored.exists());
        store.shutdown().await;
    }

    #[tokio::test]
    async fn a_wrong_digest_fails_the_modules_and_keeps_their_links() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path(), Fetcher::new(None, 0), 1);
        let a = dir.path().join("a.bin");
        std::fs::write(&a, b"model A").unwrap();
        let v1 = deployment(&a, b"model A", &["infer"]);
        assert!(fetched(&store, &v1).await.is_empty());
        store.link("infer", &v1, true).unwrap();
        // The file served is not the one pinned.
        let wrong = dir.path().join("wrong.bin");
        std::fs::write(&wrong, b"model C").unwrap();
        let mut v2 = deployment(&wrong, b"model D", &["infer"]);
        v2.version = 2;
        let waits = fetched(&store, &v2).await;
        match &waits["infer"] {
            ArtifactWait::Failed {
                message,
                definitive,
            } => {
                assert!(*definitive);
                assert!(message.contains("artifact `model`"), "{message}");
                assert!(message.contains("SHA-256"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            store.link("infer", &v2, true),
            Err(ArtifactError::NotFetched { .. })
        ));
        let model = store.module_dir("infer").join("model");
        assert_eq!(std::fs::read(&model).unwrap(), b"model A");
        // Not fetched again on every pass.
        assert!(matches!(
            store.ensure(&v2)["infer"],
            ArtifactWait::Failed { .. }
        ));
        // Kept while v1 is the last good one; the failed digest left nothing behind.
        store.collect([&v2, &v1]).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("artifacts/sha256"))
                .unwrap()
                .count(),
            1
        );
        store.shutdown().await;
    }

    #[tokio::test]
    async fn unused_files_parts_and_folders_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path(), Fetcher::new(None, 0), 1);
        let a = dir.path().join("a.bin");
        std::fs::write(&a, b"model A").unwrap();
        let v1 = deployment(&a, b"model A", &["infer"]);
        assert!(fetched(&store, &v1).await.is_empty());
        store.link("infer", &v1, true).unwrap();
        let part = dir
            .path()
            .join("artifacts/sha256")
            .join(format!("{}.part", "ab".repeat(32)));
        std::fs::write(&part, b"half").unwrap();
        assert_eq!(store.collect([&v1]).unwrap(), 1, "the stray part file");
        assert!(!part.exists());
        // Nothing is named any more: the folder goes, then the file it linked.
        let empty: Deployment =
            serde_json::from_str(r#"{"schemaVersion":"1.0","id":"d","version":2,"modules":{}}"#)
                .unwrap();
        assert_eq!(store.collect([&empty]).unwrap(), 2);
        assert!(!store.module_dir("infer").exists());
        assert!(!store.file(&digest(b"model A")).exists());
        store.shutdown().await;
    }
}
