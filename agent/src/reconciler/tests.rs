//! The reconciler's own tests: the real reconciler and a real store (redb in a temporary
//! folder) over the in-memory fake engine ([`FakeRuntime`]) and fake clocks, with tokio's time
//! paused so that minutes of backoff and rollback windows pass in milliseconds. What the fake
//! engine cannot prove (Docker's own behaviour) the end-to-end tests prove on the real one.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::FakeClock;
use crate::control::AgentHandle;
use crate::manifest::Issue;
use crate::runtime::ContainerState;
use crate::runtime::fake::{Behaviour, FakeRuntime};
use crate::signing::TrustedKeys;
use crate::state::{DeploymentStatus, ModuleStatus, Source};

const DEV: &str = "dev1";
/// 2026-11-28, in Unix ms.
const NOW_2026: u64 = 1_795_900_000_000;
const YEARS_56_MS: u64 = 56 * 365 * 24 * 3600 * 1000;

struct Agent {
    handle: AgentHandle,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Starts a reconciler over the store in `dir` and the fake engine.
    fn start(dir: &std::path::Path, clock: &FakeClock, fake: &FakeRuntime) -> Agent {
        Agent::start_with(dir, clock, fake, |_| {})
    }

    fn start_with(
        dir: &std::path::Path,
        clock: &FakeClock,
        fake: &FakeRuntime,
        tweak: impl FnOnce(&mut Settings),
    ) -> Agent {
        let mut settings = Settings::new(DEV, Arc::new(clock.clone()));
        tweak(&mut settings);
        let (store, _) = Store::open(dir, 0).expect("store opens");
        let parts = Reconciler::build(settings, Arc::new(fake.clone()), store).expect("builds");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(parts.reconciler.run(parts.requests, shutdown.clone()));
        Agent {
            handle: parts.handle,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    async fn offer(&self, json: &str) -> Result<(), Vec<Issue>> {
        self.offer_from(json, Source::Device).await
    }

    async fn offer_from(&self, json: &str, source: Source) -> Result<(), Vec<Issue>> {
        let accepted =
            crate::intake::intake(json.as_bytes(), &TrustedKeys::default()).expect("valid");
        self.handle.offer(accepted, source).await.expect("running")
    }

    /// Waits (in paused time: as long as it takes, up to `within`) for the state to match.
    async fn until(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&ReportedState) -> bool,
    ) -> ReportedState {
        let mut rx: watch::Receiver<ReportedState> = self.handle.state.clone();
        let wait = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return s.clone();
                    }
                }
                if rx.changed().await.is_err() {
                    panic!("the reconciler stopped while waiting for {what}");
                }
            }
        };
        match tokio::time::timeout(within, wait).await {
            Ok(s) => s,
            Err(_) => panic!(
                "timed out after {within:?} waiting for {what}; state: {:#?}",
                self.handle.state.borrow()
            ),
        }
    }
}

fn manifest(version: u64, modules: &str) -> String {
    format!(r#"{{"schemaVersion":"1.0","id":"d","version":{version},"modules":{{{modules}}}}}"#)
}

fn with_rollback(version: u64, modules: &str, secs: u64) -> String {
    format!(
        r#"{{"schemaVersion":"1.0","id":"d","version":{version},"modules":{{{modules}}},"rollback":{{"onFailure":true,"healthyWithinSecs":{secs}}}}}"#
    )
}

fn status(s: &ReportedState) -> Option<DeploymentStatus> {
    s.deployment.as_ref().map(|d| d.status)
}

fn applied(version: u64) -> impl Fn(&ReportedState) -> bool {
    move |s| {
        s.deployment
            .as_ref()
            .is_some_and(|d| d.version == version && d.status == DeploymentStatus::Applied)
    }
}

fn ids(fake: &FakeRuntime) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = fake
        .containers()
        .into_iter()
        .map(|c| (c.module, c.id))
        .collect();
    v.sort();
    v
}

fn setup() -> (tempfile::TempDir, FakeClock, FakeRuntime) {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = FakeClock::new(NOW_2026, 3_600_000);
    let fake = FakeRuntime::new(Arc::new(clock.clone()));
    (dir, clock, fake)
}

