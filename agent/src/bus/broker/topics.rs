//! Where a module may publish (its outputs) and subscribe (its inputs).

/// A module may publish to concrete topics under its own outputs.
pub fn allowed_publish(module: &str, topic: &str) -> bool {
    let prefix = format!("modules/{module}/outputs/");
    topic.len() > prefix.len() && topic.starts_with(&prefix) && rumqttc::valid_topic(topic)
}

/// The topic a module publishes `lock` or `unlock` to, to take or release its own update
/// lock (docs/reconciler.md#update-windows-and-locks): only its own.
pub fn lock_topic(module: &str) -> String {
    format!("modules/{module}/lock")
}

/// A module may subscribe to filters under its own inputs (wildcards only below them).
pub fn allowed_filter(module: &str, filter: &str) -> bool {
    let prefix = format!("modules/{module}/inputs/");
    filter.len() > prefix.len() && filter.starts_with(&prefix) && rumqttc::valid_filter(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_stay_within_their_own_topics() {
        assert!(allowed_publish("cam", "modules/cam/outputs/frames"));
        assert!(allowed_publish("cam", "modules/cam/outputs/a/b"));
        assert!(!allowed_publish("cam", "modules/cam/outputs/"));
        assert!(!allowed_publish("cam", "modules/cam/outputs/#"));
        assert!(!allowed_publish("cam", "modules/infer/outputs/x"));
        assert!(!allowed_publish("cam", "modules/cam/inputs/x"));
        assert!(!allowed_publish("cam", "modules/camera/outputs/x"));
        assert!(!allowed_publish("ca", "modules/cam/outputs/x"));
        assert!(!allowed_publish("cam", "outpost/dev/deployment"));

        assert!(allowed_filter("cam", "modules/cam/inputs/#"));
        assert!(allowed_filter("cam", "modules/cam/inputs/+/x"));
        assert!(!allowed_filter("cam", "modules/+/inputs/#"));
        assert!(!allowed_filter("cam", "modules/#"));
        assert!(!allowed_filter("cam", "#"));
        assert!(!allowed_filter("cam", "modules/cam/outputs/#"));
        assert!(!allowed_filter("cam", "modules/infer/inputs/#"));
        assert!(!allowed_filter("cam", "modules/cam/inputs/"));
    }
}
