//! Counters and the latency histogram, rendered in the Prometheus text format.
//!
//! Owns every number `/metrics` serves. Plain atomics: a metrics crate would bring a registry
//! and an exporter for a dozen series.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Where a request came from; one label value per entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    V2,
    Score,
    Bus,
    Batch,
}

const SOURCES: [(Source, &str); 4] = [
    (Source::V2, "v2"),
    (Source::Score, "score"),
    (Source::Bus, "bus"),
    (Source::Batch, "batch"),
];

/// Upper bounds of the latency buckets, in seconds: 50 µs (a small MLP) to 10 s.
const BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

#[derive(Debug, Default)]
struct PerSource {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Cumulative bucket counts are computed when rendering; these are per-bucket.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// All the module's metrics; shared by reference between every entry point.
#[derive(Debug, Default)]
pub struct Metrics {
    per: [PerSource; 4],
    load_seconds_micros: AtomicU64,
    loads: AtomicU64,
    load_failures: AtomicU64,
    rejected_busy: AtomicU64,
}

fn ix(s: Source) -> usize {
    SOURCES.iter().position(|(x, _)| *x == s).unwrap_or(0)
}

impl Metrics {
    /// Counts one request and, when it ran, its latency (from receipt to answer).
    pub fn observe(&self, source: Source, latency: Duration, ok: bool) {
        let p = &self.per[ix(source)];
        p.requests.fetch_add(1, Relaxed);
        if !ok {
            p.errors.fetch_add(1, Relaxed);
        }
        let secs = latency.as_secs_f64();
        let b = BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(BUCKETS.len());
        p.buckets[b].fetch_add(1, Relaxed);
        p.sum_nanos
            .fetch_add(latency.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Counts a request refused because the server was at its concurrency limit.
    pub fn busy(&self) {
        self.rejected_busy.fetch_add(1, Relaxed);
    }

    pub fn model_loaded(&self, took: Duration) {
        self.loads.fetch_add(1, Relaxed);
        self.load_seconds_micros
            .store(took.as_micros() as u64, Relaxed);
    }

    pub fn model_load_failed(&self) {
        self.load_failures.fetch_add(1, Relaxed);
    }

    /// Requests counted so far for `source` (tests and the batch summary read it).
    pub fn requests(&self, source: Source) -> u64 {
        self.per[ix(source)].requests.load(Relaxed)
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self, model: &str) -> String {
        let mut o = String::new();
        let m = model.replace('\\', "\\\\").replace('"', "\\\"");
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            o,
            "# HELP outpost_infer_requests_total Inference requests received."
        );
        let _ = writeln!(o, "# TYPE outpost_infer_requests_total counter");
        for (s, name) in SOURCES {
            let v = self.per[ix(s)].requests.load(Relaxed);
            let _ = writeln!(
                o,
                "outpost_infer_requests_total{{model=\"{m}\",source=\"{name}\"}} {v}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP outpost_infer_errors_total Inference requests that failed (bad input or model error)."
        );
        let _ = writeln!(o, "# TYPE outpost_infer_errors_total counter");
        for (s, name) in SOURCES {
            let v = self.per[ix(s)].errors.load(Relaxed);
            let _ = writeln!(
                o,
                "outpost_infer_errors_total{{model=\"{m}\",source=\"{name}\"}} {v}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP outpost_infer_request_duration_seconds Time from receiving a request to having its answer."
        );
        let _ = writeln!(o, "# TYPE outpost_infer_request_duration_seconds histogram");
        for (s, name) in SOURCES {
            let p = &self.per[ix(s)];
            let mut cum = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cum += p.buckets[i].load(Relaxed);
                let _ = writeln!(
                    o,
                    "outpost_infer_request_duration_seconds_bucket{{model=\"{m}\",source=\"{name}\",le=\"{le}\"}} {cum}"
                );
            }
            cum += p.buckets[BUCKETS.len()].load(Relaxed);
            let _ = writeln!(
                o,
                "outpost_infer_request_duration_seconds_bucket{{model=\"{m}\",source=\"{name}\",le=\"+Inf\"}} {cum}"
            );
            let sum = p.sum_nanos.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(
                o,
                "outpost_infer_request_duration_seconds_sum{{model=\"{m}\",source=\"{name}\"}} {sum}"
            );
            let _ = writeln!(
                o,
                "outpost_infer_request_duration_seconds_count{{model=\"{m}\",source=\"{name}\"}} {cum}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP outpost_infer_busy_rejections_total Requests refused at the concurrency limit."
        );
        let _ = writeln!(o, "# TYPE outpost_infer_busy_rejections_total counter");
        let _ = writeln!(
            o,
            "outpost_infer_busy_rejections_total{{model=\"{m}\"}} {}",
            self.rejected_busy.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP outpost_infer_model_load_seconds Time the last successful model load took."
        );
        let _ = writeln!(o, "# TYPE outpost_infer_model_load_seconds gauge");
        let load = self.load_seconds_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            o,
            "outpost_infer_model_load_seconds{{model=\"{m}\"}} {load}"
        );
        let _ = writeln!(
            o,
            "# HELP outpost_infer_model_loads_total Successful model loads (first load and reloads)."
        );
        let _ = writeln!(o, "# TYPE outpost_infer_model_loads_total counter");
        let _ = writeln!(
            o,
            "outpost_infer_model_loads_total{{model=\"{m}\"}} {}",
            self.loads.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP outpost_infer_model_load_failures_total Model loads that failed."
        );
        let _ = writeln!(o, "# TYPE outpost_infer_model_load_failures_total counter");
        let _ = writeln!(
            o,
            "outpost_infer_model_load_failures_total{{model=\"{m}\"}} {}",
            self.load_failures.load(Relaxed)
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe(Source::V2, Duration::from_micros(30), true);
        m.observe(Source::V2, Duration::from_millis(3), false);
        m.observe(Source::V2, Duration::from_secs(60), true);
        let text = m.render("mlp");
        assert!(text.contains("outpost_infer_requests_total{model=\"mlp\",source=\"v2\"} 3"));
        assert!(text.contains("outpost_infer_errors_total{model=\"mlp\",source=\"v2\"} 1"));
        assert!(text.contains("source=\"v2\",le=\"0.00005\"} 1\n"));
        assert!(text.contains("source=\"v2\",le=\"0.005\"} 2\n"));
        assert!(text.contains("source=\"v2\",le=\"10\"} 2\n"));
        assert!(text.contains("source=\"v2\",le=\"+Inf\"} 3\n"));
    }
}
