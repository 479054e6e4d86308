//! Outgoing telemetry and events: the durable spool they pass through on the way to MQTT.
//! (The daemon that fills it and the MQTT task that drains it are the next issue's work.)

pub mod record;
pub mod spool;
