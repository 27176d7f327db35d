//! Counters and the latency histogram, rendered in the Prometheus text format.
//!
//! Owns every number `/metrics` serves. Plain atomics: a metrics crate would bring a registry
//! and an exporter for a dozen series. The text is written by the agent's renderer
//! (`outpost_core::prometheus`), so both speak the format the same way.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use outpost_core::prometheus::{Exposition, Kind, Value};

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
    /// The share of `sum_nanos` spent on requests that succeeded.
    ok_nanos: AtomicU64,
}

/// Every source together: what Triton's statistics endpoint reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub ok: u64,
    pub ok_nanos: u64,
    pub failed: u64,
    pub failed_nanos: u64,
    /// Wall-clock milliseconds since the epoch of the last request; 0 before the first.
    pub last_ms: u64,
}

/// All the module's metrics; shared by reference between every entry point.
#[derive(Debug, Default)]
pub struct Metrics {
    per: [PerSource; 4],
    load_seconds_micros: AtomicU64,
    loads: AtomicU64,
    load_failures: AtomicU64,
    rejected_busy: AtomicU64,
    last_ms: AtomicU64,
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
        let nanos = latency.as_nanos().min(u64::MAX as u128) as u64;
        p.sum_nanos.fetch_add(nanos, Relaxed);
        if ok {
            p.ok_nanos.fetch_add(nanos, Relaxed);
        }
        self.last_ms
            .store(outpost_core::time::wall_now_ms(), Relaxed);
    }

    /// Requests of every source, split into succeeded and failed.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            ok: 0,
            ok_nanos: 0,
            failed: 0,
            failed_nanos: 0,
            last_ms: self.last_ms.load(Relaxed),
        };
        for p in &self.per {
            let (requests, errors) = (p.requests.load(Relaxed), p.errors.load(Relaxed));
            let (sum, ok) = (p.sum_nanos.load(Relaxed), p.ok_nanos.load(Relaxed));
            t.ok += requests.saturating_sub(errors);
            t.failed += errors;
            t.ok_nanos += ok;
            t.failed_nanos += sum.saturating_sub(ok);
        }
        t
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
        let mut e = Exposition::new(("model", model));
        let per_source = |e: &mut Exposition<'_>, name, help, value: &dyn Fn(&PerSource) -> u64| {
            e.family(
                name,
                Kind::Counter,
                help,
                SOURCES.map(|(s, label)| {
                    (
                        vec![("source", label)],
                        Some(Value::Int(value(&self.per[ix(s)]))),
                    )
                }),
            );
        };
        per_source(
            &mut e,
            "outpost_infer_requests_total",
            "Inference requests received.",
            &|p| p.requests.load(Relaxed),
        );
        per_source(
            &mut e,
            "outpost_infer_errors_total",
            "Inference requests that failed (bad input or model error).",
            &|p| p.errors.load(Relaxed),
        );
        let duration = "outpost_infer_request_duration_seconds";
        e.header(
            duration,
            Kind::Histogram,
            "Time from receiving a request to having its answer.",
        );
        for (s, label) in SOURCES {
            let p = &self.per[ix(s)];
            let counts: Vec<u64> = p.buckets.iter().map(|b| b.load(Relaxed)).collect();
            let sum = p.sum_nanos.load(Relaxed) as f64 / 1e9;
            e.histogram(duration, &[("source", label)], &BUCKETS, &counts, sum);
        }
        e.counter(
            "outpost_infer_busy_rejections_total",
            "Requests refused at the concurrency limit.",
            self.rejected_busy.load(Relaxed),
        );
        e.gauge(
            "outpost_infer_model_load_seconds",
            "Time the last successful model load took.",
            Some(Value::Float(
                self.load_seconds_micros.load(Relaxed) as f64 / 1e6,
            )),
        );
        e.counter(
            "outpost_infer_model_loads_total",
            "Successful model loads (first load and reloads).",
            self.loads.load(Relaxed),
        );
        e.counter(
            "outpost_infer_model_load_failures_total",
            "Model loads that failed.",
            self.load_failures.load(Relaxed),
        );
        e.out
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
