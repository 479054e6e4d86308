//! MQTT: the only module that knows topic names (PROTOCOL.md v1) and the only owner of the
//! client library's event loop (`link`, one task in the daemon).

pub mod link;
pub mod options;
pub mod session;
pub mod topics;
