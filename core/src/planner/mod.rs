//! The planner: a pure function from what should be (the desired deployment), what is (the
//! engine's containers, the images present, pulls and actions under way), what happened
//! (restart history, exits, failures) and the monotonic time, to the next actions.
//!
//! It does no I/O, so every rule is tested case by case and by simulation. The rules:
//! - **Ownership.** Only containers labelled as Outpost's for this device exist here.
//! - **Nothing desired keeps everything.** Without a deployment (a new or lost store) every
//!   container found is kept and reported `unmanaged`, restarted by the policy in its labels;
//!   only a deployment removes modules.
//! - **Stage, verify, switch.** A deployment first *stages*: every image it needs is pulled
//!   and verified, and every artifact its modules read fetched and verified, while the old
//!   containers keep running; then every module that needs a new
//!   container gets one *created* (not started). Only when the whole deployment is staged does
//!   the *switch* begin: modules leaving the deployment are stopped and removed, highest startup
//!   group first; then, group by group from the lowest, each changed module's old container is
//!   stopped and the staged one started ([`Action::Replace`], which restores the old one when
//!   the new one cannot start). A deployment that cannot be staged changes nothing.
//! - **Startup order.** A group starts (or switches) once every lower group's modules are up
//!   (or have run and, by their policy, stay exited).
//! - **Restarts and backoff.** Exited containers restart by their policy after
//!   [`backoff_delay`], counted from when this agent *saw* the exit on the monotonic clock —
//!   never from the engine's wall-clock timestamps, which a device booting at 1970 puts decades
//!   in the future. Containers already exited when the agent started (a reboot) are started
//!   again in startup order, not counted as restarts. The planner never gives up.
//! - **Failures back off.** A failed pull, create or start waits [`backoff_delay`] of its
//!   attempts before the next try, and says why.
//!
//! Layout: `types` (the world, actions and plan), `deployment` (stage, verify, switch),
//! `unmanaged` (nothing desired), `restart` (policies and backoff).

mod deployment;
mod restart;
mod types;
mod unmanaged;

use std::collections::BTreeMap;

use crate::container::{ContainerState, Observed, labels};
use crate::manifest::RestartPolicy;

pub use restart::{
    BACKOFF_CAP_MS, CRASH_LOOP_AFTER, HEALTHY_RUN_MS, PULL_RETRY_BASE_MS, backoff_delay,
    failures_after, retry_delay,
};
pub use types::{
    Action, ArtifactWait, Desired, Exit, Failure, Held, Hold, ModuleHistory, ModulePlan, Plan,
    World,
};

use deployment::managed;
use unmanaged::unmanaged;

fn is_ours(o: &Observed, device: &str) -> bool {
    o.labels.get(labels::MANAGED).is_some_and(|v| v == "true")
        && o.labels.get(labels::DEVICE).is_some_and(|d| d == device)
        && !o.module.is_empty()
}

fn is_up(o: &Observed) -> bool {
    matches!(
        o.state,
        ContainerState::Running | ContainerState::Restarting
    )
}

fn is_exited(o: &Observed) -> bool {
    matches!(o.state, ContainerState::Exited | ContainerState::Dead)
}

/// The container to keep of several: up first, then the latest started, then by id.
fn best<'a>(cs: impl IntoIterator<Item = &'a Observed>) -> Option<&'a Observed> {
    cs.into_iter()
        .max_by_key(|c| (is_up(c), c.started_at, c.id.as_str()))
}

/// A container's startup group from its label; unknown groups stop first.
fn group_label(o: &Observed) -> u32 {
    o.labels
        .get(labels::STARTUP_ORDER)
        .and_then(|g| g.parse().ok())
        .unwrap_or(u32::MAX)
}

/// How a module should be kept alive: its restart policy and startup group.
#[derive(Debug, Clone, Copy)]
struct Keep {
    policy: RestartPolicy,
    group: u32,
}

