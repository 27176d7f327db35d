//! The hub link and the operator's CLI against a real broker with TLS: Mosquitto, or the one
//! `OUTPOST_TEST_BROKER` names (`scripts/test-brokers` runs them all).
//!
//! The device side runs `outpost_agent::hub::run` against the agent of
//! `tests/support` (see `TestAgent`: the real reconciler over the fake engine).

use std::time::Duration;

use ed25519_dalek::SigningKey;
use outpost_agent::intake::{MAX_MESSAGE_BYTES, hex_sha256};
use outpost_agent::signing;
use outpost_agent::state::{DeploymentStatus, ReportedState, Source};
use outpost_e2e::{
    Auth, Broker, Device, DeviceOptions, ctl, init, manifest, wait_for_message, wait_for_state,
};

const WAIT: Duration = Duration::from_secs(20);

/// The broker of the matrix (`OUTPOST_TEST_BROKER`) in the mode nearest `auth`; `exact` for
/// tests about the mode itself (skipped, saying so, on brokers without it).
macro_rules! broker {
    (exact $auth:expr) => {
        match Broker::start_exact($auth).unwrap() {
            Some(b) => b,
            None => return,
        }
    };
    ($auth:expr) => {
        match Broker::start($auth).unwrap() {
            Some(b) => b,
            None => return,
        }
    };
}

fn key_files(dir: &std::path::Path) -> (SigningKey, std::path::PathBuf, std::path::PathBuf) {
    let key = SigningKey::from_bytes(&[42; 32]);
    let (private, public) = signing::write_key_pair(&key, &dir.join("operator")).unwrap();
    (key, private, public)
}

