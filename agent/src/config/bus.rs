//! `[bus]`: the local MQTT bus, embedded (where it listens) or an external broker (its URL and
//! the agent's credentials there).

use std::net::SocketAddr;
use std::path::Path;

use super::BusConfig;
use super::raw::RawBus;
use super::validate::Issues;

pub(super) fn bus(bus: RawBus, base: &Path, issues: &mut Issues) -> BusConfig {
    let listen = bus
        .listen
        .and_then(|bus_listen| match bus_listen.parse::<SocketAddr>() {
            Ok(addr) => {
                if addr.ip().is_unspecified() {
                    issues.push("bus.listen", format!("`{bus_listen}` listens on every interface; name the address modules reach (e.g. the Docker bridge's), or leave it out for that default"));
                }
                Some(addr)
            }
            Err(_) => {
                issues.push(
                    "bus.listen",
                    format!("`{bus_listen}` is not an address:port"),
                );
                None
            }
        });
    let external_url = bus.external_url.and_then(|u| match url::Url::parse(&u) {
        Ok(url) if !url.username().is_empty() || url.password().is_some() => {
            issues.push(
                "bus.external_url",
                "must not hold credentials: put them in bus.username and bus.password_file",
            );
            None
        }
        Ok(url) if matches!(url.scheme(), "mqtt" | "mqtts") => Some(url),
        _ => {
            issues.push(
                "bus.external_url",
                format!("`{u}` is not an mqtt:// or mqtts:// URL"),
            );
            None
        }
    });
    let external_credentials = issues.credentials("bus", bus.username, bus.password_file, base);
    if external_credentials.is_some() && external_url.is_none() {
        issues.push(
            "bus.username",
            "credentials are for an external broker: set bus.external_url too",
        );
    }
    BusConfig {
        enabled: bus.enabled.unwrap_or(true),
        listen,
        external_url,
        external_credentials,
    }
}
