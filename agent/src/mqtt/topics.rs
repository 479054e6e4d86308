//! Topic names of protocol v1: `P` = `plaster/v1/<fleet>/<device>`.

/// The protocol's root and version.
pub const ROOT: &str = "plaster/v1";
/// The device-id level that addresses every device of a fleet.
pub const ALL_DEVICES: &str = "_all";

/// The topics of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    fleet_prefix: String,
}

impl Topics {
    /// `fleet` and `device` are checked by the configuration: no `/`, `+`, `#`.
    pub fn new(fleet: &str, device: &str) -> Topics {
        Topics {
            prefix: format!("{ROOT}/{fleet}/{device}"),
            fleet_prefix: format!("{ROOT}/{fleet}/{ALL_DEVICES}"),
        }
    }

    /// Retained birth (and Last Will) status.
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }

    pub fn telemetry(&self) -> String {
        format!("{}/telemetry", self.prefix)
    }

    /// Retained model state.
    pub fn model_state(&self) -> String {
        format!("{}/model/state", self.prefix)
    }

    pub fn model_events(&self) -> String {
        format!("{}/model/events", self.prefix)
    }

    /// Where pushes arrive: this device's topic and the fleet's.
    pub fn model_push(&self) -> [String; 2] {
        [
            format!("{}/model/push", self.prefix),
            format!("{}/model/push", self.fleet_prefix),
        ]
    }

    /// Where commands arrive: this device's topic and the fleet's.
    pub fn cmd(&self) -> [String; 2] {
        [
            format!("{}/cmd", self.prefix),
            format!("{}/cmd", self.fleet_prefix),
        ]
    }

    /// What `push` and `rollback` subscribe to: every device's update events and status.
    pub fn fleet_updates(fleet: &str) -> [String; 2] {
        [
            format!("{ROOT}/{fleet}/+/model/events"),
            format!("{ROOT}/{fleet}/+/status"),
        ]
    }

    /// The device id of a `plaster/v1/<fleet>/<device>/...` topic.
    pub fn device_of(topic: &str) -> Option<&str> {
        topic.split('/').nth(3)
    }

    /// What a fleet dashboard (`watch`) subscribes to.
    pub fn fleet_wildcard(fleet: &str) -> [String; 3] {
        [
            format!("{ROOT}/{fleet}/+/status"),
            format!("{ROOT}/{fleet}/+/telemetry"),
            format!("{ROOT}/{fleet}/+/model/events"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_v1_topics() {
        let t = Topics::new("lab", "jetson-017");
        assert_eq!(t.status(), "plaster/v1/lab/jetson-017/status");
        assert_eq!(t.telemetry(), "plaster/v1/lab/jetson-017/telemetry");
        assert_eq!(t.model_state(), "plaster/v1/lab/jetson-017/model/state");
        assert_eq!(t.model_events(), "plaster/v1/lab/jetson-017/model/events");
        assert_eq!(
            t.model_push(),
            [
                "plaster/v1/lab/jetson-017/model/push".to_string(),
                "plaster/v1/lab/_all/model/push".to_string()
            ]
        );
        assert_eq!(
            t.cmd(),
            [
                "plaster/v1/lab/jetson-017/cmd".to_string(),
                "plaster/v1/lab/_all/cmd".to_string()
            ]
        );
        assert_eq!(
            Topics::fleet_wildcard("lab")[1],
            "plaster/v1/lab/+/telemetry"
        );
    }
}
