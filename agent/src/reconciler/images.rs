//! Images: pulls (bounded by the pull semaphore, refused when the engine's disk is too full,
//! verified for this device's platform and pinned digest once they arrive), images already
//! on the engine checked before use, and cleanup of images no deployment uses any more.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info, warn};

use super::{Ctx, Reconciler};
use crate::planner::Failure;
use crate::runtime::registry::Platform;
use crate::runtime::{EngineInfo, ImageInfo, PullProgress, Runtime, RuntimeError};

/// How long the registry may take to say how big an image is before the pull goes ahead
/// without knowing.
const SIZE_TIMEOUT: Duration = Duration::from_secs(20);

/// The result of a background pull.
pub(super) struct PullDone {
    image: String,
    /// What arrived, and the platform it was pulled and verified for.
    result: Result<(ImageInfo, Platform), PullError>,
}

#[derive(Debug, Clone)]
struct PullError {
    message: String,
    /// Retrying will not help (missing tag, refused credentials, wrong platform, no disk).
    definitive: bool,
}

impl<R: Runtime> Reconciler<R> {
    pub(super) async fn pull_done(&mut self, done: PullDone) {
        self.pulling.remove(&done.image);
        let now = self.clock.mono_ms();
        match done.result {
            Ok((info, platform)) => {
                info!(image = %done.image, platform = %describe_platform(&info), verified = true, "pulled");
                self.pull_failures.remove(&done.image);
                self.pulled.insert(done.image.clone());
                self.accept_image(done.image, &info, platform);
            }
            Err(e) => {
                warn!(image = %done.image, error = %e.message, definitive = e.definitive, "pull failed");
                let attempts = self
                    .pull_failures
                    .get(&done.image)
                    .map_or(0, |f| f.attempts)
                    + 1;
                self.pull_failures.insert(
                    done.image,
                    Failure {
                        attempts,
                        at: now,
                        message: e.message,
                        definitive: e.definitive,
                    },
                );
            }
        }
    }

    /// The platform to pull and verify `image` for: the one its module pins, else the
    /// engine's own (not this build's: an emulated or 32-bit agent drives a native engine).
    pub(super) fn platform_for(&self, image: &str) -> Platform {
        self.desired
            .as_ref()
            .and_then(|(s, _)| {
                let m = s.deployment.modules.values().find(|m| m.image == image)?;
                // Validation parsed it when the deployment was accepted.
                Platform::parse(m.platform.as_deref()?).ok()
            })
            .unwrap_or_else(|| match &self.engine {
                Some(e) => Platform::of_engine(&e.os, &e.architecture),
                None => Platform::of_this_build(),
            })
    }

    /// Records an image found or pulled and verified for `platform`.
    fn accept_image(&mut self, image: String, info: &ImageInfo, platform: Platform) {
        self.image_platforms
            .insert(info.id.clone(), describe_platform(info));
        self.verified.insert(image.clone(), platform);
        self.images.insert(image);
    }

    /// Finds and verifies images the deployment needs that the agent has not checked yet, or
    /// has checked for another platform than the deployment now pins.
    pub(super) async fn check_images(&mut self) {
        let Some((stored, _)) = &self.desired else {
            return;
        };
        let wanted: BTreeMap<String, bool> =
            stored
                .deployment
                .modules
                .values()
                .fold(BTreeMap::new(), |mut images, m| {
                    // Whether any module of the image may pull it.
                    *images.entry(m.image.clone()).or_default() |=
                        m.image_pull_policy != crate::manifest::PullPolicy::Never;
                    images
                });
        for (image, may_pull) in wanted {
            let platform = self.platform_for(&image);
            if self.images.contains(&image) {
                if self.verified.get(&image).is_none_or(|p| *p == platform) {
                    continue;
                }
                // Another platform pinned for an image already here: check it again. The
                // running container keeps the image it was created from until replaced.
                info!(image, platform = %platform, "the deployment pins another platform; checking the image again");
                self.images.remove(&image);
                self.pulled.remove(&image);
                self.verified.remove(&image);
            }
            if self.pulling.contains(&image) || self.pull_failures.contains_key(&image) {
                continue;
            }
            let Ok(Some(info)) = self.runtime.image(&image).await else {
                continue;
            };
            let problem = match (
                platform_problem(&image, &info, &platform),
                digest_problem(&image, &info),
            ) {
                (None, None) => {
                    self.accept_image(image, &info, platform);
                    continue;
                }
                // The engine has the image for another platform: a pull brings the right one.
                (Some(message), None) if may_pull => {
                    debug!(image, %message, "the image on the engine is for another platform; pulling");
                    continue;
                }
                (Some(message), _) | (None, Some(message)) => message,
            };
            warn!(image, error = %problem, "image on the device fails verification");
            self.pull_failures.insert(
                image,
                Failure {
                    attempts: 1,
                    at: self.clock.mono_ms(),
                    message: problem,
                    definitive: true,
                },
            );
        }
    }