fn applied(id: &str, version: u64) -> impl Fn(&ReportedState) -> bool {
    let id = id.to_string();
    move |s| {
        s.deployment.as_ref().is_some_and(|d| {
            d.id == id && d.version == version && d.status == DeploymentStatus::Applied
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_over_mutual_tls_until_applied_and_commands_answer() {
    init();
    let broker = broker!(Auth::MutualTls);
    let dir = tempfile::tempdir().unwrap();
    let (_key, private, public) = key_files(dir.path());
    let mut options = DeviceOptions::new("cam-1");
    options.trusted_key = Some(public);
    let mut device = Device::start(&broker, dir.path(), &options).unwrap();

    let file = dir.path().join("deploy.json");
    std::fs::write(&file, manifest("vision", 1, 0)).unwrap();
    let mut args: Vec<String> = Vec::new();
    args.extend(broker.cli_flags(dir.path()).unwrap());
    let started = std::time::Instant::now();
    let code = ctl([
        args.clone(),
        vec![
            "deploy".into(),
            "--device".into(),
            "cam-1".into(),
            file.display().to_string(),
            "--sign-key".into(),
            private.display().to_string(),
            "--timeout".into(),
            "20".into(),
        ],
    ]
    .concat())
    .await;
    assert_eq!(
        code,
        0,
        "deploy should end applied; broker log:\n{}",
        broker.log()
    );
    eprintln!(
        "BENCH deploy->applied (CLI, real reconciler over the fake engine): {:?}",
        started.elapsed()
    );

    let mut op = broker.operator(dir.path()).await.unwrap();
    let state = wait_for_state(&mut op, "cam-1", WAIT, applied("vision", 1))
        .await
        .unwrap();
    let d = state.deployment.unwrap();
    assert_eq!(d.source, Source::Device);
    assert_eq!(state.modules.len(), 1);

    // Status, and commands with their answers. The device trusts a key: commands are signed.
    let run = |extra: &[&str]| {
        let mut a = args.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        if extra.first() == Some(&"cmd") {
            a.extend(["--sign-key".to_string(), private.display().to_string()]);
        }
        ctl(a)
    };
    assert_eq!(run(&["status"]).await, 0);
    assert_eq!(run(&["status", "--device", "cam-1", "--json"]).await, 0);
    assert_eq!(run(&["cmd", "--device", "cam-1", "ping"]).await, 0);
    assert_eq!(
        run(&[
            "cmd",
            "--device",
            "cam-1",
            "logs",
            "--args",
            r#"{"module":"app","tail":5}"#
        ])
        .await,
        0
    );
    assert_eq!(
        run(&[
            "cmd",
            "--device",
            "cam-1",
            "restart-module",
            "--args",
            r#"{"module":"app"}"#
        ])
        .await,
        0
    );
    assert_eq!(
        run(&[
            "cmd",
            "--device",
            "cam-1",
            "restart-module",
            "--args",
            r#"{"module":"nope"}"#
        ])
        .await,
        1,
        "a command the agent refuses exits 1"
    );
    assert_eq!(
        run(&["cmd", "--device", "cam-1", "self-destruct"]).await,
        1,
        "unknown commands get an error reply"
    );
    // The error reply itself, read raw.
    op.subscribe(&["outpost/cam-1/responses/+".to_string()])
        .await
        .unwrap();
    let signed = |command: &str, id: &str, args: serde_json::Value| {
        let c = outpost_agent::hub::commands::SignedCommand {
            command: command.into(),
            device: "cam-1".into(),
            id: id.into(),
            expires_at: outpost_agent::clock::format_rfc3339(outpost_agent::hub::unix_now() + 300),
            args,
        };
        serde_json::to_vec(&signing::sign_as(
            signing::COMMAND_TYPE,
            &serde_json::to_vec(&c).unwrap(),
            &_key,
        ))
        .unwrap()
    };
    op.publish(
        "outpost/cam-1/commands/self-destruct",
        false,
        signed("self-destruct", "r-1", serde_json::json!({})),
    )
    .await
    .unwrap();
    let reply = wait_for_message(&mut op, "outpost/cam-1/responses/r-1", WAIT, |b| {
        serde_json::from_slice::<serde_json::Value>(b).ok()
    })
    .await
    .unwrap();
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("unknown command `self-destruct`")
    );
    for i in 1..=1000 {
        device.agent.engine.print("app", &format!("app line {i}"));
    }
    // An unsigned command (anyone who can publish on the broker) is refused, and says why.
    op.publish(
        "outpost/cam-1/commands/logs",
        false,
        br#"{"id":"r-unsigned","args":{"module":"app","tail":3}}"#.to_vec(),
    )
    .await
    .unwrap();
    let refused = wait_for_message(&mut op, "outpost/cam-1/responses/r-unsigned", WAIT, |b| {
        serde_json::from_slice::<serde_json::Value>(b).ok()
    })
    .await
    .unwrap();
    assert_eq!(refused["ok"], false);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("unsigned command refused"),
        "{refused}"
    );
    let logs_command = signed("logs", "r-2", serde_json::json!({"module":"app","tail":3}));
    let logs = {
        op.publish("outpost/cam-1/commands/logs", false, logs_command.clone())
            .await
            .unwrap();
        wait_for_message(&mut op, "outpost/cam-1/responses/r-2", WAIT, |b| {
            serde_json::from_slice::<serde_json::Value>(b).ok()
        })
        .await
        .unwrap()
    };
    assert_eq!(
        logs["result"]["text"],
        "app line 998\napp line 999\napp line 1000\n"
    );
    // The same signed command again (a replay): refused.
    op.publish("outpost/cam-1/commands/logs", false, logs_command)
        .await
        .unwrap();
    let replay = wait_for_message(&mut op, "outpost/cam-1/responses/r-2", WAIT, |b| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .filter(|v| v["ok"] == false)
    })
    .await
    .unwrap();
    assert!(
        replay["error"].as_str().unwrap().contains("replay"),
        "{replay}"
    );

    // The same deployment delivered again (a redelivery) changes nothing.
    let offers_before = device.agent.offers.lock().unwrap().len();
    let code = ctl([
        args.clone(),
        vec![
            "deploy".into(),
            "--device".into(),
            "cam-1".into(),
            file.display().to_string(),
            "--sign-key".into(),
            private.display().to_string(),
        ],
    ]
    .concat())
    .await;
    assert_eq!(
        code, 0,
        "redeploying the applied deployment is still applied"
    );
    assert_eq!(device.agent.offers.lock().unwrap().len(), offers_before);

    device.stop().await.unwrap();
    // A clean stop says offline.
    wait_for_message(&mut op, "outpost/cam-1/presence", WAIT, |b| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .filter(|v| v["online"] == false)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused_clearly() {
    init();
    let broker = broker!(exact Auth::MutualTls);
    if !broker.kind.alerts_refused_certificates() {
        eprintln!(
            "UNSUPPORTED on {}: a refused client certificate is a closed connection without a TLS alert; the device cannot tell it from a network failure and retries (docs/hub.md)",
            broker.kind.name()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut options = DeviceOptions::new("cam-2");
    options.client_auth = Some((
        broker.pki.other_client_cert.clone(),
        broker.pki.other_client_key.clone(),
    ));
    let mut device = Device::start(&broker, dir.path(), &options).unwrap();
    let err = device
        .ended(WAIT)
        .await
        .expect("the link gives up at start-up")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("broker refused the client certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_ca_says_so() {
    init();
    let broker = broker!(Auth::Tls);
    let dir = tempfile::tempdir().unwrap();
    let mut options = DeviceOptions::new("cam-3");
    options.ca_file = Some(broker.pki.other_ca.clone());
    let mut device = Device::start(&broker, dir.path(), &options).unwrap();
    let err = device
        .ended(WAIT)
        .await
        .expect("the link gives up at start-up")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("server certificate is not signed by the CA in hub.ca_file"),
        "{err}"
    );
    // The operator's CLI says the same and exits 69.
    let code = ctl(vec![
        "--hub".into(),
        broker.url(),
        "--ca".into(),
        broker.pki.other_ca.display().to_string(),
        "status".into(),
    ])
    .await;
    assert_eq!(code, 69);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_reconnects_resubscribes_and_reports_after_a_broker_restart() {
    init();
    let mut broker = broker!(Auth::Tls);
    let dir = tempfile::tempdir().unwrap();
    let _device = Device::start(&broker, dir.path(), &DeviceOptions::new("cam-4")).unwrap();
    {
        let mut op = broker.operator(dir.path()).await.unwrap();
        op.publish(
            "outpost/cam-4/deployment",
            true,
            manifest("r", 1, 0).into_bytes(),
        )
        .await
        .unwrap();
        wait_for_state(&mut op, "cam-4", WAIT, applied("r", 1))
            .await
            .unwrap();
    }
    // The broker keeps nothing (persistence off): whatever comes back was sent again.
    broker.stop();
    broker.restart().unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    wait_for_state(&mut op, "cam-4", WAIT, applied("r", 1))
        .await
        .expect("state reported again after the reconnect");
    wait_for_message(&mut op, "outpost/cam-4/presence", WAIT, |b| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .filter(|v| v["online"] == true)
    })
    .await
    .unwrap();
    op.publish(
        "outpost/cam-4/deployment",
        true,
        manifest("r", 2, 0).into_bytes(),
    )
    .await
    .unwrap();
    wait_for_state(&mut op, "cam-4", WAIT, applied("r", 2))
        .await
        .expect("resubscribed: the new deployment arrives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_the_newest_retained_deployment() {
    init();
    let broker = broker!(Auth::Tls);
    let dir = tempfile::tempdir().unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    for version in [1, 2, 3] {
        op.publish(
            "outpost/cam-5/deployment",
            true,
            manifest("late", version, 0).into_bytes(),
        )
        .await
        .unwrap();
    }
    op.fence(WAIT).await.unwrap();
    let device = Device::start(&broker, dir.path(), &DeviceOptions::new("cam-5")).unwrap();
    wait_for_state(&mut op, "cam-5", WAIT, applied("late", 3))
        .await
        .unwrap();
    assert_eq!(
        *device.agent.offers.lock().unwrap(),
        vec![("late".to_string(), 3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_deployment_reaches_its_devices_and_a_device_deployment_overrides_it() {
    init();
    let broker = broker!(Auth::MutualTls);
    let dir = tempfile::tempdir().unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    let mut devices = Vec::new();
    for (id, groups) in [
        ("g-1", vec!["line-3"]),
        ("g-2", vec!["other", "line-3"]),
        ("g-3", vec![]),
    ] {
        let mut o = DeviceOptions::new(id);
        o.groups = groups.into_iter().map(String::from).collect();
        devices.push(Device::start(&broker, dir.path(), &o).unwrap());
    }
    for id in ["g-1", "g-2", "g-3"] {
        wait_for_message(&mut op, &format!("outpost/{id}/presence"), WAIT, |b| {
            serde_json::from_slice::<serde_json::Value>(b)
                .ok()
                .filter(|v| v["online"] == true)
        })
        .await
        .unwrap();
    }
    let file = dir.path().join("group.json");
    std::fs::write(&file, manifest("fleet", 1, 0)).unwrap();
    let mut args: Vec<String> = Vec::new();
    args.extend(broker.cli_flags(dir.path()).unwrap());
    let mut deploy = args.clone();
    deploy.extend([
        "deploy".into(),
        "--group".into(),
        "line-3".into(),
        file.display().to_string(),
    ]);
    assert_eq!(
        ctl(deploy).await,
        0,
        "every member applies the group deployment"
    );
    for id in ["g-1", "g-2"] {
        let s = wait_for_state(&mut op, id, WAIT, applied("fleet", 1))
            .await
            .unwrap();
        assert_eq!(
            s.deployment.unwrap().source,
            Source::Group {
                name: "line-3".into()
            }
        );
    }
    assert!(
        devices[2].agent.offers.lock().unwrap().is_empty(),
        "g-3 is not in the group"
    );

    // A lower-priority group deployment does not displace it; the device's own one does.
    op.publish(
        "outpost/groups/other/deployment",
        true,
        manifest("other", 2, 0).into_bytes(),
    )
    .await
    .unwrap();
    op.publish(
        "outpost/g-1/deployment",
        true,
        manifest("own", 3, 0).into_bytes(),
    )
    .await
    .unwrap();
    let s = wait_for_state(&mut op, "g-1", WAIT, applied("own", 3))
        .await
        .unwrap();
    assert_eq!(s.deployment.unwrap().source, Source::Device);
    // g-2 follows "other" and "line-3", listed in that order: equal priority, "other" wins.
    let s = wait_for_state(&mut op, "g-2", WAIT, applied("other", 2))
        .await
        .unwrap();
    assert_eq!(
        s.deployment.unwrap().source,
        Source::Group {
            name: "other".into()
        }
    );

    let mut status = args.clone();
    status.extend([
        "status".into(),
        "--group".into(),
        "line-3".into(),
        "--json".into(),
    ]);
    assert_eq!(ctl(status).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deployments_are_rejected_with_their_reasons_in_the_state() {
    init();
    let broker = broker!(Auth::Tls);
    let dir = tempfile::tempdir().unwrap();
    let (key, _private, public) = key_files(dir.path());
    let mut options = DeviceOptions::new("cam-6");
    options.trusted_key = Some(public);
    let _device = Device::start(&broker, dir.path(), &options).unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    let signed = |text: &str, key: &SigningKey| {
        serde_json::to_vec(&signing::sign(text.as_bytes(), key)).unwrap()
    };

    // A good one first, so "old version" has something to be older than.
    op.publish(
        "outpost/cam-6/deployment",
        true,
        signed(&manifest("good", 5, 0), &key),
    )
    .await
    .unwrap();
    wait_for_state(&mut op, "cam-6", WAIT, applied("good", 5))
        .await
        .unwrap();

    let stranger = SigningKey::from_bytes(&[9; 32]);
    let wrong_json = r#"{"schemaVersion":"1.0","id":"bad","version":"seven","modules":{}}"#;
    let cases: Vec<(&str, Vec<u8>, String, &str)> = vec![
        (
            "garbage",
            b"\x00\x01 not json at all".to_vec(),
            hex_sha256(b"\x00\x01 not json at all"),
            "",
        ),
        (
            "oversized",
            vec![b' '; MAX_MESSAGE_BYTES + 1],
            hex_sha256(&vec![b' '; MAX_MESSAGE_BYTES + 1]),
            "",
        ),
        (
            "unsigned",
            manifest("plain", 6, 0).into_bytes(),
            hex_sha256(manifest("plain", 6, 0).as_bytes()),
            "",
        ),
        (
            "wrong json",
            signed(wrong_json, &key),
            hex_sha256(wrong_json.as_bytes()),
            "/version",
        ),
        (
            "wrong signature",
            signed(&manifest("forged", 7, 0), &stranger),
            hex_sha256(manifest("forged", 7, 0).as_bytes()),
            "/signatures",
        ),
        (
            "old version",
            signed(&manifest("good", 3, 0), &key),
            hex_sha256(manifest("good", 3, 0).as_bytes()),
            "/version",
        ),
    ];
    // Without trusted keys the device parses what it gets: garbage is refused as not JSON,
    // with the position in the path.
    let _open = Device::start(&broker, dir.path(), &DeviceOptions::new("cam-6b")).unwrap();
    op.publish("outpost/cam-6b/deployment", true, b"{\"id\": ]".to_vec())
        .await
        .unwrap();
    let state = wait_for_state(&mut op, "cam-6b", WAIT, |s| s.last_rejected.is_some())
        .await
        .unwrap();
    let reasons = state.last_rejected.unwrap().reasons;
    assert!(reasons[0].path.starts_with("line 1, column"), "{reasons:?}");

    for (name, payload, digest, path) in cases {
        op.publish("outpost/cam-6/deployment", true, payload)
            .await
            .unwrap();
        let state = wait_for_state(&mut op, "cam-6", WAIT, |s| {
            s.last_rejected
                .as_ref()
                .is_some_and(|r| r.digest.as_deref() == Some(digest.as_str()))
        })
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let rejected = state.last_rejected.unwrap();
        assert_eq!(rejected.status, DeploymentStatus::Rejected, "{name}");
        assert!(!rejected.reasons.is_empty(), "{name}: no reasons");
        assert!(
            rejected.reasons.iter().any(|r| r.path.starts_with(path)),
            "{name}: expected a reason at {path}: {:?}",
            rejected.reasons
        );
        // Nothing changed: the good deployment is still in force.
        assert_eq!(
            state.deployment.as_ref().map(|d| d.version),
            Some(5),
            "{name}"
        );
        eprintln!("{name}: {:?}", rejected.reasons);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_and_presence_hold_no_secrets() {
    init();
    let password = "pw-9f8e7d6c-never-published";
    let broker = broker!(exact Auth::Password {
        username: "device".into(),
        password: password.into()
    });
    let dir = tempfile::tempdir().unwrap();
    let _device = Device::start(&broker, dir.path(), &DeviceOptions::new("cam-7")).unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    let with_registry = r#"{"schemaVersion":"1.0","id":"sec","version":1,"modules":{"app":{"image":"127.0.0.1:5000/app:1"}},"registries":{"127.0.0.1:5000":{"username":"edge","password":"registry-secret-123"}}}"#;
    op.publish(
        "outpost/cam-7/deployment",
        true,
        with_registry.as_bytes().to_vec(),
    )
    .await
    .unwrap();
    wait_for_state(&mut op, "cam-7", WAIT, applied("sec", 1))
        .await
        .unwrap();
    let retained = op
        .snapshot(&["outpost/cam-7/#".to_string()], WAIT)
        .await
        .unwrap();
    let texts: Vec<String> = retained
        .iter()
        .filter(|m| m.topic.ends_with("/state") || m.topic.ends_with("/presence"))
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(texts.len(), 2, "state and presence are retained");
    let key_pem = std::fs::read_to_string(&broker.pki.client_key).unwrap();
    for text in &texts {
        for secret in [
            password,
            "registry-secret-123",
            "PRIVATE KEY",
            key_pem.lines().nth(1).unwrap(),
        ] {
            assert!(
                !text.contains(secret),
                "retained message holds a secret: {text}"
            );
        }
    }
}

/// Benchmark (run with `--ignored --nocapture`): time from publishing a deployment to the
/// device's retained state saying `applied`, over mutual TLS. Over the fake engine this is
/// the hub path and the reconciler (intake, offer, store, report debounce, MQTT both ways),
/// not Docker pulling or starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_publish_to_applied() {
    init();
    let broker = broker!(Auth::MutualTls);
    let dir = tempfile::tempdir().unwrap();
    let (key, _private, public) = key_files(dir.path());
    let mut options = DeviceOptions::new("bench-1");
    options.trusted_key = Some(public);
    let _device = Device::start(&broker, dir.path(), &options).unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    let mut times = Vec::new();
    for version in 1..=30u64 {
        let envelope = serde_json::to_vec(&signing::sign(
            manifest("bench", version, 0).as_bytes(),
            &key,
        ))
        .unwrap();
        // Deployments are isolated events: leave the reporter's rate limit window (a spacing
        // for the measurement, not a wait for a condition).
        tokio::time::sleep(outpost_agent::hub::report::DEBOUNCE * 2).await;
        let started = std::time::Instant::now();
        op.publish("outpost/bench-1/deployment", true, envelope)
            .await
            .unwrap();
        wait_for_state(&mut op, "bench-1", WAIT, applied("bench", version))
            .await
            .unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "BENCH publish->applied over mTLS, real reconciler over the fake engine, n={}: min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        times.len(),
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() * 9 / 10]),
        ms(times[times.len() - 1])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_on_loopback_works_and_the_last_will_says_offline() {
    init();
    let broker = broker!(Auth::Plain);
    let dir = tempfile::tempdir().unwrap();
    let mut device = Device::start(&broker, dir.path(), &DeviceOptions::new("cam-8")).unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    op.publish(
        "outpost/cam-8/deployment",
        true,
        manifest("plain", 1, 0).into_bytes(),
    )
    .await
    .unwrap();
    wait_for_state(&mut op, "cam-8", WAIT, applied("plain", 1))
        .await
        .unwrap();
    let mut args: Vec<String> = Vec::new();
    args.extend(broker.cli_flags(dir.path()).unwrap());
    args.extend([
        "watch".into(),
        "--device".into(),
        "cam-8".into(),
        "--count".into(),
        "2".into(),
    ]);
    assert_eq!(
        ctl(args).await,
        0,
        "watch prints the retained state and presence"
    );

    // The device vanishes without a goodbye: the broker publishes its will.
    device.kill();
    wait_for_message(&mut op, "outpost/cam-8/presence", WAIT, |b| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .filter(|v| v["online"] == false)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_at_start_up() {
    init();
    let broker = broker!(exact Auth::Password {
        username: "device".into(),
        password: "right".into()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut options = DeviceOptions::new("cam-9");
    options.password = Some("wrong-password-xyz".into());
    let mut device = Device::start(&broker, dir.path(), &options).unwrap();
    let err = device
        .ended(WAIT)
        .await
        .expect("the link gives up at start-up")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("broker refused the connection")
            && text.contains("wrong user name or password"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-password-xyz"),
        "the password is never shown"
    );
}

#[tokio::test]
async fn the_cli_refuses_plaintext_to_a_remote_hub() {
    init();
    let code = ctl(vec![
        "--hub".into(),
        "mqtt://hub.example.com".into(),
        "status".into(),
    ])
    .await;
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_started_while_the_broker_is_down_connects_when_it_comes_up() {
    init();
    let mut broker = broker!(Auth::Tls);
    let dir = tempfile::tempdir().unwrap();
    broker.stop();
    let mut device = Device::start(&broker, dir.path(), &DeviceOptions::new("cam-10")).unwrap();
    // A broker that is down is not a configuration error: the link keeps trying.
    assert!(device.ended(Duration::from_millis(1500)).await.is_none());
    broker.restart().unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    op.publish(
        "outpost/cam-10/deployment",
        true,
        manifest("boot", 1, 0).into_bytes(),
    )
    .await
    .unwrap();
    wait_for_state(&mut op, "cam-10", WAIT, applied("boot", 1))
        .await
        .unwrap();
    device.stop().await.unwrap();
}

/// Benchmark (run with `--ignored --nocapture`, after
/// `cargo build --release --example hub_idle -p outpost-agent`, with `HUB_IDLE_BIN` set to the
/// built example): resident memory of the hub link alone — the `hub_idle` example, a
/// do-nothing agent reporting five running modules — connected over mutual TLS and idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_hub_link_idle_memory() {
    init();
    let Ok(bin) = std::env::var("HUB_IDLE_BIN") else {
        panic!("set HUB_IDLE_BIN to the built hub_idle example");
    };
    let broker = broker!(Auth::MutualTls);
    let dir = tempfile::tempdir().unwrap();
    let config =
        outpost_e2e::device_config(&broker, dir.path(), &DeviceOptions::new("idle-1")).unwrap();
    let mut child = std::process::Command::new(bin)
        .arg(&config.source)
        .spawn()
        .unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    wait_for_state(&mut op, "idle-1", WAIT, |s| s.modules.len() == 5)
        .await
        .unwrap();
    // Idle is a duration by definition: let it sit, then read its memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let rss: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM") || l.starts_with("RssAnon"))
        .collect();
    eprintln!("BENCH hub link idle (hub_idle example, mTLS, 5 modules in state): {rss:?}");
    let _ = child.kill();
    let _ = child.wait();
}

/// The signed-deployment attacks of the security review, over the real broker: an envelope
/// signed for one device replayed on another's topic, an expired envelope, and the old-group
/// rollback (an old signed group deployment plus an unsigned "withdrawal" of the device's own)
/// — each refused with its reason; then the legitimate path, a signed withdrawal, hands control
/// back to the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_deployments_are_bound_to_their_device_time_and_version_floor() {
    init();
    let broker = broker!(Auth::MutualTls);
    let dir = tempfile::tempdir().unwrap();
    let (key, private, public) = key_files(dir.path());
    let mut devices = Vec::new();
    for id in ["b-1", "b-2"] {
        let mut o = DeviceOptions::new(id);
        o.groups = vec!["line-9".into()];
        o.trusted_key = Some(public.clone());
        devices.push(Device::start(&broker, dir.path(), &o).unwrap());
    }
    let mut op = broker.operator(dir.path()).await.unwrap();
    let mut args: Vec<String> = Vec::new();
    args.extend(broker.cli_flags(dir.path()).unwrap());
    let deploy = |target: &[&str], file: &std::path::Path| {
        let mut a = args.clone();
        a.push("deploy".into());
        a.extend(target.iter().map(|s| s.to_string()));
        a.extend([
            file.display().to_string(),
            "--sign-key".into(),
            private.display().to_string(),
            "--timeout".into(),
            "20".into(),
        ]);
        ctl(a)
    };
    // The group's deployment v1, then b-1's own v10, both signed by the CLI (which binds them
    // to their target and an expiry).
    let group_file = dir.path().join("group.json");
    std::fs::write(&group_file, manifest("fleet", 1, 0)).unwrap();
    assert_eq!(deploy(&["--group", "line-9"], &group_file).await, 0);
    let own_file = dir.path().join("own.json");
    std::fs::write(&own_file, manifest("own", 10, 0)).unwrap();
    assert_eq!(deploy(&["--device", "b-1"], &own_file).await, 0);
    wait_for_state(&mut op, "b-1", WAIT, applied("own", 10))
        .await
        .unwrap();

    // Replay: b-1's signed envelope published on b-2's topic.
    let retained = op
        .snapshot(&["outpost/b-1/deployment".to_string()], WAIT)
        .await
        .unwrap();
    let envelope = retained
        .iter()
        .rev()
        .find(|m| m.topic == "outpost/b-1/deployment")
        .unwrap()
        .payload
        .clone();
    op.publish("outpost/b-2/deployment", true, envelope)
        .await
        .unwrap();
    let s = wait_for_state(&mut op, "b-2", WAIT, |s| {
        s.last_rejected.as_ref().is_some_and(|r| r.version == 10)
    })
    .await
    .unwrap();
    let reasons = format!("{:?}", s.last_rejected.unwrap().reasons);
    assert!(
        reasons.contains("/target/device") && reasons.contains("signed for device `b-1`"),
        "{reasons}"
    );
    assert_eq!(s.deployment.unwrap().version, 1, "b-2 stays on the group's");

    // An expired envelope, correctly signed for b-2.
    let expired = r#"{"schemaVersion":"1.0","id":"stale","version":20,"target":{"device":"b-2"},"expiresAt":"2026-01-01T00:00:00Z","modules":{"app":{"image":"127.0.0.1:5000/app:20"}}}"#;
    let envelope = serde_json::to_vec(&signing::sign(expired.as_bytes(), &key)).unwrap();
    op.publish("outpost/b-2/deployment", true, envelope)
        .await
        .unwrap();
    let s = wait_for_state(&mut op, "b-2", WAIT, |s| {
        s.last_rejected.as_ref().is_some_and(|r| r.version == 20)
    })
    .await
    .unwrap();
    let reasons = format!("{:?}", s.last_rejected.unwrap().reasons);
    assert!(
        reasons.contains("/expiresAt") && reasons.contains("expired at"),
        "{reasons}"
    );

    // The old-group rollback: an unsigned, empty retained message on b-1's topic.
    op.publish("outpost/b-1/deployment", true, Vec::new())
        .await
        .unwrap();
    let s = wait_for_state(&mut op, "b-1", WAIT, |s| {
        s.last_rejected
            .as_ref()
            .is_some_and(|r| format!("{:?}", r.reasons).contains("unsigned withdrawal"))
    })
    .await
    .unwrap();
    assert_eq!(s.deployment.as_ref().unwrap().version, 10, "still on v10");
    // The broker now holds nothing for b-1: publish its next deployment, then withdraw it the
    // legitimate way, signed: control goes back to the group's v1.
    std::fs::write(&own_file, manifest("own", 11, 0)).unwrap();
    assert_eq!(deploy(&["--device", "b-1"], &own_file).await, 0);
    let mut withdraw = args.clone();
    withdraw.extend([
        "withdraw".into(),
        "--device".into(),
        "b-1".into(),
        "--sign-key".into(),
        private.display().to_string(),
    ]);
    assert_eq!(ctl(withdraw).await, 0);
    let s = wait_for_state(&mut op, "b-1", WAIT, applied("fleet", 1))
        .await
        .unwrap();
    assert_eq!(
        s.deployment.unwrap().source,
        Source::Group {
            name: "line-9".into()
        }
    );
}
