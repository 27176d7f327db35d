//! Logging set-up: `tracing` with a human format by default and JSON on request. The level
//! comes from `RUST_LOG` when set, else from the configuration.
//!
//! Whatever the level, the libraries that log what goes over the wire stay at `info`: at
//! `debug` the Docker client logs every request with its body (each module's environment,
//! bus password included) and the MQTT client logs packets (the hub password is in CONNECT).
//! No level may put a secret in the log.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Directive;

/// Targets pinned to `info` or quieter, whatever the configured level.
pub const WIRE_TARGETS: &[&str] = &[
    "bollard",
    "hyper",
    "hyper_util",
    "h2",
    "rumqttc",
    "rustls",
    "tokio_rustls",
    "mio",
];

/// The filter for `level` (a `tracing` directive string) with the wire targets pinned.
pub fn filter(level: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in WIRE_TARGETS {
        // A directive of our own making always parses.
        if let Ok(d) = format!("{target}=info").parse::<Directive>() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// Whether standard error is a terminal and colour is not turned off (`NO_COLOR`, no-color.org).
pub fn colour_wanted() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Installs the global subscriber; logs go to standard error so command output stays clean.
/// A second call does nothing (tests may call it more than once).
pub fn init(format: LogFormat, default_level: &str) {
    let level = std::env::var("RUST_LOG")
        .ok()
        .filter(|l| EnvFilter::try_new(l).is_ok())
        .unwrap_or_else(|| default_level.to_string());
    let filter = filter(&level);
    // Colour only for a person at a terminal: a log written to a file, a pipe or the journal
    // carries no escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_wanted())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_targets_stay_at_info_whatever_the_level() {
        let text = filter("trace").to_string();
        for target in WIRE_TARGETS {
            assert!(text.contains(&format!("{target}=info")), "{text}");
        }
        // A level the user names for a wire target is capped too.
        let text = filter("bollard=trace,info").to_string();
        assert!(
            text.contains("bollard=info") && !text.contains("bollard=trace"),
            "{text}"
        );
    }
}
