//! Property tests: whatever manifest the types can express, validation either accepts it or
//! refuses it with issues whose paths point at real fields; it never panics.

use std::collections::BTreeMap;

use outpost_agent::manifest::{self, *};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,8}",
        "[A-Za-z0-9_./:@-]{0,20}",
        any::<String>(),
        Just(String::new()),
    ]
}

fn image() -> impl Strategy<Value = String> {
    prop_oneof![
        "(127\\.0\\.0\\.1:5000/)?[a-z]{1,8}(/[a-z0-9]{1,4})?:[a-z0-9.]{1,6}",
        "[a-z]{1,6}@sha256:[0-9a-f]{64}",
        text(),
    ]
}

fn module() -> impl Strategy<Value = Module> {
    (
        image(),
        prop_oneof![
            Just(PullPolicy::Always),
            Just(PullPolicy::IfNotPresent),
            Just(PullPolicy::Never)
        ],
        prop_oneof![Just(DesiredStatus::Running), Just(DesiredStatus::Stopped)],
        prop_oneof![
            Just(RestartPolicy::Always),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::OnUnhealthy),
            Just(RestartPolicy::Never)
        ],
        0u32..2000,
        btree_map(text(), text(), 0..3),
        option::of(create_options()),
        option::of((option::of(0u64..5000), option::of(-1.0f64..2000.0))),
        option::of((
            vec(
                prop_oneof![Just(Arch::X86_64), Just(Arch::Aarch64), Just(Arch::Armv7)],
                0..4,
            ),
            option::of(0u64..10),
        )),
    )
        .prop_map(
            |(image, pull, status, restart, order, env, create, res, req)| Module {
                runtime: RuntimeKind::Docker,
                image,
                command: Vec::new(),
                working_dir: None,
                platform: None,
                image_pull_policy: pull,
                status,
                restart_policy: restart,
                startup_order: order,
                env,
                create_options: create,
                resources: res.map(|(memory_mb, cpus)| Resources {
                    memory_mb,
                    cpus,
                    pids_limit: None,
                }),
                requires: req.map(|(arch, min_memory_mb)| Requires {
                    arch,
                    min_memory_mb,
                }),
                security: None,
                artifacts: Vec::new(),
            },
        )
}

fn create_options() -> impl Strategy<Value = CreateOptions> {
    (
        option::of(vec(text(), 0..3)),
        option::of(text()),
        btree_map(text(), text(), 0..2),
        vec(text(), 0..3),
        btree_map(text(), vec((option::of(text()), text()), 0..2), 0..2),
        any::<bool>(),
        vec(text(), 0..2),
        vec(text(), 0..2),
    )
        .prop_map(
            |(cmd, user, labels, binds, ports, privileged, caps, hosts)| CreateOptions {
                cmd,
                entrypoint: None,
                user,
                working_dir: None,
                labels,
                host_config: Some(HostConfig {
                    binds,
                    port_bindings: ports
                        .into_iter()
                        .map(|(k, v)| {
                            (
                                k,
                                v.into_iter()
                                    .map(|(host_ip, host_port)| PortBinding { host_ip, host_port })
                                    .collect(),
                            )
                        })
                        .collect(),
                    privileged,
                    network_mode: None,
                    devices: vec![],
                    cap_add: caps,
                    cap_drop: vec![],
                    readonly_rootfs: false,
                    extra_hosts: hosts,
                }),
            },
        )
}

fn deployment() -> impl Strategy<Value = Deployment> {
    (
        prop_oneof![Just("1.0".to_string()), text()],
        text(),
        0u64..5,
        btree_map(prop_oneof!["[a-z]{1,6}", text()], module(), 0..4),
        btree_map(text(), (text(), text()), 0..2),
        vec((text(), text()), 0..3),
        option::of((any::<bool>(), 0u64..100_000)),
        option::of(prop_oneof![
            text().prop_map(outpost_agent::manifest::Target::Device),
            text().prop_map(outpost_agent::manifest::Target::Group)
        ]),
        option::of(text()),
    )
        .prop_map(
            |(
                schema_version,
                id,
                version,
                modules,
                registries,
                routes,
                rollback,
                target,
                expires_at,
            )| Deployment {
                target,
                expires_at,
                agent: None,
                artifacts: BTreeMap::new(),
                urgent: false,
                update_lock_deadline_secs: None,
                schema_version,
                id,
                version,
                priority: 0,
                modules,
                registries: registries
                    .into_iter()
                    .map(|(k, (username, password))| {
                        (
                            k,
                            RegistryCredentials {
                                username,
                                password: Secret::new(password),
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>(),
                routes: routes
                    .into_iter()
                    .map(|(from, to)| Route {
                        from,
                        to,
                        priority: None,
                    })
                    .collect(),
                rollback: rollback.map(|(on_failure, healthy_within_secs)| Rollback {
                    on_failure,
                    healthy_within_secs,
                }),
            },
        )
}

/// The closest existing ancestor of a path: a "required field is missing" issue names the
/// missing field, whose parent exists.
fn resolves(value: &serde_json::Value, path: &str) -> bool {
    value.pointer(path).is_some()
        || path
            .rsplit_once('/')
            .is_some_and(|(parent, _)| value.pointer(parent).is_some())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn validation_accepts_or_names_real_fields(d in deployment()) {
        let bytes = serde_json::to_vec(&d).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        match manifest::parse(&bytes) {
            Ok(parsed) => prop_assert_eq!(parsed, d),
            Err(e) => {
                let issues = e.issues();
                prop_assert!(!issues.is_empty());
                for issue in issues {
                    prop_assert!(issue.path.starts_with('/'), "issue without a path: {}", issue);
                    prop_assert!(resolves(&value, &issue.path), "path {} is not in the manifest", issue.path);
                    prop_assert!(!issue.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        let _ = manifest::parse(&bytes);
    }
}