#[tokio::test(start_paused = true)]
async fn one_version_floor_for_the_device_and_control_handed_back_only_as_allowed() {
    let (dir, clock, fake) = setup();
    for i in ["r.io/a:1", "r.io/a:2", "r.io/a:3"] {
        fake.publish_image(i);
    }
    let agent = Agent::start(dir.path(), &clock, &fake);
    let group = Source::Group {
        name: "line3".into(),
    };
    let g1 = manifest(1, r#""a":{"image":"r.io/a:1"}"#);
    agent.offer_from(&g1, group.clone()).await.unwrap();
    agent.until("group v1 applied", MINUTE, applied(1)).await;
    // The same bytes again: a redelivery, taken without a change.
    agent.offer_from(&g1, group.clone()).await.unwrap();
    // Other bytes under a version not above the floor: refused, nothing changes.
    let stale = manifest(1, r#""a":{"image":"r.io/a:2"}"#);
    let issues = agent.offer_from(&stale, group.clone()).await.unwrap_err();
    assert_eq!(issues[0].path, "/version", "{issues:?}");
    let state = agent.handle.state.borrow().clone();
    assert_eq!(state.last_rejected.as_ref().map(|r| r.version), Some(1));
    // One floor for the device: the device's own v1 is refused too, v2 applies.
    let d1 = manifest(1, r#""a":{"image":"r.io/a:2"}"#);
    let issues = agent.offer(&d1).await.unwrap_err();
    assert!(
        issues[0]
            .message
            .contains("highest this device has accepted"),
        "{issues:?}"
    );
    let d2 = manifest(2, r#""a":{"image":"r.io/a:2"}"#);
    agent.offer(&d2).await.unwrap();
    agent.until("device v2 applied", MINUTE, applied(2)).await;
    // Hand-back (no keys: a lab): the device's deployment is cleared, the group's same bytes
    // apply again although v1 is below the floor.
    agent.offer_from(&g1, group.clone()).await.unwrap();
    let s = agent
        .until("group v1 back in force", MINUTE, |s| {
            s.modules.get("a").is_some_and(|m| m.image == "r.io/a:1") && applied(1)(s)
        })
        .await;
    assert_eq!(
        s.deployment.as_ref().map(|d| d.source.clone()),
        Some(group.clone())
    );
    // A local deployment is never overridden by a hand-back.
    let l3 = manifest(3, r#""a":{"image":"r.io/a:3"}"#);
    agent.offer_from(&l3, Source::Local).await.unwrap();
    agent.until("local v3 applied", MINUTE, applied(3)).await;
    let issues = agent.offer_from(&g1, group).await.unwrap_err();
    assert_eq!(issues[0].path, "/version");
    agent.stop().await;
}

/// A far-off expiry, as `outpost-ctl deploy` sets.
fn bound(version: u64, target: &str, modules: &str) -> String {
    format!(
        r#"{{"schemaVersion":"1.0","id":"d","version":{version},"target":{target},"expiresAt":"2099-01-01T00:00:00Z","modules":{{{modules}}}}}"#
    )
}

#[tokio::test(start_paused = true)]
async fn with_keys_deployments_are_bound_to_their_device_and_time() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let agent = Agent::start_with(dir.path(), &clock, &fake, |s| {
        s.policy.trusted_keys = TrustedKeys::new([key.verifying_key()]);
        s.policy.allow_image_tags = true;
    });
    let a = r#""a":{"image":"r.io/a:1"}"#;
    // Signed for another device (a replay onto this device's topic).
    let other = bound(1, r#"{"device":"cam-9"}"#, a);
    let issues = agent.offer(&other).await.unwrap_err();
    assert_eq!(issues[0].path, "/target/device", "{issues:?}");
    // A group's envelope replayed as this device's own.
    let group = bound(1, r#"{"group":"line3"}"#, a);
    let issues = agent.offer(&group).await.unwrap_err();
    assert_eq!(issues[0].path, "/target/group", "{issues:?}");
    // No target, no expiry: refused on a device that trusts keys.
    let issues = agent.offer(&manifest(1, a)).await.unwrap_err();
    let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
    assert!(
        paths.contains(&"/target") && paths.contains(&"/expiresAt"),
        "{issues:?}"
    );
    // Expired an hour ago.
    let expired = format!(
        r#"{{"schemaVersion":"1.0","id":"d","version":1,"target":{{"device":"dev1"}},"expiresAt":"{}","modules":{{{a}}}}}"#,
        crate::clock::format_rfc3339(NOW_2026 / 1000 - 3600)
    );
    let issues = agent.offer(&expired).await.unwrap_err();
    assert_eq!(issues[0].path, "/expiresAt", "{issues:?}");
    assert!(issues[0].message.contains("expired at"));
    // The device's own, in time: applied.
    agent
        .offer(&bound(1, r#"{"device":"dev1"}"#, a))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn with_keys_control_goes_back_to_an_older_group_only_after_a_signed_withdrawal() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    fake.publish_image("r.io/a:2");
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let agent = Agent::start_with(dir.path(), &clock, &fake, |s| {
        s.policy.trusted_keys = TrustedKeys::new([key.verifying_key()]);
        s.policy.allow_image_tags = true;
    });
    let group = Source::Group {
        name: "line3".into(),
    };
    let g1 = bound(1, r#"{"group":"line3"}"#, r#""a":{"image":"r.io/a:1"}"#);
    agent.offer_from(&g1, group.clone()).await.unwrap();
    agent.until("group v1 applied", MINUTE, applied(1)).await;
    let d10 = bound(10, r#"{"device":"dev1"}"#, r#""a":{"image":"r.io/a:2"}"#);
    agent.offer(&d10).await.unwrap();
    agent.until("device v10 applied", MINUTE, applied(10)).await;
    // The attack: the old group deployment offered again as if the device's own had been
    // withdrawn (an unsigned empty retained message): refused, the device stays on v10.
    let issues = agent.offer_from(&g1, group.clone()).await.unwrap_err();
    assert_eq!(issues[0].path, "/version", "{issues:?}");
    assert_eq!(
        agent
            .handle
            .state
            .borrow()
            .deployment
            .as_ref()
            .map(|d| d.version),
        Some(10)
    );
    // After a signed withdrawal (the hub link checked it), control goes back.
    let accepted = crate::intake::intake(g1.as_bytes(), &TrustedKeys::default()).unwrap();
    agent
        .handle
        .offer_after_withdrawal(accepted, group.clone())
        .await
        .unwrap()
        .unwrap();
    agent
        .until("group v1 back in force", MINUTE, |s| {
            applied(1)(s) && s.modules.get("a").is_some_and(|m| m.image == "r.io/a:1")
        })
        .await;
    agent.stop().await;
}

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn an_update_keeps_the_module_serving_until_the_switch() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    fake.publish_image("r.io/a:2");
    fake.slow_pull("r.io/a:2", Duration::from_secs(120));
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(1, r#""a":{"image":"r.io/a:1"}"#))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    let v1 = ids(&fake);
    agent
        .offer(&manifest(2, r#""a":{"image":"r.io/a:2"}"#))
        .await
        .unwrap();
    let s = agent
        .until("the pull under way", MINUTE, |s| {
            s.modules
                .get("a")
                .is_some_and(|m| m.status == ModuleStatus::Pulling)
        })
        .await;
    assert_eq!(status(&s), Some(DeploymentStatus::Applying));
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert_eq!(
        ids(&fake),
        v1,
        "the old container was touched during the pull"
    );
    assert!(
        fake.containers()
            .iter()
            .all(|c| c.state == ContainerState::Running)
    );
    agent.until("v2 applied", MINUTE, applied(2)).await;
    let calls = fake.calls();
    let tail: Vec<&str> = calls.iter().map(String::as_str).rev().take(5).collect();
    assert_eq!(
        tail.into_iter().rev().collect::<Vec<_>>(),
        [
            "create outpost.dev1.a.1",
            "stop outpost.dev1.a",
            "start outpost.dev1.a.1",
            "remove outpost.dev1.a",
            "rename outpost.dev1.a.1 outpost.dev1.a"
        ],
        "staged, then switched: {calls:?}"
    );
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_tag_changes_nothing_and_fails_at_once() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(
            1,
            r#""a":{"image":"r.io/a:1"},"b":{"image":"r.io/a:1"}"#,
        ))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    let before = ids(&fake);
    let accepted_at = tokio::time::Instant::now();
    agent
        .offer(&manifest(
            2,
            r#""a":{"image":"r.io/a:missing"},"b":{"image":"r.io/a:1","env":{"X":"1"}}"#,
        ))
        .await
        .unwrap();
    let s = agent
        .until("v2 failed", MINUTE, |s| {
            status(s) == Some(DeploymentStatus::Failed)
        })
        .await;
    assert!(
        accepted_at.elapsed() < Duration::from_secs(5),
        "failed after {:?}, not at once",
        accepted_at.elapsed()
    );
    let reasons = format!("{:?}", s.deployment.as_ref().unwrap().reasons);
    assert!(
        reasons.contains("/modules/a")
            && reasons.contains("manifest unknown")
            && reasons.contains("nothing running was changed"),
        "{reasons}"
    );
    // Not even b, whose own new container could have been made: the deployment is one.
    assert_eq!(ids(&fake), before);
    assert!(
        fake.containers()
            .iter()
            .all(|c| c.state == ContainerState::Running)
    );
    // With a rollback, the device goes back to the last good deployment, still untouched.
    agent
        .offer(&with_rollback(3, r#""a":{"image":"r.io/a:missing"}"#, 600))
        .await
        .unwrap();
    let s = agent
        .until("v3 rolled back", MINUTE, |s| {
            status(s) == Some(DeploymentStatus::RolledBack)
        })
        .await;
    assert_eq!(s.last_good.as_ref().map(|g| g.version), Some(1));
    agent
        .until("v1 modules running", MINUTE, |s| {
            s.modules.len() == 2
                && s.modules
                    .values()
                    .all(|m| m.status == ModuleStatus::Running)
        })
        .await;
    assert_eq!(ids(&fake), before);
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rollback_fires_at_its_deadline_whatever_the_wall_clock_does() {
    let (dir, clock, fake) = setup();
    // A device without an RTC: the wall clock reads 1970.
    clock.set_wall(0);
    fake.publish_image("r.io/a:1");
    fake.publish_image("r.io/a:2");
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(1, r#""a":{"image":"r.io/a:1"}"#))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    // v2's image takes ten minutes to arrive: it cannot be healthy within its 60 s.
    fake.slow_pull("r.io/a:2", Duration::from_secs(600));
    let accepted_at = tokio::time::Instant::now();
    agent
        .offer(&with_rollback(
            2,
            r#""a":{"image":"r.io/a:2"},"b":{"image":"r.io/a:2"}"#,
            60,
        ))
        .await
        .unwrap();
    // NTP answers ten seconds in: the wall clock jumps 56 years.
    tokio::time::sleep(Duration::from_secs(10)).await;
    clock.set_wall(NOW_2026);
    assert_eq!(
        status(&agent.handle.state.borrow()),
        Some(DeploymentStatus::Applying),
        "the jump must not end the window"
    );
    agent
        .until("v2 rolled back", MINUTE * 2, |s| {
            status(s) == Some(DeploymentStatus::RolledBack)
        })
        .await;
    let took = accepted_at.elapsed();
    assert!(
        took >= Duration::from_secs(60) && took < Duration::from_secs(62),
        "rolled back after {took:?}; the window is 60 s"
    );
    agent
        .until("back on v1", MINUTE, |s| {
            s.modules.len() == 1 && s.modules["a"].status == ModuleStatus::Running
        })
        .await;
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_rollback_window_survives_an_agent_restart() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    fake.publish_image("r.io/a:2");
    fake.slow_pull("r.io/a:2", Duration::from_secs(600));
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(1, r#""a":{"image":"r.io/a:1"}"#))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    let accepted_at = tokio::time::Instant::now();
    agent
        .offer(&with_rollback(2, r#""b":{"image":"r.io/a:2"}"#, 60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(40)).await;
    agent.stop().await;
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .until("v2 rolled back", MINUTE * 3, |s| {
            status(s) == Some(DeploymentStatus::RolledBack)
        })
        .await;
    let took = accepted_at.elapsed();
    assert!(
        took < Duration::from_secs(62),
        "rolled back {took:?} after acceptance: the window restarted with the agent"
    );
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_start_that_fails_backs_off_is_counted_and_says_why() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/web:1");
    fake.fail_starts(
        "web",
        "500 driver failed programming external connectivity: Bind for 0.0.0.0:8080 failed: port is already allocated",
    );
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(1, r#""web":{"image":"r.io/web:1"}"#))
        .await
        .unwrap();
    // No last good deployment: reported failed at once, and still retried.
    let s = agent
        .until("v1 failed", MINUTE, |s| {
            status(s) == Some(DeploymentStatus::Failed)
        })
        .await;
    assert!(format!("{:?}", s.deployment).contains("port is already allocated"));
    // Over five minutes, attempts back off (1, 2, 4, ... s) instead of every 2 s.
    let mut seen = Vec::new();
    let start = tokio::time::Instant::now();
    let mut rx = agent.handle.state.clone();
    while start.elapsed() < Duration::from_secs(300) {
        let count = rx
            .borrow_and_update()
            .modules
            .get("web")
            .map(|m| m.restart_count);
        if let Some(c) = count
            && seen.last().is_none_or(|(n, _)| *n != c)
        {
            seen.push((c, start.elapsed()));
        }
        if tokio::time::timeout(Duration::from_secs(301), rx.changed())
            .await
            .is_err()
        {
            break;
        }
    }
    let attempts = seen.last().map_or(0, |(n, _)| *n);
    assert!(
        (5..=12).contains(&attempts),
        "{attempts} failed starts in 5 minutes: {seen:?}"
    );
    let s = agent.handle.state.borrow().clone();
    let web = &s.modules["web"];
    assert_eq!(web.status, ModuleStatus::Failed);
    let error = web.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("start-failing") && error.contains("port is already allocated"),
        "{error}"
    );
    // Once the port is free, the next attempt starts it and the deployment gets there.
    fake.clear_start_failure("web");
    agent
        .until("v1 applied after all", MINUTE * 6, applied(1))
        .await;
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn crash_restarts_follow_the_monotonic_clock_not_the_engines_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    // The agent's clock reads 1970 (no RTC yet); the engine's records are stamped 2026:
    // before this design, an exit "in the future" was never restarted.
    let agent_clock = FakeClock::new(0, 1_000);
    let engine_clock = FakeClock::new(NOW_2026, 1_000);
    let fake = FakeRuntime::new(Arc::new(engine_clock));
    fake.publish_image("r.io/a:1");
    let agent = Agent::start(dir.path(), &agent_clock, &fake);
    agent
        .offer(&manifest(1, r#""a":{"image":"r.io/a:1"}"#))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    fake.crash("outpost.dev1.a", 1);
    agent
        .until("a restarted", MINUTE, |s| {
            s.modules
                .get("a")
                .is_some_and(|m| m.restart_count == 1 && m.status == ModuleStatus::Running)
        })
        .await;
    // And after NTP jumps the agent's clock forward, restarts go on with their backoff.
    agent_clock.set_wall(NOW_2026 + YEARS_56_MS);
    fake.crash("outpost.dev1.a", 1);
    agent
        .until("a restarted again", MINUTE, |s| {
            s.modules
                .get("a")
                .is_some_and(|m| m.restart_count == 2 && m.status == ModuleStatus::Running)
        })
        .await;
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_store_keeps_every_module_running_until_a_deployment_arrives() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(
            1,
            r#""a":{"image":"r.io/a:1"},"b":{"image":"r.io/a:1","restartPolicy":"on-failure"}"#,
        ))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    agent.stop().await;
    let before = ids(&fake);
    // The state folder is wiped; the agent comes back with no hub.
    let empty = tempfile::tempdir().unwrap();
    let agent = Agent::start(empty.path(), &clock, &fake);
    let s = agent
        .until("modules reported unmanaged", MINUTE, |s| {
            s.modules.len() == 2
                && s.modules
                    .values()
                    .all(|m| m.status == ModuleStatus::Unmanaged)
        })
        .await;
    assert!(s.deployment.is_none());
    assert!(
        s.conditions.iter().any(|c| c.kind == "no-deployment"),
        "{:?}",
        s.conditions
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        ids(&fake),
        before,
        "a container was removed without a deployment"
    );
    // Kept alive by the restart policy in its labels.
    fake.crash("outpost.dev1.b", 2);
    agent
        .until("b restarted", MINUTE, |_| {
            fake.containers()
                .iter()
                .all(|c| c.state == ContainerState::Running)
        })
        .await;
    // A deployment adopts what matches and removes what it does not name.
    agent
        .offer(&manifest(1, r#""a":{"image":"r.io/a:1"}"#))
        .await
        .unwrap();
    agent.until("v1 applied again", MINUTE, applied(1)).await;
    let after = ids(&fake);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0], before[0], "a was adopted, not recreated");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn ten_modules_that_ignore_sigterm_switch_in_about_one_grace_period() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/sleep:1");
    let names: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    for n in &names {
        fake.set_behaviour(
            n,
            Behaviour {
                ignores_sigterm: true,
                ..Default::default()
            },
        );
    }
    let modules = |v: u64| {
        names
            .iter()
            .map(|n| format!(r#""{n}":{{"image":"r.io/sleep:1","env":{{"V":"{v}"}}}}"#))
            .collect::<Vec<_>>()
            .join(",")
    };
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent.offer(&manifest(1, &modules(1))).await.unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    let start = tokio::time::Instant::now();
    agent.offer(&manifest(2, &modules(2))).await.unwrap();
    agent.until("v2 applied", MINUTE * 5, applied(2)).await;
    let update = start.elapsed();
    assert!(
        update < Duration::from_secs(15),
        "updating ten modules took {update:?}: one stop grace (10 s) expected, not ten"
    );
    let start = tokio::time::Instant::now();
    agent.offer(&manifest(3, "")).await.unwrap();
    agent
        .until("v3 (nothing) applied", MINUTE * 5, applied(3))
        .await;
    let remove = start.elapsed();
    assert!(
        remove < Duration::from_secs(15),
        "removing ten modules took {remove:?}"
    );
    assert!(fake.containers().is_empty());
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn requests_are_answered_while_a_module_takes_its_grace_period() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    fake.set_behaviour(
        "slow",
        Behaviour {
            ignores_sigterm: true,
            ..Default::default()
        },
    );
    let agent = Agent::start_with(dir.path(), &clock, &fake, |s| {
        s.stop_grace = Duration::from_secs(120);
    });
    agent
        .offer(&manifest(
            1,
            r#""slow":{"image":"r.io/a:1"},"other":{"image":"r.io/a:1"}"#,
        ))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    fake.print("other", "hello from other");
    // Removing `slow` takes its whole two-minute grace period.
    agent
        .offer(&manifest(2, r#""other":{"image":"r.io/a:1"}"#))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let asked = tokio::time::Instant::now();
    let logs = agent
        .handle
        .logs("other", 10, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    assert!(logs.contains("hello from other"));
    let refused = agent
        .offer(&manifest(
            2,
            r#""other":{"image":"r.io/a:1","env":{"X":"1"}}"#,
        ))
        .await;
    assert!(refused.is_err(), "the version rule still answers");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "requests waited {:?} behind a stop",
        asked.elapsed()
    );
    agent.until("v2 applied", MINUTE * 3, applied(2)).await;
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_image_for_another_platform_is_refused_before_the_switch() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    fake.publish_image_for("r.io/a:arm", "riscv64");
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(1, r#""a":{"image":"r.io/a:1"}"#))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    let before = ids(&fake);
    agent
        .offer(&manifest(2, r#""a":{"image":"r.io/a:arm"}"#))
        .await
        .unwrap();
    let s = agent
        .until("v2 failed", MINUTE, |s| {
            status(s) == Some(DeploymentStatus::Failed)
        })
        .await;
    assert!(
        format!("{:?}", s.deployment).contains("riscv64"),
        "{:?}",
        s.deployment
    );
    assert_eq!(ids(&fake), before);
    agent.stop().await;
}

/// A multi-platform image: the engine's platform is pulled unless the module pins another;
/// a new pin pulls that variant and replaces the container; the report says which runs.
#[tokio::test(start_paused = true)]
async fn the_engines_platform_is_pulled_unless_the_module_pins_one() {
    let (dir, clock, fake) = setup();
    let here = crate::runtime::go_arch();
    fake.publish_image_for("r.io/m:1", "riscv64");
    fake.publish_image_for("r.io/m:1", here);
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(1, r#""a":{"image":"r.io/m:1"}"#))
        .await
        .unwrap();
    let s = agent.until("v1 applied", MINUTE, applied(1)).await;
    let native = format!("linux/{here}");
    assert_eq!(s.modules["a"].platform.as_deref(), Some(native.as_str()));
    // Pulled for the engine's platform: this build's, with its ARM variant on 32-bit ARM.
    assert_eq!(
        fake.pulled_platforms(),
        [(
            "r.io/m:1".to_string(),
            outpost_core::platform::Platform::of_this_build().to_string()
        )]
    );
    let before = ids(&fake);

    agent
        .offer(&manifest(
            2,
            r#""a":{"image":"r.io/m:1","platform":"linux/riscv64"}"#,
        ))
        .await
        .unwrap();
    let s = agent.until("v2 applied", MINUTE, applied(2)).await;
    assert_eq!(s.modules["a"].platform.as_deref(), Some("linux/riscv64"));
    assert_eq!(
        fake.pulled_platforms().last(),
        Some(&("r.io/m:1".to_string(), "linux/riscv64".to_string()))
    );
    assert_ne!(
        ids(&fake),
        before,
        "the container runs the pinned variant now"
    );

    // A platform the image does not offer: the pull fails with the reason, the module keeps
    // running what it ran.
    let running = ids(&fake);
    agent
        .offer(&manifest(
            3,
            r#""a":{"image":"r.io/m:1","platform":"linux/s390x"}"#,
        ))
        .await
        .unwrap();
    let s = agent
        .until("v3 failed", MINUTE, |s| {
            status(s) == Some(DeploymentStatus::Failed)
        })
        .await;
    assert!(
        format!("{:?}", s.deployment).contains("no matching manifest for linux/s390x"),
        "{:?}",
        s.deployment
    );
    assert_eq!(ids(&fake), running);
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn logs_leave_the_device_without_the_modules_secrets() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(
            1,
            r#""a":{"image":"r.io/a:1","env":{"API_TOKEN":"tok-9f8e7d","MODE":"on"}}"#,
        ))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    fake.print("a", "starting with token tok-9f8e7d in mode on");
    let text = agent.handle.logs("a", 10, 1 << 20).await.unwrap().unwrap();
    assert_eq!(text, "starting with token [redacted] in mode on\n");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn after_a_reboot_at_1970_expiry_is_judged_by_the_last_time_the_device_knew() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let keys = TrustedKeys::new([key.verifying_key()]);
    let agent = Agent::start_with(dir.path(), &clock, &fake, |s| {
        s.policy.trusted_keys = keys.clone();
        s.policy.allow_image_tags = true;
    });
    let a = r#""a":{"image":"r.io/a:1"}"#;
    agent
        .offer(&bound(1, r#"{"device":"dev1"}"#, a))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    agent.stop().await;
    // The device reboots without an RTC: its clock reads 1970. An envelope that expired a day
    // before the device last knew the time looks fresh to that clock; it is still refused.
    clock.set_wall(0);
    let agent = Agent::start_with(dir.path(), &clock, &fake, |s| {
        s.policy.trusted_keys = keys.clone();
        s.policy.allow_image_tags = true;
    });
    let stale = format!(
        r#"{{"schemaVersion":"1.0","id":"d","version":2,"target":{{"device":"dev1"}},"expiresAt":"{}","modules":{{{a}}}}}"#,
        crate::clock::format_rfc3339(NOW_2026 / 1000 - 86_400)
    );
    let issues = agent.offer(&stale).await.unwrap_err();
    assert_eq!(issues[0].path, "/expiresAt", "{issues:?}");
    // One that expires later than the device's last known time is taken.
    agent
        .offer(&bound(2, r#"{"device":"dev1"}"#, a))
        .await
        .unwrap();
    agent.stop().await;
}

/// A deployment pinning `content` (served from a file in `dir`) as `model`, read by `app`.
fn with_model(dir: &std::path::Path, version: u64, content: &[u8], pinned: &[u8]) -> String {
    let file = dir.join(format!("model-{version}"));
    std::fs::write(&file, content).expect("write the model");
    let pin = dir.join("pin");
    std::fs::write(&pin, pinned).expect("write");
    let (sha256, size) = crate::fetch::digest_of(&pin).expect("digest");
    format!(
        r#"{{"schemaVersion":"1.0","id":"d","version":{version},
        "artifacts":{{"model":{{"url":"file://{}","sha256":"{sha256}","size":{size}}}}},
        "modules":{{"app":{{"image":"r.io/a:1","artifacts":["model"]}}}},
        "rollback":{{"onFailure":true,"healthyWithinSecs":60}}}}"#,
        file.display()
    )
}

#[tokio::test(start_paused = true)]
async fn a_new_model_is_a_link_swap_and_a_wrong_one_rolls_back_without_touching_the_module() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    let state = dir.path().join("state");
    let store = crate::artifacts::Artifacts::new(&state, crate::fetch::Fetcher::new(None, 0), 2);
    let agent = Agent::start_with(dir.path(), &clock, &fake, |s| {
        s.artifacts = Some(store.clone());
    });
    let link = store.module_dir("app").join("model");

    agent
        .offer(&with_model(dir.path(), 1, b"model A", b"model A"))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    assert_eq!(std::fs::read(&link).unwrap(), b"model A");
    let containers = fake.containers();
    assert_eq!(containers.len(), 1);
    let id = containers[0].id.clone();

    agent
        .offer(&with_model(dir.path(), 2, b"model B", b"model B"))
        .await
        .unwrap();
    agent.until("v2 applied", MINUTE, applied(2)).await;
    assert_eq!(std::fs::read(&link).unwrap(), b"model B");
    let containers = fake.containers();
    assert_eq!(containers.len(), 1);
    assert_eq!(
        containers[0].id, id,
        "the same container: nothing recreated"
    );
    assert_eq!(containers[0].state, ContainerState::Running);

    // The file served is not the one pinned: rolled back to v2 at once, the link untouched.
    agent
        .offer(&with_model(dir.path(), 3, b"model C", b"model D"))
        .await
        .unwrap();
    let s = agent
        .until("v3 rolled back", MINUTE, |s| {
            s.deployment
                .as_ref()
                .is_some_and(|d| d.version == 3 && d.status == DeploymentStatus::RolledBack)
        })
        .await;
    let reasons = format!("{:?}", s.deployment.as_ref().map(|d| &d.reasons));
    assert!(
        reasons.contains("/modules/app") && reasons.contains("SHA-256"),
        "{reasons}"
    );
    assert_eq!(std::fs::read(&link).unwrap(), b"model B");
    assert_eq!(fake.containers()[0].id, id);
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.starts_with("stop") || c.starts_with("restart")),
        "{:?}",
        fake.calls()
    );
    agent.stop().await;
    store.shutdown().await;
}

/// Windows judged on the wall clock: a clock that was never set (1970) keeps them closed, the
/// deployment waits with no opening to report, and it switches once the clock is set inside a
/// window (judged again within a minute, never slept towards); its rollback window starts
/// then, not at acceptance.
#[tokio::test(start_paused = true)]
async fn windows_stay_closed_while_the_clock_is_not_set_and_open_when_it_is() {
    let (dir, clock, fake) = setup();
    fake.publish_image("r.io/a:1");
    fake.publish_image("r.io/a:2");
    let windows = outpost_core::window::Windows::parse(&["daily 00:00-24:00"]).unwrap();
    let agent = Agent::start_with(dir.path(), &clock, &fake, |s| {
        s.maintenance = crate::config::MaintenanceConfig {
            windows,
            entries: vec!["daily 00:00-24:00".into()],
            timezone: Some(jiff::tz::TimeZone::UTC),
        };
    });
    // Nothing runs yet: the first deployment is not held.
    agent
        .offer(&manifest(1, r#""a":{"image":"r.io/a:1"}"#))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    let before = ids(&fake);

    clock.set_wall(0);
    agent
        .offer(&with_rollback(2, r#""a":{"image":"r.io/a:2"}"#, 30))
        .await
        .unwrap();
    let s = agent
        .until("v2 waiting", MINUTE, |s| {
            status(s) == Some(DeploymentStatus::Waiting)
        })
        .await;
    let waiting = s.deployment.unwrap().waiting.expect("says why");
    assert_eq!(waiting.reason, crate::state::WaitReason::UpdateWindow);
    assert_eq!(
        waiting.opens_at, None,
        "no opening while the clock is not set"
    );
    assert!(
        waiting.message.contains("clock is not set"),
        "{}",
        waiting.message
    );
    // Ten minutes at 1970: still waiting, nothing switched, and not failed by its 30 s
    // rollback window (which has not started).
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        status(&agent.handle.state.borrow()),
        Some(DeploymentStatus::Waiting)
    );
    // v1's container still runs; v2's is staged (created) beside it.
    let running: Vec<_> = fake
        .containers()
        .into_iter()
        .filter(|c| c.state == ContainerState::Running)
        .map(|c| (c.module, c.id))
        .collect();
    assert_eq!(running, before, "v1's container untouched");

    // NTP answers: inside the (all-day) window, it switches within a minute.
    clock.set_wall(NOW_2026);
    agent.until("v2 applied", 2 * MINUTE, applied(2)).await;
    assert_ne!(ids(&fake), before);
    agent.stop().await;
}

/// A lock holds only a switch that replaces its module; released, the switch goes on; a lock
/// outliving the deadline is dropped with the module's old container.
#[tokio::test(start_paused = true)]
async fn a_lock_defers_the_replacement_of_its_module_until_release_or_deadline() {
    let (dir, clock, fake) = setup();
    for image in ["r.io/a:1", "r.io/a:2", "r.io/a:3"] {
        fake.publish_image(image);
    }
    let agent = Agent::start(dir.path(), &clock, &fake);
    agent
        .offer(&manifest(
            1,
            r#""a":{"image":"r.io/a:1"},"b":{"image":"r.io/a:1"}"#,
        ))
        .await
        .unwrap();
    agent.until("v1 applied", MINUTE, applied(1)).await;
    assert_eq!(agent.handle.lock("b", true, "api").await.unwrap(), Ok(true));
    assert!(
        agent
            .handle
            .lock("nope", true, "api")
            .await
            .unwrap()
            .is_err()
    );
    // v2 changes a only: b's lock does not matter.
    agent
        .offer(&manifest(
            2,
            r#""a":{"image":"r.io/a:2"},"b":{"image":"r.io/a:1"}"#,
        ))
        .await
        .unwrap();
    agent.until("v2 applied", MINUTE, applied(2)).await;
    // v3 changes b, with a 100 s deadline: waits on b's lock.
    agent
        .offer(
            r#"{"schemaVersion":"1.0","id":"d","version":3,"updateLockDeadlineSecs":100,"modules":{"a":{"image":"r.io/a:2"},"b":{"image":"r.io/a:3"}}}"#,
        )
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let s = agent
        .until("v3 waiting", MINUTE, |s| {
            status(s) == Some(DeploymentStatus::Waiting)
        })
        .await;
    let waiting = s.deployment.unwrap().waiting.expect("says why");
    assert_eq!(waiting.reason, crate::state::WaitReason::UpdateLock);
    assert_eq!(waiting.modules, ["b"]);
    // Past the deadline it applies, and b's lock is gone.
    agent.until("v3 applied", 3 * MINUTE, applied(3)).await;
    assert!(started.elapsed() >= Duration::from_secs(100));
    let s = agent.handle.state.borrow().clone();
    assert!(
        !s.conditions.iter().any(|c| c.kind == "update-locks"),
        "{:?}",
        s.conditions
    );
    agent.stop().await;
}
