//! MQTT: the only module that knows topic names (PROTOCOL.md v1). The client task that owns
//! the event loop comes with the daemon.

pub mod topics;
