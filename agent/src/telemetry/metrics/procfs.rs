//! The one reader of `/proc`: CPU times and count (`/proc/stat`), memory (`/proc/meminfo`),
//! load (`/proc/loadavg`), uptime (`/proc/uptime`) and the agent's resident memory
//! (`/proc/self/status`); and [`device_facts`], what a deployment's `requires` is checked
//! against.
//!
//! Nothing here fails: a file that cannot be read or parsed gives `None` (or 0 for sizes).

use std::path::Path;

/// Aggregate CPU time from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CpuTimes {
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is already
    /// counted in user and nice).
    total: u64,
    /// idle + iowait: time no task was running.
    idle: u64,
}

/// The aggregate CPU times (`None` when `/proc/stat` cannot be read or parsed) and the CPUs
/// online (0 when it lists none).
pub(super) fn cpu() -> (Option<CpuTimes>, usize) {
    let stat = read("/proc/stat");
    let times = stat.as_deref().and_then(parse_cpu_times);
    (times, stat.as_deref().map_or(0, parse_cpu_count))
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes; 0 for either when missing.
pub(super) fn memory() -> (u64, u64) {
    read("/proc/meminfo")
        .as_deref()
        .map_or((0, 0), parse_meminfo)
}

/// The one-minute load average of `/proc/loadavg`.
pub(super) fn load1() -> Option<f64> {
    read("/proc/loadavg").as_deref().and_then(parse_loadavg)
}

/// Whole seconds since boot, from `/proc/uptime`.
pub(super) fn uptime_secs() -> Option<u64> {
    read("/proc/uptime").as_deref().and_then(parse_uptime)
}

/// The agent's resident memory (`VmRSS` of `/proc/self/status`), for [`AgentMetrics::rss_bytes`].
///
/// [`AgentMetrics::rss_bytes`]: super::AgentMetrics::rss_bytes
pub fn agent_rss_bytes() -> Option<u64> {
    read("/proc/self/status").as_deref().and_then(parse_vm_rss)
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The aggregate `cpu` line of `/proc/stat`.
fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    let total = fields.iter().try_fold(0u64, |sum, f| sum.checked_add(*f))?;
    let idle = fields[3].checked_add(fields.get(4).copied().unwrap_or(0))?;
    Some(CpuTimes { total, idle })
}

/// The `cpuN` lines of `/proc/stat`: one per CPU online.
fn parse_cpu_count(stat: &str) -> usize {
    stat.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count()
}

/// Busy share of the time between two readings, 0 to 100; `None` when no time passed or the
/// counters went backwards (a reset, or a different machine's file).
pub(super) fn cpu_percent(prev: CpuTimes, now: CpuTimes) -> Option<f64> {
    let total = now.total.checked_sub(prev.total)?;
    let idle = now.idle.checked_sub(prev.idle)?;
    if total == 0 {
        return None;
    }
    let busy = total.saturating_sub(idle);
    Some((busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0))
}

/// This machine's architecture and total memory, for a deployment's `requires`.
pub fn device_facts() -> crate::policy::DeviceFacts {
    let (total, _) = read("/proc/meminfo").map_or((0, 0), |t| parse_meminfo(&t));
    crate::policy::DeviceFacts {
        arch: crate::manifest::Arch::current(),
        memory_mb: total / (1024 * 1024),
        // The daemon says otherwise when it runs without an engine.
        engine: true,
    }
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes; 0 for either when missing.
fn parse_meminfo(text: &str) -> (u64, u64) {
    let (mut total, mut available) = (0, 0);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        *slot = parse_kb(value).unwrap_or(0);
    }
    (total, available)
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(parse_kb)
}

/// A `/proc` size such as `  16318412 kB`, in bytes.
fn parse_kb(value: &str) -> Option<u64> {
    let mut parts = value.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match (parts.next(), parts.next()) {
        (Some("kB"), None) => n.checked_mul(1024),
        (None, None) => Some(n),
        _ => None,
    }
}

/// The one-minute load average, the first field of `/proc/loadavg`.
fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// Whole seconds since boot, the first field of `/proc/uptime`.
fn parse_uptime(text: &str) -> Option<u64> {
    let secs = text
        .split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)?;
    // Finite and not negative: the cast only drops the fraction (and saturates past u64::MAX).
    Some(secs as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_from_proc_stat() {
        let stat = "cpu  100 5 50 800 20 3 2 1 7 0\n\
                    cpu0 50 2 25 400 10 1 1 0 3 0\n\
                    cpu1 50 3 25 400 10 2 1 1 4 0\n\
                    intr 12345\nctxt 999\n";
        // Guest time (7, 0) is already in user and nice: not added again.
        assert_eq!(
            parse_cpu_times(stat),
            Some(CpuTimes {
                total: 981,
                idle: 820
            })
        );
        assert_eq!(parse_cpu_count(stat), 2);
        // Old kernels: four fields only.
        assert_eq!(
            parse_cpu_times("cpu 1 2 3 4\n"),
            Some(CpuTimes { total: 10, idle: 4 })
        );
    }

    #[test]
    fn cpu_times_malformed() {
        for bad in [
            "",
            "cpu\n",
            "cpu 1 2 3\n",
            "cpu 1 2 x 4\n",
            "cpu0 1 2 3 4\n",
            "cpu -1 2 3 4\n",
            "cpu 18446744073709551615 1 0 0\n",
            "\u{0}\u{ffff}",
        ] {
            assert_eq!(parse_cpu_times(bad), None, "{bad:?}");
        }
        assert_eq!(parse_cpu_count("garbage\ncpux 1\n"), 0);
    }

    #[test]
    fn cpu_percent_is_busy_over_total() {
        let a = CpuTimes {
            total: 1000,
            idle: 800,
        };
        let b = CpuTimes {
            total: 1200,
            idle: 950,
        };
        assert_eq!(cpu_percent(a, b), Some(25.0));
        assert_eq!(cpu_percent(a, a), None);
        assert_eq!(cpu_percent(b, a), None);
        // Idle grew more than total: a bogus reading is clamped, not negative.
        let c = CpuTimes {
            total: 1100,
            idle: 950,
        };
        assert_eq!(cpu_percent(a, c), Some(0.0));
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:        3884360 kB\nMemFree:          123456 kB\n\
                    MemAvailable:    2000000 kB\nBuffers:           1000 kB\n";
        assert_eq!(parse_meminfo(text), (3_884_360 * 1024, 2_000_000 * 1024));
        assert_eq!(parse_meminfo(""), (0, 0));
        assert_eq!(
            parse_meminfo("MemTotal: lots kB\nMemAvailable: 1 MB\n"),
            (0, 0)
        );
        assert_eq!(parse_meminfo("MemTotal: 99999999999999999999 kB\n"), (0, 0));
        assert_eq!(parse_meminfo("MemTotal 12 kB\nMemAvailable: 7\n"), (0, 7));
    }

    #[test]
    fn vm_rss() {
        let status = "Name:\toutpost\nVmPeak:\t   20000 kB\nVmRSS:\t    8192 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(8192 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\n"), None);
        assert!(agent_rss_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn loadavg_and_uptime() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/389 12345\n"), Some(0.52));
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("NaN 1 1"), None);
        assert_eq!(parse_loadavg("-1 1 1"), None);
        assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350_735));
        assert_eq!(parse_uptime("inf 1"), None);
        assert_eq!(parse_uptime("x"), None);
    }
}
