//! The hub's topic names (see `docs/hub.md`), built in one place so the device and the
//! operator's CLI cannot disagree, and the parser that sorts an incoming topic into what it is.

use crate::state::Source;

/// Topic names of one device under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
    pub device: String,
}

/// What an incoming message on a device's subscriptions is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A deployment for the device itself or for one of its groups.
    Deployment(Source),
    /// A command: `{prefix}/{device}/commands/{name}`.
    Command(String),
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Topics {
        Topics {
            prefix: prefix.to_string(),
            device: device.to_string(),
        }
    }

    pub fn deployment(&self) -> String {
        device_topic(&self.prefix, &self.device, "deployment")
    }

    pub fn state(&self) -> String {
        device_topic(&self.prefix, &self.device, "state")
    }

    pub fn presence(&self) -> String {
        device_topic(&self.prefix, &self.device, "presence")
    }

    /// The filter the device subscribes to for commands.
    pub fn commands_filter(&self) -> String {
        device_topic(&self.prefix, &self.device, "commands/+")
    }

    pub fn command(&self, name: &str) -> String {
        device_topic(&self.prefix, &self.device, &format!("commands/{name}"))
    }

    pub fn response(&self, id: &str) -> String {
        device_topic(&self.prefix, &self.device, &format!("responses/{id}"))
    }

    pub fn group_deployment(&self, group: &str) -> String {
        group_deployment(&self.prefix, group)
    }

    /// Where the outbox's records of `stream` go.
    pub fn telemetry(&self, stream: &str) -> String {
        device_topic(&self.prefix, &self.device, &format!("telemetry/{stream}"))
    }

    /// Sorts a topic the device is subscribed to; `None` for anything else (which a broker
    /// should not send, and which is then ignored).
    pub fn classify(&self, topic: &str) -> Option<Incoming> {
        if topic == self.deployment() {
            return Some(Incoming::Deployment(Source::Device));
        }
        let device_root = format!("{}/{}/", self.prefix, self.device);
        if let Some(name) = topic
            .strip_prefix(&device_root)
            .and_then(|rest| rest.strip_prefix("commands/"))
            && is_level(name)
        {
            return Some(Incoming::Command(name.to_string()));
        }
        let group_root = format!("{}/groups/", self.prefix);
        if let Some(group) = topic
            .strip_prefix(&group_root)
            .and_then(|rest| rest.strip_suffix("/deployment"))
            && is_level(group)
        {
            return Some(Incoming::Deployment(Source::Group {
                name: group.to_string(),
            }));
        }
        None
    }
}

pub fn device_topic(prefix: &str, device: &str, leaf: &str) -> String {
    format!("{prefix}/{device}/{leaf}")
}

pub fn group_deployment(prefix: &str, group: &str) -> String {
    format!("{prefix}/groups/{group}/deployment")
}

/// A single topic level made of safe characters: device ids, group names, command names and
/// request ids all go into topics, so none may hold `/`, `+`, `#` or control characters.
pub fn is_level(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The device id in `{prefix}/{device}/{leaf}`, if the topic has that shape.
pub fn device_of<'a>(prefix: &str, topic: &'a str, leaf: &str) -> Option<&'a str> {
    let device = topic
        .strip_prefix(prefix)?
        .strip_prefix('/')?
        .strip_suffix(leaf)?
        .strip_suffix('/')?;
    (is_level(device) && device != "groups").then_some(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_what_the_device_subscribes_to() {
        let t = Topics::new("outpost", "cam-1");
        assert_eq!(
            t.classify("outpost/cam-1/deployment"),
            Some(Incoming::Deployment(Source::Device))
        );
        assert_eq!(
            t.classify("outpost/groups/line-3/deployment"),
            Some(Incoming::Deployment(Source::Group {
                name: "line-3".into()
            }))
        );
        assert_eq!(
            t.classify("outpost/cam-1/commands/ping"),
            Some(Incoming::Command("ping".into()))
        );
        assert_eq!(t.classify("outpost/cam-2/deployment"), None);
        assert_eq!(t.classify("outpost/cam-1/commands/a/b"), None);
        assert_eq!(t.classify("outpost/groups/a/b/deployment"), None);
    }

    proptest::proptest! {
        /// Only well-formed topics are classified, and what comes out is a safe level.
        #[test]
        fn classify_takes_any_topic(topic in "\\PC{0,80}") {
            let t = Topics::new("outpost", "cam-1");
            match t.classify(&topic) {
                Some(Incoming::Command(name)) => proptest::prop_assert!(is_level(&name)),
                Some(Incoming::Deployment(Source::Group { name })) => proptest::prop_assert!(is_level(&name)),
                _ => {}
            }
        }
    }

    #[test]
    fn finds_the_device_of_a_topic() {
        assert_eq!(
            device_of("outpost", "outpost/cam-1/state", "state"),
            Some("cam-1")
        );
        assert_eq!(device_of("outpost", "outpost/a/b/state", "state"), None);
        assert_eq!(device_of("outpost", "other/cam-1/state", "state"), None);
    }
}
