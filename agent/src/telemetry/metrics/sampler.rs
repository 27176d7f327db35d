//! Sampling the device ([`DeviceSampler`]): CPU, memory, load and uptime from `/proc` (through
//! [`procfs`]), the hottest thermal zone from `/sys/class/thermal`, and the
//! state directory's filesystem from `statvfs`.
//!
//! Sampling never fails: a board without thermal zones or with an unusual kernel still reports
//! everything else.

use std::path::{Path, PathBuf};

use super::procfs::{self, CpuTimes};
use super::snapshot::DeviceMetrics;

/// Samples the device; keeps the previous CPU reading because CPU use is a rate.
#[derive(Debug)]
pub struct DeviceSampler {
    /// The agent's state directory: the filesystem whose space is reported.
    state_dir: PathBuf,
    /// CPU times at the previous sample; `None` before the first.
    prev: Option<CpuTimes>,
}

impl DeviceSampler {
    pub fn new(state_dir: impl Into<PathBuf>) -> DeviceSampler {
        DeviceSampler {
            state_dir: state_dir.into(),
            prev: None,
        }
    }

    /// Reads the device's state now. CPU use is measured since the previous call (`None` on the
    /// first). Blocking, but only a few small reads of `/proc` and `/sys` and one `statvfs`.
    pub fn sample(&mut self) -> DeviceMetrics {
        let (cpu, online) = procfs::cpu();
        let cpu_percent = match (self.prev, cpu) {
            (Some(prev), Some(now)) => procfs::cpu_percent(prev, now),
            _ => None,
        };
        // An unreadable sample keeps the older reading: the next delta just spans longer.
        if cpu.is_some() {
            self.prev = cpu;
        }
        let cpu_count = Some(online)
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        let (memory_total_bytes, memory_available_bytes) = procfs::memory();
        let (disk_total_bytes, disk_available_bytes) =
            disk_space(&self.state_dir).unwrap_or((0, 0));
        DeviceMetrics {
            cpu_percent,
            cpu_count,
            load1: procfs::load1(),
            memory_total_bytes,
            memory_available_bytes,
            disk_path: self.state_dir.display().to_string(),
            disk_total_bytes,
            disk_available_bytes,
            temperature_celsius: hottest_zone(Path::new("/sys/class/thermal")),
            uptime_secs: procfs::uptime_secs(),
        }
    }
}

/// A thermal zone's `temp` (millidegrees Celsius), in degrees.
fn parse_millidegrees(text: &str) -> Option<f64> {
    text.trim()
        .parse::<i64>()
        .ok()
        .map(|milli| milli as f64 / 1000.0)
}

/// The highest temperature among `thermal_zone*/temp` under `thermal` (`/sys/class/thermal`);
/// `None` when there is no zone or none can be read (some report an error while a sensor is
/// off).
fn hottest_zone(thermal: &Path) -> Option<f64> {
    std::fs::read_dir(thermal)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("thermal_zone"))
        })
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("temp"))
                .ok()
                .as_deref()
                .and_then(parse_millidegrees)
        })
        .reduce(f64::max)
}

/// Total and available bytes of the filesystem holding `path`; `None` when it cannot be
/// measured (the path does not exist yet, for one).
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let fs = rustix::fs::statvfs(path).ok()?;
    Some((
        fs.f_blocks.saturating_mul(fs.f_frsize),
        fs.f_bavail.saturating_mul(fs.f_frsize),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn temperature() {
        assert_eq!(parse_millidegrees("47500\n"), Some(47.5));
        assert_eq!(parse_millidegrees("-5000"), Some(-5.0));
        assert_eq!(parse_millidegrees(""), None);
        assert_eq!(parse_millidegrees("47.5"), None);
    }

    #[test]
    fn hottest_thermal_zone() {
        let dir = tempfile::tempdir().unwrap();
        let zone = |name: &str, temp: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("temp"), temp).unwrap();
        };
        assert_eq!(hottest_zone(dir.path()), None);
        zone("thermal_zone0", "41000\n");
        zone("thermal_zone1", "58250\n");
        zone("thermal_zone2", "garbage\n");
        zone("cooling_device0", "99000\n");
        std::fs::create_dir(dir.path().join("thermal_zone3")).unwrap();
        assert_eq!(hottest_zone(dir.path()), Some(58.25));
        assert_eq!(hottest_zone(&dir.path().join("missing")), None);
    }

    #[test]
    fn sampler_reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = DeviceSampler::new(dir.path());
        let first = sampler.sample();
        assert_eq!(first.cpu_percent, None);
        assert!(first.cpu_count > 0);
        assert!(first.memory_total_bytes > 0);
        assert!(first.memory_available_bytes <= first.memory_total_bytes);
        assert!(first.disk_total_bytes > 0);
        assert!(first.disk_available_bytes <= first.disk_total_bytes);
        assert_eq!(first.disk_path, dir.path().display().to_string());
        assert!(first.uptime_secs.is_some());
        std::thread::sleep(Duration::from_millis(100));
        let second = sampler.sample();
        let cpu = second.cpu_percent.unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");

        let mut gone = DeviceSampler::new(dir.path().join("not-yet"));
        let m = gone.sample();
        assert_eq!((m.disk_total_bytes, m.disk_available_bytes), (0, 0));
    }
}
