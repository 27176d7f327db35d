//! The Prometheus text exposition format (0.0.4), written by the agent (`/metrics` on
//! loopback) and by `outpost-infer` alike: families with `HELP` and `TYPE`, samples with
//! escaped label values, one fixed label on every sample (`device` or `model`).

use std::fmt::{self, Write as _};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
    Summary,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Summary => "summary",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value: integers stay exact (an `f64` is not past 2^53).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    pub fn from_usize(n: usize) -> Value {
        Value::Int(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v.is_infinite() => {
                f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
            }
            // Rust prints finite floats without an exponent, which Prometheus parses.
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// A label value with `\`, `"` and newlines escaped.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Labels of a sample besides the fixed one.
pub type Labels<'a> = Vec<(&'static str, &'a str)>;

/// The text being written. `write!` to a `String` cannot fail, so its results are ignored.
#[derive(Debug)]
pub struct Exposition<'a> {
    pub out: String,
    /// The label every sample carries, such as `("device", id)`.
    pub fixed: (&'static str, &'a str),
}

impl<'a> Exposition<'a> {
    pub fn new(fixed: (&'static str, &'a str)) -> Exposition<'a> {
        Exposition {
            out: String::with_capacity(4096),
            fixed,
        }
    }

    /// One metric family; nothing at all when every value is `None`.
    pub fn family<'v>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        samples: impl IntoIterator<Item = (Labels<'v>, Option<Value>)>,
    ) {
        let mut started = false;
        for (labels, value) in samples {
            let Some(value) = value else { continue };
            if !started {
                self.header(name, kind, help);
                started = true;
            }
            self.sample(name, &labels, value);
        }
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: Option<Value>) {
        self.family(name, Kind::Gauge, help, [(Vec::new(), value)]);
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(
            name,
            Kind::Counter,
            help,
            [(Vec::new(), Some(Value::Int(value)))],
        );
    }

    /// `HELP` and `TYPE`; the help texts are constants without backslashes or newlines.
    pub fn header(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        let (key, v) = self.fixed;
        let _ = write!(self.out, "{name}{{{key}=\"{}\"", Escaped(v));
        for (key, v) in labels {
            let _ = write!(self.out, ",{key}=\"{}\"", Escaped(v));
        }
        let _ = writeln!(self.out, "}} {value}");
    }

    /// One histogram series (call [`Exposition::header`] once per family first): cumulative
    /// counts per upper bound in `buckets` (`counts` has one more entry, above the last bound),
    /// then `+Inf`, the sum and the count.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: &[f64],
        counts: &[u64],
        sum: f64,
    ) {
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, le) in buckets.iter().enumerate() {
            cumulative += counts.get(i).copied().unwrap_or(0);
            let le = le.to_string();
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, Value::Int(cumulative));
        }
        cumulative += counts.get(buckets.len()).copied().unwrap_or(0);
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, Value::Int(cumulative));
        self.sample(&format!("{name}_sum"), labels, Value::Float(sum));
        self.sample(&format!("{name}_count"), labels, Value::Int(cumulative));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_carry_the_fixed_label_and_escape_values() {
        let mut e = Exposition::new(("device", "cam\"1"));
        e.family(
            "x_total",
            Kind::Counter,
            "Things.",
            [
                (vec![("module", "a\\b")], Some(Value::Int(3))),
                (vec![("module", "c")], None),
            ],
        );
        e.gauge("y", "Nothing.", None);
        assert_eq!(
            e.out,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{device=\"cam\\\"1\",module=\"a\\\\b\"} 3\n"
        );
    }

    #[test]
    fn histograms_are_cumulative() {
        let mut e = Exposition::new(("model", "mlp"));
        e.header("d_seconds", Kind::Histogram, "Latency.");
        e.histogram(
            "d_seconds",
            &[("source", "v2")],
            &[0.5, 1.0],
            &[1, 0, 2],
            7.5,
        );
        let text = e.out;
        assert!(text.contains("d_seconds_bucket{model=\"mlp\",source=\"v2\",le=\"0.5\"} 1\n"));
        assert!(text.contains("d_seconds_bucket{model=\"mlp\",source=\"v2\",le=\"1\"} 1\n"));
        assert!(text.contains("d_seconds_bucket{model=\"mlp\",source=\"v2\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("d_seconds_sum{model=\"mlp\",source=\"v2\"} 7.5\n"));
        assert!(text.contains("d_seconds_count{model=\"mlp\",source=\"v2\"} 3\n"));
    }
}
