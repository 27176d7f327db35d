//! The route table: which targets a module's output topic goes to. Built from the deployment's
//! `routes` and swapped whole when a deployment is accepted, so a route change applies without
//! restarting any module.

use crate::manifest::Route;
use crate::telemetry::outbox::NewRecord;

/// Priority of a route to `$upstream` that does not name one (0 most important, 9 least).
pub const DEFAULT_PRIORITY: u8 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Into the outbox, for `{prefix}/{device}/telemetry/{stream}`.
    Upstream { stream: String, priority: u8 },
    /// To the subscribers of this topic (another module's input).
    Module { topic: String },
}

impl Target {
    /// The outbox record for a message on `topic` routed to this upstream target; `None` for
    /// a module target.
    pub fn record(&self, topic: &str, payload: &[u8]) -> Option<NewRecord> {
        match self {
            Target::Upstream { stream, priority } => Some(NewRecord {
                stream: stream.clone(),
                priority: *priority,
                topic: topic.to_string(),
                payload: payload.to_vec(),
            }),
            Target::Module { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTable {
    routes: Vec<(String, Target)>,
    /// The modules of the deployment in force: only they may log in to the bus. `None`
    /// without a deployment (a new or lost store): the containers kept running then keep
    /// their bus access, as they keep everything else.
    modules: Option<std::collections::BTreeSet<String>>,
}

impl RouteTable {
    /// The table of a deployment: its routes, and its modules as the ones allowed on the bus.
    pub fn for_deployment(d: &crate::manifest::Deployment) -> RouteTable {
        RouteTable {
            modules: Some(d.modules.keys().cloned().collect()),
            ..RouteTable::new(&d.routes)
        }
    }

    /// Whether `module` may log in to the bus now.
    pub fn allows(&self, module: &str) -> bool {
        self.modules.as_ref().is_none_or(|m| m.contains(module))
    }

    /// Routes were validated at intake (shape, topic filters, modules that exist).
    pub fn new(routes: &[Route]) -> RouteTable {
        let routes = routes
            .iter()
            .map(|r| {
                let target = match r.to.strip_prefix("$upstream/") {
                    Some(stream) => Target::Upstream {
                        stream: stream.to_string(),
                        priority: r.priority.unwrap_or(DEFAULT_PRIORITY),
                    },
                    None => Target::Module {
                        topic: r.to.clone(),
                    },
                };
                (r.from.clone(), target)
            })
            .collect();
        RouteTable {
            routes,
            modules: None,
        }
    }

    /// Every target `topic` goes to, once each, in the order the routes are listed. An
    /// upstream stream counts once whatever the priorities (the first matching route's wins):
    /// a record is queued once per stream.
    pub fn targets(&self, topic: &str) -> Vec<&Target> {
        let mut out: Vec<&Target> = Vec::new();
        for (filter, target) in &self.routes {
            let seen = out.iter().any(|t| match (t, target) {
                (Target::Upstream { stream: a, .. }, Target::Upstream { stream: b, .. }) => a == b,
                (a, b) => *a == b,
            });
            if !seen && rumqttc::matches(topic, filter) {
                out.push(target);
            }
        }
        out
    }

    /// The distinct source filters (what a client of an external bus subscribes to).
    pub fn sources(&self) -> Vec<String> {
        let mut out: Vec<String> = self.routes.iter().map(|(f, _)| f.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(from: &str, to: &str, priority: Option<u8>) -> Route {
        Route {
            from: from.into(),
            to: to.into(),
            priority,
        }
    }

    #[test]
    fn topics_reach_each_matching_target_once() {
        let table = RouteTable::new(&[
            route("modules/cam/outputs/#", "$upstream/frames", Some(7)),
            route("modules/cam/outputs/+/alerts", "$upstream/alerts", None),
            route("modules/+/outputs/#", "$upstream/frames", Some(7)),
            route("modules/cam/outputs/#", "$upstream/frames", Some(1)),
            route(
                "modules/cam/outputs/left/#",
                "modules/infer/inputs/images",
                None,
            ),
        ]);
        let t = table.targets("modules/cam/outputs/left/alerts");
        assert_eq!(
            t,
            [
                &Target::Upstream {
                    stream: "frames".into(),
                    priority: 7
                },
                &Target::Upstream {
                    stream: "alerts".into(),
                    priority: DEFAULT_PRIORITY
                },
                &Target::Module {
                    topic: "modules/infer/inputs/images".into()
                },
            ]
        );
        assert_eq!(
            table.targets("modules/infer/inputs/images"),
            Vec::<&Target>::new()
        );
        assert_eq!(table.targets("modules/other/outputs/x").len(), 1);
        assert_eq!(table.sources().len(), 4, "distinct filters");
    }
}
