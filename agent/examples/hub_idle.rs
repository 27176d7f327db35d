//! The hub link alone, with a do-nothing agent behind it reporting five running modules: for
//! measuring what the link costs in memory while connected and idle (the full agent is measured
//! separately). Usage: `hub_idle CONFIG.toml`; Ctrl-C stops it.

use std::collections::BTreeMap;

use outpost_agent::config::Config;
use outpost_agent::control::{AgentHandle, REQUEST_CAPACITY, Request};
use outpost_agent::state::{AgentFacts, ModuleReport, ModuleStatus, ReportedState};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    outpost_agent::hub::install_crypto_provider();
    outpost_agent::logging::init(outpost_agent::logging::LogFormat::Human, "warn");
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: hub_idle CONFIG.toml"))?;
    let config = Config::load(path.as_ref(), std::env::vars())?;
    let modules: BTreeMap<String, ModuleReport> = (1..=5)
        .map(|i| {
            (
                format!("module-{i}"),
                ModuleReport {
                    status: ModuleStatus::Running,
                    image: format!("127.0.0.1:5000/module-{i}:1.0.0"),
                    image_digest: Some(format!("sha256:{}", "ab".repeat(32))),
                    platform: Some("linux/amd64".into()),
                    restart_count: 0,
                    exit_code: None,
                    started_at: Some(1),
                    last_error: None,
                },
            )
        })
        .collect();
    let (_state_tx, state) = watch::channel(ReportedState {
        device_id: config.device_id.clone(),
        deployment: None,
        last_rejected: None,
        last_good: None,
        modules,
        agent: AgentFacts::local(0),
        conditions: vec![],
    });
    let (requests, mut rx) = mpsc::channel(REQUEST_CAPACITY);
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            if let Request::Offer { reply, .. } = request {
                let _ = reply.send(Ok(()));
            }
        }
    });
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    outpost_agent::hub::run(&config, AgentHandle { requests, state }, shutdown).await?;
    Ok(())
}