    pub(super) fn start_pull(&mut self, module: &str, image: &str, ctx: &Ctx<'_>) {
        if !self.pulling.insert(image.to_string()) {
            return;
        }
        let credentials = self.desired.as_ref().and_then(|(s, _)| {
            let registry = crate::manifest::validate::registry_of(image);
            s.deployment.registries.get(&registry).cloned()
        });
        info!(module, image, "pulling");
        let job = PullJob {
            runtime: self.runtime.clone(),
            image: image.to_string(),
            platform: self.platform_for(image),
            credentials,
            engine: self.engine.clone(),
            disk: self.settings.disk.clone(),
            progress: self.progress.clone(),
        };
        let (slots, tx, shutdown) = (
            self.pull_slots.clone(),
            ctx.pull_tx.clone(),
            ctx.shutdown.clone(),
        );
        ctx.tasks.spawn(async move {
            let image = job.image.clone();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = async {
                    // The permit bounds concurrent pulls; the semaphore is never closed.
                    let _permit = slots.acquire().await;
                    job.run().await
                } => {
                    let _ = tx.send(PullDone { image, result }).await;
                }
            }
        });
    }

    /// Image cleanup: images deployments named that neither the desired deployment, the last
    /// good one, a pull under way nor a container uses, once unused for `image_gc_after` on
    /// the monotonic clock. Images no deployment named (the device's own) are never touched.
    pub(super) async fn collect_images(&mut self, now: u64) {
        let period = self
            .settings
            .image_gc_after
            .min(Duration::from_secs(60))
            .as_millis()
            .max(1_000) as u64;
        if now < self.next_gc {
            self.wake(self.next_gc);
            return;
        }
        self.next_gc = now + period;
        self.wake(self.next_gc);
        // Artifacts are looked at again with the images (a part file left by a crash).
        self.artifacts_collected_for = None;
        let mut in_use: BTreeSet<&str> = self.pulling.iter().map(String::as_str).collect();
        for d in self
            .desired
            .as_ref()
            .map(|(s, _)| s)
            .into_iter()
            .chain(self.last_good.as_ref())
        {
            in_use.extend(d.deployment.modules.values().map(|m| m.image.as_str()));
        }
        in_use.extend(self.last_observed.iter().map(|o| o.image.as_str()));
        let max_age = self.settings.image_gc_after.as_millis() as u64;
        let mut due = Vec::new();
        for image in &self.managed_images {
            if in_use.contains(image.as_str()) {
                self.unused_since.remove(image);
                continue;
            }
            let since = *self.unused_since.entry(image.clone()).or_insert(now);
            if now.saturating_sub(since) >= max_age {
                due.push(image.clone());
            }
        }
        for image in due {
            match self.runtime.remove_image(&image).await {
                Ok(()) | Err(RuntimeError::NotFound { .. }) => {
                    info!(image, "removed unused image");
                    self.images.remove(&image);
                    self.pulled.remove(&image);
                    self.verified.remove(&image);
                    self.unused_since.remove(&image);
                    self.managed_images.remove(&image);
                    if let Err(e) = self.store.forget_image(&image) {
                        self.store_problem("forget a removed image", &e);
                    }
                }
                // In use by a container (409) or otherwise busy: try again next time.
                Err(e) => debug!(image, error = %e, "image not removed"),
            }
        }
    }
}

/// A pull with what must be checked around it.
struct PullJob<R: Runtime> {
    runtime: Arc<R>,
    image: String,
    platform: Platform,
    credentials: Option<crate::manifest::RegistryCredentials>,
    engine: Option<EngineInfo>,
    disk: crate::config::DiskConfig,
    progress: broadcast::Sender<PullProgress>,
}

impl<R: Runtime> PullJob<R> {
    /// Checks the disk, pulls with progress, then verifies what arrived.
    async fn run(self) -> Result<(ImageInfo, Platform), PullError> {
        self.check_disk().await?;
        let (ptx, mut prx) = mpsc::channel::<PullProgress>(32);
        let progress = self.progress.clone();
        let relay = async move {
            while let Some(p) = prx.recv().await {
                let _ = progress.send(p);
            }
        };
        let pull = async {
            let result = self
                .runtime
                .pull(
                    &self.image,
                    &self.platform,
                    self.credentials.as_ref(),
                    Some(&ptx),
                )
                .await;
            drop(ptx); // ends the relay
            result
        };
        let (result, ()) = futures_util::future::join(pull, relay).await;
        result.map_err(|e| {
            let message = e.to_string();
            PullError {
                definitive: is_definitive_pull_error(&message),
                message,
            }
        })?;
        let info = self
            .runtime
            .image(&self.image)
            .await
            .map_err(|e| PullError {
                message: format!("pulled, but cannot inspect {}: {e}", self.image),
                definitive: false,
            })?
            .ok_or_else(|| PullError {
                message: format!("pulled, but {} is not on the engine", self.image),
                definitive: false,
            })?;
        verify_image(&self.image, &info, &self.platform).map_err(|message| PullError {
            message,
            definitive: true,
        })?;
        Ok((info, self.platform))
    }

