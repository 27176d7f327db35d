//! Benchmark: from a deployment being accepted to all of 10 modules running (images present),
//! against the floor the engine allows: the sum of the same 10 containers' plain create + start
//! through the engine API, measured in the same run, rounds interleaved.
//!
//! `cargo bench -p outpost-e2e --bench deploy` (needs the Docker engine).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, StartContainerOptions,
};
use outpost_agent::api::{self, ApiEvent, ApiRequest};
use outpost_e2e::*;
use serde_json::json;

const MODULES: usize = 10;
const ROUNDS: usize = 7;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    require_docker();
    // A local image, present on the engine: nothing is pulled.
    let image = "outpost-bench/testmod:1".to_string();
    local_test_image(&image, "");

    let docker = Docker::connect_with_unix_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let device = format!("bench-{}", std::process::id());
    let mut floor = Vec::new();
    let mut agent_times = Vec::new();
    for round in 0..ROUNDS {
        // Floor: create + start each container, one after the other, timing only those calls.
        let mut sum = Duration::ZERO;
        let mut ids = Vec::new();
        for i in 0..MODULES {
            let name = format!("floor-{device}-{i}");
            let body = ContainerCreateBody {
                image: Some(image.clone()),
                labels: Some(HashMap::from([("bench".to_string(), device.clone())])),
                ..Default::default()
            };
            let t = Instant::now();
            let id = docker
                .create_container(
                    Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                    body,
                )
                .await
                .unwrap()
                .id;
            docker
                .start_container(&id, None::<StartContainerOptions>)
                .await
                .unwrap();
            sum += t.elapsed();
            ids.push(id);
        }
        for id in ids {
            let _ = docker
                .remove_container(
                    &id,
                    Some(RemoveContainerOptionsBuilder::default().force(true).build()),
                )
                .await;
        }
        floor.push(sum.as_secs_f64());

        // The agent: accepted → all 10 running (the deploy call answers `applied` then).
        let agent = Agent::start(&format!("{device}-{round}"), "");
        let modules: serde_json::Map<String, serde_json::Value> = (0..MODULES)
            .map(|i| (format!("m{i}"), json!({ "image": image })))
            .collect();
        let manifest =
            json!({ "schemaVersion": "1.0", "id": "bench", "version": 1, "modules": modules });
        let socket = agent.dir.path().join("api.sock");
        let mut accepted = None;
        let mut applied = None;
        let request = ApiRequest::Deploy {
            manifest: manifest.to_string(),
            wait_secs: 120,
        };
        api::call(&socket, &request, |event| match event {
            ApiEvent::Accepted { .. } => accepted = Some(Instant::now()),
            ApiEvent::Done { status, .. } => {
                assert_eq!(status, "applied");
                applied = Some(Instant::now());
            }
            _ => {}
        })
        .await
        .unwrap();
        let secs = (applied.unwrap() - accepted.unwrap()).as_secs_f64();
        agent_times.push(secs);
        eprintln!(
            "round {round}: floor {:.3} s, agent {:.3} s",
            floor[round], secs
        );
        drop(agent);
    }
    let (f, a) = (median(&mut floor), median(&mut agent_times));
    println!("modules: {MODULES}, rounds: {ROUNDS}");
    println!("floor (sum of create+start), median: {f:.3} s");
    println!("agent (accepted -> all running), median: {a:.3} s");
    println!(
        "agent / floor: {:.3} ({:+.1}%)",
        a / f,
        (a / f - 1.0) * 100.0
    );
}