/// Computes the next actions. Pure: same world, same plan.
pub fn plan(world: &World<'_>) -> Plan {
    let mut by_module: BTreeMap<&str, Vec<&Observed>> = BTreeMap::new();
    for o in world.observed.iter().filter(|o| is_ours(o, world.device)) {
        by_module.entry(o.module.as_str()).or_default().push(o);
    }
    match world.desired {
        None => unmanaged(world, &by_module),
        Some(d) => managed(world, d, &by_module),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::container::Health;
    use crate::manifest::{Deployment, DesiredStatus};
    use crate::spec::{config_hash, container_name};
    use crate::state::ModuleStatus;
    use proptest::prelude::*;

    const DEV: &str = "dev1";
    /// Monotonic "now": an hour after boot.
    const NOW: u64 = 3_600_000;
    /// The engine's wall clock in these tests (Unix seconds).
    const WALL: u64 = 1_800_000_000;

    fn desired(json: &str) -> Desired {
        let deployment: Deployment = serde_json::from_str(json).unwrap();
        let hashes = deployment
            .modules
            .iter()
            .map(|(n, m)| {
                let policy = crate::policy::PolicyConfig::default();
                (n.clone(), config_hash(m, &BTreeMap::new(), DEV, &policy))
            })
            .collect();
        Desired { deployment, hashes }
    }

    fn three() -> Desired {
        desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{
            "db":{"image":"r.io/db:1","startupOrder":0},
            "api":{"image":"r.io/api:1","startupOrder":10},
            "ui":{"image":"r.io/ui:1","startupOrder":20}}}"#,
        )
    }

    fn container(d: &Desired, module: &str, state: ContainerState) -> Observed {
        let mut labels = BTreeMap::new();
        labels.insert(labels::MANAGED.to_string(), "true".to_string());
        labels.insert(labels::DEVICE.to_string(), DEV.to_string());
        labels.insert(labels::MODULE.to_string(), module.to_string());
        if let Some(m) = d.deployment.modules.get(module) {
            labels.insert(labels::STARTUP_ORDER.into(), m.startup_order.to_string());
            labels.insert(
                labels::RESTART_POLICY.into(),
                m.restart_policy.as_str().into(),
            );
        }
        Observed {
            id: format!("id-{module}"),
            name: format!("outpost.{DEV}.{module}"),
            module: module.to_string(),
            config_hash: d.hashes.get(module).cloned().unwrap_or_default(),
            state,
            health: Health::None,
            exit_code: None,
            oom_killed: false,
            started_at: Some(WALL - 100),
            finished_at: None,
            image: String::new(),
            image_id: String::new(),
            labels,
        }
    }

    fn exited(d: &Desired, module: &str, code: i64, ran_secs: u64) -> Observed {
        let mut c = container(d, module, ContainerState::Exited);
        c.exit_code = Some(code);
        c.finished_at = Some(WALL);
        c.started_at = Some(WALL - ran_secs);
        c
    }

    struct Fixture {
        images: BTreeSet<String>,
        none: BTreeSet<String>,
        pull_failures: BTreeMap<String, Failure>,
        artifacts: BTreeMap<String, ArtifactWait>,
        start_failures: BTreeMap<String, Failure>,
        history: BTreeMap<String, ModuleHistory>,
        exits: BTreeMap<String, Exit>,
        busy: BTreeSet<String>,
    }

    impl Fixture {
        fn new(d: &Desired) -> Fixture {
            Fixture {
                images: d
                    .deployment
                    .modules
                    .values()
                    .map(|m| m.image.clone())
                    .collect(),
                none: BTreeSet::new(),
                pull_failures: BTreeMap::new(),
                artifacts: BTreeMap::new(),
                start_failures: BTreeMap::new(),
                history: BTreeMap::new(),
                exits: BTreeMap::new(),
                busy: BTreeSet::new(),
            }
        }
        /// The agent saw `id` exit `ago` ms before now.
        fn exit(&mut self, id: &str, ago: u64) {
            self.exits.insert(
                id.into(),
                Exit {
                    finished_at: Some(WALL),
                    seen_at: NOW - ago,
                    before_agent: false,
                },
            );
        }
        fn world<'a>(&'a self, d: Option<&'a Desired>, observed: &'a [Observed]) -> World<'a> {
            World {
                device: DEV,
                desired: d,
                observed,
                images: &self.images,
                pulling: &self.none,
                pulled: &self.none,
                pull_failures: &self.pull_failures,
                artifacts: &self.artifacts,
                start_failures: &self.start_failures,
                history: &self.history,
                exits: &self.exits,
                busy: &self.busy,
                now: NOW,
                hold: None,
            }
        }
    }

    fn create(module: &str, name: &str) -> Action {
        Action::Create {
            module: module.into(),
            name: name.into(),
            start: false,
        }
    }

    fn create_started(module: &str, name: &str) -> Action {
        Action::Create {
            module: module.into(),
            name: name.into(),
            start: true,
        }
    }

    fn staged(d: &Desired, module: &str) -> Observed {
        let mut c = container(d, module, ContainerState::Created);
        c.id = format!("new-{module}");
        c.started_at = None;
        c
    }

    #[test]
    fn a_new_deployment_is_created_whole_then_started_group_by_group() {
        let d = three();
        let f = Fixture::new(&d);
        let p = plan(&f.world(Some(&d), &[]));
        assert_eq!(
            p.actions,
            [
                create("api", "outpost.dev1.api"),
                create_started("db", "outpost.dev1.db"),
                create("ui", "outpost.dev1.ui")
            ],
            "nothing runs yet: the first group starts as it is created"
        );
        assert!(!p.staged);
        let all_created = [
            container(&d, "db", ContainerState::Created),
            container(&d, "api", ContainerState::Created),
            container(&d, "ui", ContainerState::Created),
        ];
        let p = plan(&f.world(Some(&d), &all_created));
        assert!(p.staged);
        assert_eq!(
            p.actions,
            [Action::Start {
                id: "id-db".into(),
                module: "db".into(),
                restart: false
            }]
        );
        let db_up = [
            container(&d, "db", ContainerState::Running),
            container(&d, "api", ContainerState::Created),
            container(&d, "ui", ContainerState::Created),
        ];
        let p = plan(&f.world(Some(&d), &db_up));
        assert_eq!(
            p.actions,
            [Action::Start {
                id: "id-api".into(),
                module: "api".into(),
                restart: false
            }]
        );
        let all_up = [
            container(&d, "db", ContainerState::Running),
            container(&d, "api", ContainerState::Running),
            container(&d, "ui", ContainerState::Running),
        ];
        let p = plan(&f.world(Some(&d), &all_up));
        assert!(p.actions.is_empty() && p.converged);
    }

    #[test]
    fn an_update_keeps_the_old_container_until_its_image_is_pulled() {
        let v1 = three();
        let v2 = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":2,"modules":{
            "db":{"image":"r.io/db:1","startupOrder":0},
            "api":{"image":"r.io/api:2","startupOrder":10},
            "ui":{"image":"r.io/ui:1","startupOrder":20}}}"#,
        );
        let mut f = Fixture::new(&v2);
        f.images.remove("r.io/api:2");
        let running = [
            container(&v2, "db", ContainerState::Running),
            container(&v1, "api", ContainerState::Running),
            container(&v2, "ui", ContainerState::Running),
        ];
        let p = plan(&f.world(Some(&v2), &running));
        assert_eq!(
            p.actions,
            [Action::Pull {
                module: "api".into(),
                image: "r.io/api:2".into()
            }],
            "nothing but the pull while the image is missing"
        );
        assert_eq!(p.modules["api"].status, ModuleStatus::Pulling);
        assert!(!p.converged);

        // Pulled: the new container is staged beside the old one, which keeps its name.
        f.images.insert("r.io/api:2".into());
        let p = plan(&f.world(Some(&v2), &running));
        assert_eq!(p.actions, [create("api", "outpost.dev1.api.1")]);

        // Staged: the switch replaces api alone.
        let mut new_api = staged(&v2, "api");
        new_api.name = "outpost.dev1.api.1".into();
        let staged_world = [
            running[0].clone(),
            running[1].clone(),
            running[2].clone(),
            new_api,
        ];
        let p = plan(&f.world(Some(&v2), &staged_world));
        assert_eq!(
            p.actions,
            [Action::Replace {
                module: "api".into(),
                old: vec!["id-api".into()],
                new: "new-api".into(),
                name: "outpost.dev1.api".into()
            }]
        );
    }

    /// v1 runs db, api, ui; v2 changes api only and has api's new container staged.
    fn api_update_staged() -> (Desired, Vec<Observed>) {
        let v1 = three();
        let v2 = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":2,"modules":{
            "db":{"image":"r.io/db:1","startupOrder":0},
            "api":{"image":"r.io/api:2","startupOrder":10},
            "ui":{"image":"r.io/ui:1","startupOrder":20}}}"#,
        );
        let mut new_api = staged(&v2, "api");
        new_api.name = "outpost.dev1.api.1".into();
        let observed = vec![
            container(&v2, "db", ContainerState::Running),
            container(&v1, "api", ContainerState::Running),
            container(&v2, "ui", ContainerState::Running),
            new_api,
        ];
        (v2, observed)
    }

    #[test]
    fn a_closed_window_holds_the_switch_but_not_staging() {
        let (v2, observed) = api_update_staged();
        let f = Fixture::new(&v2);
        let locked = BTreeSet::new();
        let mut world = f.world(Some(&v2), &observed);
        world.hold = Some(Hold {
            window_closed: true,
            locked: &locked,
            relinks: &locked,
        });
        let p = plan(&world);
        assert_eq!(p.held, Some(Held::Window));
        assert!(p.actions.is_empty(), "nothing switched: {:?}", p.actions);
        assert!(!p.staged && !p.converged);
        assert_eq!(p.modules["api"].status, ModuleStatus::Staged);
        assert_eq!(p.changing, BTreeSet::from(["api".to_string()]));

        // Not staged yet: the pull still goes ahead while the window is closed.
        let mut f = Fixture::new(&v2);
        f.images.remove("r.io/api:2");
        let running = &observed[..3];
        let mut world = f.world(Some(&v2), running);
        world.hold = Some(Hold {
            window_closed: true,
            locked: &locked,
            relinks: &locked,
        });
        let p = plan(&world);
        assert_eq!(p.held, Some(Held::Window));
        assert!(matches!(&p.actions[..], [Action::Pull { .. }]));
    }

    #[test]
    fn a_lock_holds_only_a_switch_that_changes_its_module() {
        let (v2, observed) = api_update_staged();
        let f = Fixture::new(&v2);
        let none = BTreeSet::new();
        let hold = |locked| Hold {
            window_closed: false,
            locked,
            relinks: &none,
        };
        // ui holds a lock, but v2 does not change ui: the switch goes ahead.
        let ui = BTreeSet::from(["ui".to_string()]);
        let mut world = f.world(Some(&v2), &observed);
        world.hold = Some(hold(&ui));
        let p = plan(&world);
        assert_eq!(p.held, None);
        assert!(matches!(&p.actions[..], [Action::Replace { module, .. }] if module == "api"));

        // api holds one: nothing is switched, and the plan says which lock.
        let api = BTreeSet::from(["api".to_string()]);
        world.hold = Some(hold(&api));
        let p = plan(&world);
        assert_eq!(p.held, Some(Held::Locks(vec!["api".into()])));
        assert!(p.actions.is_empty());

        // A module leaving the deployment is protected by its lock too.
        let v3 = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":3,"modules":{
            "db":{"image":"r.io/db:1","startupOrder":0},
            "api":{"image":"r.io/api:1","startupOrder":10}}}"#,
        );
        let v1 = three();
        let running = [
            container(&v1, "db", ContainerState::Running),
            container(&v1, "api", ContainerState::Running),
            container(&v1, "ui", ContainerState::Running),
        ];
        let f = Fixture::new(&v3);
        let mut world = f.world(Some(&v3), &running);
        world.hold = Some(hold(&ui));
        let p = plan(&world);
        assert_eq!(p.held, Some(Held::Locks(vec!["ui".into()])));
        assert!(p.actions.is_empty());
        // Without the hold (a switch under way, a rollback), ui is removed.
        world.hold = None;
        assert!(
            matches!(&plan(&world).actions[..], [Action::Remove { module, .. }] if module == "ui")
        );
    }

    #[test]
    fn nothing_holds_a_deployment_that_changes_nothing_or_a_device_running_nothing() {
        let d = three();
        let f = Fixture::new(&d);
        let locked = BTreeSet::from(["api".to_string()]);
        let none = BTreeSet::new();
        let closed = Some(Hold {
            window_closed: true,
            locked: &locked,
            relinks: &none,
        });
        // Already in force: converged, whatever the window.
        let all_up = [
            container(&d, "db", ContainerState::Running),
            container(&d, "api", ContainerState::Running),
            container(&d, "ui", ContainerState::Running),
        ];
        let mut world = f.world(Some(&d), &all_up);
        world.hold = closed;
        let p = plan(&world);
        assert!(p.converged && p.held.is_none());
        // A device running nothing of its own: the first deployment starts at once.
        let mut world = f.world(Some(&d), &[]);
        world.hold = closed;
        let p = plan(&world);
        assert!(p.held.is_none());
        assert!(
            p.actions
                .iter()
                .any(|a| matches!(a, Action::Create { start: true, .. }))
        );
    }

    #[test]
    fn a_new_model_alone_waits_for_the_window_and_for_its_modules_lock() {
        // Every container matches the deployment; only api's artifact links would change.
        let d = three();
        let f = Fixture::new(&d);
        let all_up = [
            container(&d, "db", ContainerState::Running),
            container(&d, "api", ContainerState::Running),
            container(&d, "ui", ContainerState::Running),
        ];
        let none = BTreeSet::new();
        let api = BTreeSet::from(["api".to_string()]);
        let ui = BTreeSet::from(["ui".to_string()]);
        let judge = |window_closed, locked, relinks| {
            let mut world = f.world(Some(&d), &all_up);
            world.hold = Some(Hold {
                window_closed,
                locked,
                relinks,
            });
            plan(&world)
        };
        // Outside the window: held, and not staged, so the links are not swapped.
        let p = judge(true, &none, &api);
        assert_eq!(p.held, Some(Held::Window));
        assert!(!p.staged && !p.converged);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        // api's lock holds it; ui's does not.
        let p = judge(false, &api, &api);
        assert_eq!(p.held, Some(Held::Locks(vec!["api".into()])));
        let p = judge(false, &ui, &api);
        assert!(p.held.is_none() && p.staged && p.converged);
        // Nothing to swap: nothing to hold.
        let p = judge(true, &api, &none);
        assert!(p.held.is_none() && p.converged);
    }

    #[test]
    fn a_failed_pull_leaves_the_running_module_alone_and_fails_the_deployment() {
        let v1 = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"app":{"image":"r.io/app:1"}}}"#,
        );
        let v2 = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":2,"modules":{"app":{"image":"r.io/app:missing"}}}"#,
        );
        let mut f = Fixture::new(&v2);
        f.images.clear();
        f.pull_failures.insert(
            "r.io/app:missing".into(),
            Failure {
                attempts: 2,
                at: NOW - 1_000,
                message: "pull of r.io/app:missing failed: 404 manifest unknown".into(),
                definitive: true,
            },
        );
        let running = [container(&v1, "app", ContainerState::Running)];
        let p = plan(&f.world(Some(&v2), &running));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.wake_at, Some(NOW - 1_000 + 4_000));
        let app = &p.modules["app"];
        assert_eq!(app.status, ModuleStatus::Failed);
        assert!(app.definitive);
        assert!(app.problem.as_deref().unwrap().contains("404"));
    }

    #[test]
    fn a_new_artifact_digest_holds_the_deployment_without_touching_the_container() {
        // The model's digest changed, not its name: the container still matches its hash.
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":2,
            "artifacts":{"model":{"url":"file:///m","sha256":"00","size":1}},
            "modules":{"app":{"image":"r.io/app:1","artifacts":["model"]}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.artifacts.insert(
            "app".into(),
            ArtifactWait::Fetching {
                problem: Some("connection reset; retrying".into()),
            },
        );
        let running = [container(&d, "app", ContainerState::Running)];
        let p = plan(&f.world(Some(&d), &running));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert!(
            !p.staged && !p.converged,
            "not applied before the model is in"
        );
        assert_eq!(p.modules["app"].status, ModuleStatus::Pulling);
        assert_eq!(
            p.modules["app"].problem.as_deref(),
            Some("connection reset; retrying")
        );

        // A wrong digest fails the module at once, and still nothing is touched.
        f.artifacts.insert(
            "app".into(),
            ArtifactWait::Failed {
                message: "artifact `model`: the file's SHA-256 is ab…".into(),
                definitive: true,
            },
        );
        let p = plan(&f.world(Some(&d), &running));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.modules["app"].status, ModuleStatus::Failed);
        assert!(p.modules["app"].definitive);

        // Fetched: converged as it is, the same container.
        f.artifacts.clear();
        let p = plan(&f.world(Some(&d), &running));
        assert!(p.actions.is_empty() && p.staged && p.converged);
    }

    #[test]
    fn a_new_module_is_not_created_before_its_artifacts() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,
            "artifacts":{"model":{"url":"file:///m","sha256":"00","size":1}},
            "modules":{"app":{"image":"r.io/app:1","artifacts":["model"]},
                       "other":{"image":"r.io/other:1"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.artifacts
            .insert("app".into(), ArtifactWait::Fetching { problem: None });
        let p = plan(&f.world(Some(&d), &[]));
        assert!(p.actions.is_empty(), "nothing is created: {:?}", p.actions);
        assert_eq!(p.modules["app"].status, ModuleStatus::Pulling);
        f.artifacts.clear();
        let p = plan(&f.world(Some(&d), &[]));
        assert_eq!(
            p.actions,
            [
                create_started("app", "outpost.dev1.app"),
                create_started("other", "outpost.dev1.other")
            ]
        );
    }

    #[test]
    fn nothing_switches_until_every_image_of_the_deployment_is_ready() {
        let v1 = three();
        let v2 = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":2,"modules":{
            "db":{"image":"r.io/db:2","startupOrder":0},
            "api":{"image":"r.io/api:2","startupOrder":10}}}"#,
        );
        let mut f = Fixture::new(&v2);
        f.images.remove("r.io/api:2");
        let running = [
            container(&v1, "db", ContainerState::Running),
            container(&v1, "api", ContainerState::Running),
            container(&v1, "ui", ContainerState::Running),
        ];
        let p = plan(&f.world(Some(&v2), &running));
        // db's image is there, api's is not: no create, no removal of ui, only the pull.
        assert_eq!(
            p.actions,
            [Action::Pull {
                module: "api".into(),
                image: "r.io/api:2".into()
            }]
        );
    }

    #[test]
    fn leaving_modules_go_first_highest_group_first_then_the_switch() {
        let v1 = three();
        let v2 = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":2,"modules":{
            "db":{"image":"r.io/db:1","startupOrder":0,"status":"stopped"}}}"#,
        );
        let f = Fixture::new(&v2);
        let observed = [
            container(&v1, "db", ContainerState::Running),
            container(&v1, "api", ContainerState::Running),
            container(&v1, "ui", ContainerState::Running),
        ];
        let p = plan(&f.world(Some(&v2), &observed));
        assert_eq!(
            p.actions,
            [Action::Remove {
                id: "id-ui".into(),
                module: "ui".into()
            }]
        );
        let p = plan(&f.world(Some(&v2), &observed[..2]));
        assert_eq!(
            p.actions,
            [Action::Remove {
                id: "id-api".into(),
                module: "api".into()
            }]
        );
        // While a removal is under way, nothing else of the switch starts.
        let mut busy = Fixture::new(&v2);
        busy.busy.insert("api".into());
        assert!(
            plan(&busy.world(Some(&v2), &observed[..2]))
                .actions
                .is_empty()
        );
        // db's config is unchanged (only its status): it is stopped, not recreated.
        let mut db = container(&v1, "db", ContainerState::Running);
        db.config_hash = v2.hashes["db"].clone();
        let p = plan(&f.world(Some(&v2), &[db]));
        assert_eq!(
            p.actions,
            [Action::Stop {
                id: "id-db".into(),
                module: "db".into()
            }]
        );
    }

    #[test]
    fn foreign_containers_are_invisible() {
        let d = three();
        let f = Fixture::new(&d);
        let mut other = container(&d, "db", ContainerState::Exited);
        other
            .labels
            .insert(labels::DEVICE.into(), "someone-else".into());
        let mut unlabelled = container(&d, "x", ContainerState::Running);
        unlabelled.labels.clear();
        let observed = [other, unlabelled];
        assert!(plan(&f.world(None, &observed)).actions.is_empty());
        assert!(plan(&f.world(None, &observed)).modules.is_empty());
    }

    #[test]
    fn without_a_deployment_everything_found_is_kept_and_unmanaged() {
        let d = three();
        let mut f = Fixture::new(&d);
        let mut crashed = exited(&d, "api", 3, 5);
        crashed.id = "id-api".into();
        f.exit("id-api", 0);
        let observed = [
            container(&d, "db", ContainerState::Running),
            crashed,
            container(&d, "ui", ContainerState::Running),
        ];
        let p = plan(&f.world(None, &observed));
        assert_eq!(
            p.actions,
            [Action::Start {
                id: "id-api".into(),
                module: "api".into(),
                restart: true
            }],
            "kept alive by the policy in its labels, never removed"
        );
        assert!(
            p.modules
                .values()
                .all(|m| m.status == ModuleStatus::Unmanaged)
        );
        assert_eq!(p.modules.len(), 3);
    }

    #[test]
    fn a_crash_is_restarted_after_its_backoff_and_never_given_up() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.exit("id-a", 0);
        let observed = [exited(&d, "a", 1, 2)];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(
            p.actions,
            [Action::Start {
                id: "id-a".into(),
                module: "a".into(),
                restart: true
            }]
        );
        // After 3 short runs: 4 s backoff from when the agent saw the exit.
        f.history.insert(
            "a".into(),
            ModuleHistory {
                failures: 3,
                restarts: 3,
            },
        );
        f.exit("id-a", 1_000);
        let p = plan(&f.world(Some(&d), &observed));
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(NOW - 1_000 + 4_000));
        assert_eq!(p.modules["a"].status, ModuleStatus::Backoff);
        // Crash-looping for hours: still retried at the cap, and reported.
        f.history.insert(
            "a".into(),
            ModuleHistory {
                failures: 500,
                restarts: 500,
            },
        );
        f.exit("id-a", BACKOFF_CAP_MS);
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(p.actions.len(), 1);
        assert!(
            p.modules["a"]
                .problem
                .as_deref()
                .unwrap()
                .contains("crash-looping")
        );
    }

    #[test]
    fn backoff_ignores_the_engines_wall_clock() {
        // The device booted at 1970: the exit the engine recorded before the reboot reads 2026,
        // decades "in the future". Only when the agent saw the exit counts.
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.history.insert(
            "a".into(),
            ModuleHistory {
                failures: 2,
                restarts: 2,
            },
        );
        let mut c = exited(&d, "a", 1, 2);
        c.finished_at = Some(u64::MAX / 2_000);
        c.started_at = c.finished_at.map(|t| t - 2);
        f.exit("id-a", 2_500);
        let observed = [c];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(p.actions.len(), 1, "2 s backoff passed 0.5 s ago");
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.history.insert(
            "a".into(),
            ModuleHistory {
                failures: 8,
                restarts: 8,
            },
        );
        f.exit("id-a", 0);
        let observed = [exited(&d, "a", 1, 3_600)];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(p.actions.len(), 1, "a run of an hour restarts at once");
    }

    #[test]
    fn restart_policies() {
        for (policy, code, restarts) in [
            ("always", 0, true),
            ("always", 3, true),
            ("on-failure", 0, false),
            ("on-failure", 3, true),
            ("on-unhealthy", 3, true),
            ("never", 3, false),
            ("never", 0, false),
        ] {
            let d = desired(&format!(
                r#"{{"schemaVersion":"1.0","id":"d","version":1,"modules":{{"a":{{"image":"r.io/a:1","restartPolicy":"{policy}"}}}}}}"#
            ));
            let mut f = Fixture::new(&d);
            f.exit("id-a", 0);
            let observed = [exited(&d, "a", code, 2)];
            let p = plan(&f.world(Some(&d), &observed));
            assert_eq!(!p.actions.is_empty(), restarts, "{policy} exit {code}");
            if !restarts {
                assert_eq!(p.modules["a"].status, ModuleStatus::Exited);
            }
        }
    }

    #[test]
    fn after_a_reboot_containers_come_back_in_startup_order_uncounted() {
        let d = three();
        let mut f = Fixture::new(&d);
        let observed: Vec<Observed> = ["db", "api", "ui"]
            .iter()
            .map(|m| exited(&d, m, 0, 500))
            .collect();
        for m in ["db", "api", "ui"] {
            f.exits.insert(
                format!("id-{m}"),
                Exit {
                    finished_at: Some(WALL),
                    seen_at: NOW,
                    before_agent: true,
                },
            );
        }
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(
            p.actions,
            [Action::Start {
                id: "id-db".into(),
                module: "db".into(),
                restart: false
            }],
            "later groups wait; nothing is counted as a restart"
        );
        let mut next = observed.clone();
        next[0] = container(&d, "db", ContainerState::Running);
        let p = plan(&f.world(Some(&d), &next));
        assert_eq!(
            p.actions,
            [Action::Start {
                id: "id-api".into(),
                module: "api".into(),
                restart: false
            }]
        );
    }

    #[test]
    fn a_start_that_fails_backs_off_and_says_why() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.start_failures.insert(
            "a".into(),
            Failure {
                attempts: 4,
                at: NOW - 1_000,
                message: "500 port is already allocated".into(),
                definitive: true,
            },
        );
        let observed = [container(&d, "a", ContainerState::Created)];
        let p = plan(&f.world(Some(&d), &observed));
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(NOW - 1_000 + 8_000));
        let a = &p.modules["a"];
        assert_eq!(a.status, ModuleStatus::Failed);
        let problem = a.problem.as_deref().unwrap();
        assert!(
            problem.contains("start-failing") && problem.contains("port is already allocated"),
            "{problem}"
        );
        f.start_failures.get_mut("a").unwrap().at = NOW - 8_000;
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(p.actions.len(), 1, "retried once the backoff passed");
        assert_eq!(
            p.modules["a"].status,
            ModuleStatus::Failed,
            "still reported"
        );
    }

    #[test]
    fn unhealthy_restarts_only_under_on_unhealthy() {
        for (policy, restarts) in [("on-unhealthy", true), ("always", false)] {
            let d = desired(&format!(
                r#"{{"schemaVersion":"1.0","id":"d","version":1,"modules":{{"a":{{"image":"r.io/a:1","restartPolicy":"{policy}"}}}}}}"#
            ));
            let f = Fixture::new(&d);
            let mut c = container(&d, "a", ContainerState::Running);
            c.health = Health::Unhealthy;
            let observed = [c];
            let p = plan(&f.world(Some(&d), &observed));
            assert_eq!(
                p.actions
                    .iter()
                    .any(|a| matches!(a, Action::Restart { .. })),
                restarts,
                "{policy}"
            );
            assert!(!p.converged);
        }
    }

    #[test]
    fn pulls_never_hold_back_other_restarts() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{
            "a":{"image":"r.io/a:1"},"b":{"image":"r.io/b:2"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.images.remove("r.io/b:2");
        f.exit("id-a", 0);
        let observed = [exited(&d, "a", 1, 2)];
        let p = plan(&f.world(Some(&d), &observed));
        assert!(p.actions.contains(&Action::Pull {
            module: "b".into(),
            image: "r.io/b:2".into()
        }));
        assert!(p.actions.contains(&Action::Start {
            id: "id-a".into(),
            module: "a".into(),
            restart: true
        }));
        // While b's pull runs, a's restart is still planned and b shows as pulling.
        let pulling: BTreeSet<String> = ["r.io/b:2".to_string()].into();
        let mut w = f.world(Some(&d), &observed);
        w.pulling = &pulling;
        let p = plan(&w);
        assert_eq!(p.actions.len(), 1);
        assert_eq!(p.modules["b"].status, ModuleStatus::Pulling);
    }

    #[test]
    fn pull_policy_never_reports_a_missing_image() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1","imagePullPolicy":"never"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.images.clear();
        let p = plan(&f.world(Some(&d), &[]));
        assert!(p.actions.is_empty());
        assert_eq!(p.modules["a"].status, ModuleStatus::Failed);
        assert!(p.modules["a"].definitive);
    }

    #[test]
    fn an_interrupted_switch_is_finished() {
        // The agent died after starting the staged container and before removing the old one
        // and renaming: the switch completes, and the module gets its name back.
        let v1 = three();
        let v2 = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":2,"modules":{"db":{"image":"r.io/db:2"}}}"#,
        );
        let f = Fixture::new(&v2);
        let old = exited(&v1, "db", 0, 100);
        let mut new = container(&v2, "db", ContainerState::Running);
        new.id = "new-db".into();
        new.name = "outpost.dev1.db.1".into();
        let p = plan(&f.world(Some(&v2), &[old.clone(), new.clone()]));
        assert_eq!(
            p.actions,
            [Action::Replace {
                module: "db".into(),
                old: vec!["id-db".into()],
                new: "new-db".into(),
                name: "outpost.dev1.db".into()
            }]
        );
        let p = plan(&f.world(Some(&v2), &[new]));
        assert_eq!(
            p.actions,
            [Action::Rename {
                id: "new-db".into(),
                module: "db".into(),
                name: "outpost.dev1.db".into()
            }]
        );
    }

    // ----- simulation -----

    /// A simulated engine: carries out actions the way Docker would.
    struct Engine {
        containers: Vec<Observed>,
        images: BTreeSet<String>,
        exits: BTreeMap<String, Exit>,
        next_id: u32,
        touched_foreign: bool,
    }

    impl Engine {
        fn position(&mut self, id: &str) -> usize {
            let Some(i) = self.containers.iter().position(|c| c.id == id) else {
                panic!("unknown container {id}")
            };
            if self.containers[i]
                .labels
                .get(labels::DEVICE)
                .map(String::as_str)
                != Some(DEV)
            {
                self.touched_foreign = true;
            }
            i
        }

        fn run(&mut self, id: &str, now: u64) {
            let i = self.position(id);
            let c = &mut self.containers[i];
            c.state = ContainerState::Running;
            c.health = Health::None;
            c.started_at = Some(WALL + now / 1000);
            self.exits.remove(id);
        }

        fn stop(&mut self, id: &str, now: u64) {
            let i = self.position(id);
            let c = &mut self.containers[i];
            if is_up(c) {
                c.state = ContainerState::Exited;
                c.exit_code = Some(0);
                c.finished_at = Some(WALL + now / 1000);
            }
        }

        fn name_free(&self, name: &str) -> bool {
            !self.containers.iter().any(|c| c.name == name)
        }

        fn apply(&mut self, d: &Desired, action: &Action, now: u64) {
            match action {
                Action::Remove { id, .. } => {
                    let i = self.position(id);
                    self.containers.remove(i);
                }
                Action::Stop { id, .. } => self.stop(id, now),
                Action::Start { id, .. } | Action::Restart { id, .. } => self.run(id, now),
                Action::Pull { image, .. } => {
                    self.images.insert(image.clone());
                }
                Action::Create {
                    module,
                    name,
                    start,
                } => {
                    assert!(self.name_free(name), "name conflict creating {name}");
                    self.next_id += 1;
                    let mut c = container(d, module, ContainerState::Created);
                    c.id = format!("new-{}", self.next_id);
                    c.name = name.clone();
                    c.started_at = None;
                    let id = c.id.clone();
                    self.containers.push(c);
                    if *start {
                        self.run(&id, now);
                    }
                }
                Action::Replace { old, new, name, .. } => {
                    for o in old {
                        self.stop(o, now);
                        let i = self.position(o);
                        self.containers.remove(i);
                    }
                    self.run(new, now);
                    if self.name_free(name) {
                        let i = self.position(new);
                        self.containers[i].name = name.clone();
                    }
                }
                Action::Rename { id, name, .. } => {
                    assert!(self.name_free(name), "rename onto a taken name {name}");
                    let i = self.position(id);
                    self.containers[i].name = name.clone();
                }
            }
        }

        /// What the reconciler does before each pass: note exits it has not seen yet.
        fn see_exits(&mut self, now: u64, first: bool) {
            for c in &self.containers {
                if is_exited(c) && !self.exits.contains_key(&c.id) {
                    self.exits.insert(
                        c.id.clone(),
                        Exit {
                            finished_at: c.finished_at,
                            seen_at: now,
                            before_agent: first,
                        },
                    );
                }
            }
        }
    }

    fn arb_state() -> impl Strategy<Value = (ContainerState, Option<i64>, Health)> {
        prop_oneof![
            Just((ContainerState::Running, None, Health::None)),
            Just((ContainerState::Running, None, Health::Unhealthy)),
            Just((ContainerState::Created, None, Health::None)),
            (0i64..3).prop_map(|c| (ContainerState::Exited, Some(c), Health::None)),
            Just((ContainerState::Dead, Some(137), Health::None)),
        ]
    }

    fn arb_world() -> impl Strategy<Value = (Option<Desired>, Vec<Observed>, BTreeSet<String>)> {
        let module = (
            0u32..3,
            prop_oneof![
                Just("always"),
                Just("on-failure"),
                Just("on-unhealthy"),
                Just("never")
            ],
            prop_oneof![Just("running"), Just("stopped")],
            0u8..2,
        );
        (
            proptest::collection::btree_map("[a-e]", module, 0..5),
            proptest::collection::vec(("[a-g]", arb_state(), any::<bool>(), any::<bool>(), any::<bool>()), 0..8),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(modules, containers, images_present, no_deployment)| {
                let body: Vec<String> = modules
                    .iter()
                    .map(|(n, (order, policy, status, tag))| {
                        format!(
                            r#""{n}":{{"image":"r.io/{n}:{tag}","startupOrder":{order},"restartPolicy":"{policy}","status":"{status}"}}"#
                        )
                    })
                    .collect();
                let d = desired(&format!(
                    r#"{{"schemaVersion":"1.0","id":"d","version":1,"modules":{{{}}}}}"#,
                    body.join(",")
                ));
                let observed = containers
                    .into_iter()
                    .enumerate()
                    .map(|(i, (module, (state, code, health), stale, foreign, canonical))| {
                        let mut c = container(&d, &module, state);
                        c.id = format!("c{i}");
                        if !canonical {
                            c.name = format!("outpost.{DEV}.{module}.x{i}");
                        } else {
                            c.name = format!("outpost.{DEV}.{module}.{i}");
                        }
                        c.exit_code = code;
                        c.health = health;
                        if code.is_some() {
                            c.finished_at = Some(WALL - 7_200);
                            c.started_at = Some(WALL - 7_201);
                        }
                        if stale {
                            c.config_hash = "stale".into();
                        }
                        if foreign {
                            c.labels.insert(labels::DEVICE.into(), "other".into());
                        }
                        c
                    })
                    .collect();
                let images = if images_present {
                    d.deployment.modules.values().map(|m| m.image.clone()).collect()
                } else {
                    BTreeSet::new()
                };
                ((!no_deployment).then_some(d), observed, images)
            })
    }

    proptest! {
        /// Applying plans to a simulated engine converges to the desired state within a bounded
        /// number of passes, never touches another device's container, never creates a
        /// container whose name is taken, and without a deployment removes nothing.
        #[test]
        fn plans_converge_on_a_simulated_engine((d, observed, images) in arb_world()) {
            let ours_before = observed.iter().filter(|c| c.labels.get(labels::DEVICE).map(String::as_str) == Some(DEV)).count();
            let mut engine = Engine { containers: observed, images, exits: BTreeMap::new(), next_id: 0, touched_foreign: false };
            // The simulated containers all started fine: exits under `never`/`on-failure` stay.
            let history = BTreeMap::new();
            let (none, failures, start_failures, busy) = (BTreeSet::new(), BTreeMap::new(), BTreeMap::new(), BTreeSet::new());
            let mut now = NOW;
            let mut converged = false;
            for pass in 0..60 {
                engine.see_exits(now, pass == 0);
                let world = World {
                    device: DEV, desired: d.as_ref(), observed: &engine.containers, images: &engine.images,
                    pulling: &none, pulled: &none, pull_failures: &failures, artifacts: &BTreeMap::new(),
                    start_failures: &start_failures, history: &history, exits: &engine.exits, busy: &busy, now, hold: None,
                };
                let p = plan(&world);
                if p.actions.is_empty() && p.wake_at.is_none() {
                    converged = true;
                    break;
                }
                let d = d.clone().unwrap_or_else(three);
                for a in &p.actions {
                    engine.apply(&d, a, now);
                }
                now = p.wake_at.map_or(now + 1_000, |w| w.max(now + 1_000));
            }
            prop_assert!(converged, "no convergence: {:?}", engine.containers);
            prop_assert!(!engine.touched_foreign);
            let ours: Vec<&Observed> = engine.containers.iter().filter(|c| c.labels.get(labels::DEVICE).map(String::as_str) == Some(DEV)).collect();
            let Some(d) = d else {
                prop_assert_eq!(ours.len(), ours_before, "without a deployment nothing is removed");
                return Ok(());
            };
            for (name, m) in &d.deployment.modules {
                let mine: Vec<_> = ours.iter().filter(|c| &c.module == name).collect();
                prop_assert!(mine.len() <= 1, "duplicates of {}", name);
                if let Some(c) = mine.first() {
                    prop_assert_eq!(&c.config_hash, &d.hashes[name]);
                    let canonical = container_name(DEV, name);
                    let held_by_foreign = engine.containers.iter().any(|o| o.name == canonical && o.module != *name);
                    prop_assert!(c.name == canonical || held_by_foreign, "{} is named {}", name, c.name);
                }
                if m.status == DesiredStatus::Running && m.restart_policy == RestartPolicy::Always {
                    prop_assert!(mine.first().is_some_and(|c| c.state == ContainerState::Running), "{} is not running", name);
                }
                if m.status == DesiredStatus::Stopped {
                    prop_assert!(mine.first().is_none_or(|c| !is_up(c)));
                }
            }
            prop_assert!(ours.iter().all(|c| d.deployment.modules.contains_key(&c.module)), "leftover containers");
        }
    }
}