    /// Refuses a pull when the engine's disk is above its high watermark, or would be left
    /// with less than the reserve once the image is there. The image's size comes from the
    /// registry's manifest (compressed); unpacking takes more, so twice that is counted. When
    /// the registry cannot say, the pull goes ahead on the watermark alone (the pull itself
    /// then says what is wrong with the registry).
    async fn check_disk(&self) -> Result<(), PullError> {
        let Some(root) = self.engine.as_ref().and_then(|e| e.root_dir.as_deref()) else {
            return Ok(());
        };
        let Some(usage) = crate::disk::usage(root) else {
            debug!(root = %root.display(), "cannot measure the engine's disk; pulling without the check");
            return Ok(());
        };
        let high = f64::from(self.disk.high_watermark_percent);
        if usage.used_percent() > high {
            return Err(PullError {
                message: format!(
                    "not pulling {}: the engine's disk ({}) is {:.0}% full, above disk.high_watermark_percent = {}",
                    self.image,
                    root.display(),
                    usage.used_percent(),
                    self.disk.high_watermark_percent
                ),
                definitive: true,
            });
        }
        let size = match crate::runtime::registry::image_size(
            &self.image,
            self.credentials.as_ref(),
            &self.platform,
            SIZE_TIMEOUT,
        )
        .await
        {
            Ok(size) => size.compressed_bytes,
            Err(e) => {
                debug!(image = %self.image, error = %e, "the registry did not say how big the image is; pulling on the watermark alone");
                return Ok(());
            }
        };
        let need = size.saturating_mul(2);
        if usage.available_bytes < need.saturating_add(self.disk.pull_reserve_bytes) {
            let mb = |b: u64| b.div_ceil(1 << 20);
            return Err(PullError {
                message: format!(
                    "not pulling {}: it needs about {} MB ({} MB compressed, unpacked) and {} MB must stay free (disk.pull_reserve_mb), but {} has {} MB free",
                    self.image,
                    mb(need),
                    mb(size),
                    mb(self.disk.pull_reserve_bytes),
                    root.display(),
                    mb(usage.available_bytes)
                ),
                definitive: true,
            });
        }
        Ok(())
    }
}

/// Registry answers that retrying cannot change.
fn is_definitive_pull_error(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "manifest unknown",
        "not found",
        "unauthorized",
        "authentication required",
        "denied",
        "no matching manifest",
        // A single-platform image for another platform than the one asked for.
        "does not match the specified platform",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// The image is for `platform` and has the digest its reference pins.
pub fn verify_image(reference: &str, info: &ImageInfo, platform: &Platform) -> Result<(), String> {
    match platform_problem(reference, info, platform).or_else(|| digest_problem(reference, info)) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// `linux/arm/v7`, as the engine describes the image.
pub fn describe_platform(info: &ImageInfo) -> String {
    Platform {
        os: if info.os.is_empty() {
            "linux"
        } else {
            &info.os
        }
        .to_string(),
        architecture: info.architecture.clone(),
        variant: info.variant.clone().filter(|v| !v.is_empty()),
    }
    .to_string()
}

/// Why an image does not run on `platform`, if it does not. An engine that does not say
/// what an image is for gets the benefit of the doubt.
fn platform_problem(reference: &str, info: &ImageInfo, platform: &Platform) -> Option<String> {
    (!info.architecture.is_empty()
        && !platform.runs(&info.os, &info.architecture, info.variant.as_deref()))
    .then(|| {
        format!(
            "image {reference} is built for {}; the module needs {platform} (publish an image for this platform, or a multi-platform one)",
            describe_platform(info)
        )
    })
}

/// Why the image on the engine is not the one the reference pins, if it is not.
fn digest_problem(reference: &str, info: &ImageInfo) -> Option<String> {
    let (_, digest) = reference.split_once('@')?;
    (!info
        .digests
        .iter()
        .any(|d| d.ends_with(&format!("@{digest}"))))
    .then(|| {
        format!(
            "image {reference} on the engine does not carry the digest the deployment pins ({digest})"
        )
    })
}
