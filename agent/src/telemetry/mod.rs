//! Outgoing telemetry and events: the payloads, the durable spool they pass through on the way
//! to MQTT, and the persisted counters that number them.

pub mod counter;
pub mod record;
pub mod spool;
