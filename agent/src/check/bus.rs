//! The local bus's port: free for `outpost run` to take, or already held by the running agent.
//! Anything else holding it stops the agent at start-up.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::{Finding, STEP_TIMEOUT};
use crate::config::{BusConfig, Config};

/// How long the running agent gets to answer on its local API.
const API_TIMEOUT: Duration = Duration::from_secs(2);

/// `gateway` is the engine's bridge gateway as the engine check found it (`None` when the
/// engine did not answer).
pub async fn check(config: &Config, gateway: Option<Option<IpAddr>>) -> Finding {
    let bus = &config.bus;
    if !bus.enabled {
        return Finding::ok("bus-port", "local bus off (bus.enabled = false)");
    }
    if let Some(url) = &bus.external_url {
        let at = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(1883)
        );
        return match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(&at)).await {
            Ok(Ok(_)) => Finding::ok("bus-port", format!("external bus at {at} accepts TCP")),
            Ok(Err(e)) => Finding::error(
                "bus-port",
                format!("external bus at {at}: {e}"),
                "start the device's broker, or correct bus.external_url",
            ),
            Err(_) => Finding::error(
                "bus-port",
                format!(
                    "external bus at {at}: no answer within {} s",
                    STEP_TIMEOUT.as_secs()
                ),
                "start the device's broker, or correct bus.external_url",
            ),
        };
    }
    let addr = match (bus.listen, gateway) {
        (Some(addr), _) => addr,
        (None, Some(Some(ip))) => SocketAddr::new(ip, BusConfig::DEFAULT_PORT),
        (None, Some(None)) => SocketAddr::from(([127, 0, 0, 1], BusConfig::DEFAULT_PORT)),
        (None, None) => {
            return Finding::warning(
                "bus-port",
                "cannot tell where the bus listens: by default on the Docker bridge's gateway, and the engine did not answer",
                "fix the engine first (see `engine`), or set bus.listen",
            );
        }
    };
    match std::net::TcpListener::bind(addr) {
        Ok(listener) => {
            drop(listener);
            Finding::ok("bus-port", format!("{addr} is free for the local bus"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if crate::api::running_state(&config.api_socket, API_TIMEOUT)
                .await
                .is_some()
            {
                Finding::ok("bus-port", format!("{addr} is held by the running agent"))
            } else {
                Finding::error(
                    "bus-port",
                    format!(
                        "{addr} is in use, and not by a running agent (its API does not answer)"
                    ),
                    format!(
                        "stop what listens there (ss -ltnp 'sport = :{}'), or set bus.listen to another address",
                        addr.port()
                    ),
                )
            }
        }
        Err(e) => Finding::error(
            "bus-port",
            format!("cannot listen on {addr}: {e}"),
            "set bus.listen to an address of this host (ip -brief address)",
        ),
    }
}
