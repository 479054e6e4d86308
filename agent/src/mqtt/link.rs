//! The daemon's MQTT connection: the one task that owns rumqttc's event loop.
//!
//! It publishes what the spool holds, in order, at QoS 1 and removes a record only when the
//! broker's PUBACK for it arrives; it publishes the retained birth status and model state on
//! every connection (and on `rebirth`), with a Last Will that marks the device offline; it
//! reconnects with exponential backoff and jitter; on shutdown it flushes the spool for a
//! bounded time, publishes a clean offline status and disconnects.
//!
//! Delivery is at-least-once: after a reconnect, records whose PUBACK was lost are sent again
//! from the spool (the spool, not the client library's in-memory queue, is the source of
//! truth, so a record survives a crash of the agent as well as an outage of the broker).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session::{Session, Wire};
use super::topics::Topics;
use crate::config::Encoding;
use crate::lock;
use crate::ota::wire::{self, Command};
use crate::ota::Input;
use crate::telemetry::counter::PersistentCounter;
use crate::telemetry::record::{self, rfc3339, Birth, Death, ModelRef, ModelState};
use crate::telemetry::spool::Spool;

/// Records published but not yet acknowledged, at most: bounds memory and the request channel.
const MAX_IN_FLIGHT: usize = 16;
/// PROTOCOL.md: reconnect with exponential backoff from 1 s to 60 s, plus jitter.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// ±20 % so a fleet that lost its broker does not reconnect in lockstep.
const BACKOFF_JITTER: f64 = 0.2;

/// What the retained status and model state say about this device; the daemon updates it
/// when the active model changes, and the link republishes.
#[derive(Clone, Debug, PartialEq)]
pub struct Presence {
    pub model: ModelRef,
    pub state: ModelState,
    pub capabilities: Vec<String>,
}

/// Everything the link needs.
pub struct LinkParts<S> {
    /// The client and its event loop (MQTT 3.1.1 or 5).
    pub session: S,
    pub topics: Topics,
    pub encoding: Encoding,
    pub boot_id: String,
    pub session_seq: PersistentCounter,
    pub spool: Arc<Mutex<Spool>>,
    /// Notified whenever a record enters the spool.
    pub spooled: Arc<Notify>,
    pub presence: watch::Receiver<Presence>,
    /// How long the shutdown may spend flushing the spool before the offline status.
    pub drain_timeout: Duration,
    pub broker: String,
    /// Where push messages and signed commands go (the update task).
    pub updates: mpsc::Sender<Input>,
}

impl<S> LinkParts<S> {
    /// The same parts over another session (the protocol version is chosen at run time).
    pub fn with_session<T>(self, session: T) -> LinkParts<T> {
        LinkParts {
            session,
            topics: self.topics,
            encoding: self.encoding,
            boot_id: self.boot_id,
            session_seq: self.session_seq,
            spool: self.spool,
            spooled: self.spooled,
            presence: self.presence,
            drain_timeout: self.drain_timeout,
            broker: self.broker,
            updates: self.updates,
        }
    }
}

/// A publish handed to the client, waiting for the event loop to give it a packet id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Spooled(u64),
    Retained,
    Offline,
}

pub struct Link<S> {
    parts: LinkParts<S>,
    connected: bool,
    session_seq: u64,
    /// The last spool id handed to the client in this connection.
    cursor: u64,
    awaiting_pkid: VecDeque<Sent>,
    in_flight: HashMap<u16, u64>,
    offline_pkid: Option<u16>,
    backoff: Duration,
    failures: u32,
    /// The client refused the last birth or state publish: send both again.
    presence_unsent: bool,
}

enum Step {
    Continue,
    Stop,
}

impl<S: Session> Link<S> {
    pub fn new(parts: LinkParts<S>) -> Link<S> {
        let session_seq = parts.session_seq.get();
        Link {
            parts,
            connected: false,
            session_seq,
            cursor: 0,
            awaiting_pkid: VecDeque::new(),
            in_flight: HashMap::new(),
            offline_pkid: None,
            backoff: BACKOFF_MIN,
            failures: 0,
            presence_unsent: false,
        }
    }

    /// Runs until `cancel`, then drains (bounded) and goes offline cleanly.
    pub async fn run(mut self, cancel: CancellationToken) {
        self.arm_last_will();
        loop {
            let spooled = self.parts.spooled.clone();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = spooled.notified(), if self.connected => self.refill(),
                changed = self.parts.presence.changed(), if self.connected => {
                    if changed.is_ok() {
                        self.publish_presence();
                    }
                }
                event = self.parts.session.poll() => {
                    if let Step::Stop = self.on_event(event, &cancel).await {
                        return;
                    }
                    if self.presence_unsent && self.connected {
                        self.publish_presence();
                    }
                }
            }
        }
        self.drain().await;
    }

    async fn on_event(&mut self, event: Result<Wire, String>, cancel: &CancellationToken) -> Step {
        match event {
            Ok(Wire::Connected) => self.on_connected(),
            Ok(Wire::PacketId(pkid)) => self.on_packet_id(pkid),
            Ok(Wire::Acked(pkid)) => self.on_ack(pkid),
            Ok(Wire::Message { topic, payload }) => {
                if let Some(input) = self.on_message(&topic, payload) {
                    // Back-pressure: while the update task is busy, the link waits (and the
                    // broker holds the rest) instead of dropping chunks.
                    if self.parts.updates.send(input).await.is_err() {
                        tracing::debug!("mqtt: the update task has stopped; message dropped");
                    }
                }
            }
            Ok(Wire::DisconnectSent | Wire::Other) => {}
            Err(error) => return self.on_connection_error(error, cancel).await,
        }
        Step::Continue
    }

    fn on_connected(&mut self) {
        self.session_seq += 1;
        if let Err(e) = self.parts.session_seq.set(self.session_seq) {
            tracing::warn!("{e}");
        }
        if self.failures > 0 {
            tracing::info!(
                "mqtt {}: connected again after {} failed attempts (session {})",
                self.parts.broker,
                self.failures,
                self.session_seq
            );
        } else {
            tracing::info!(
                "mqtt {}: connected (session {})",
                self.parts.broker,
                self.session_seq
            );
        }
        self.connected = true;
        self.failures = 0;
        self.backoff = BACKOFF_MIN;
        let topics = self
            .parts
            .topics
            .cmd()
            .into_iter()
            .chain(self.parts.topics.model_push());
        for topic in topics {
            if let Err(e) = self.parts.session.try_subscribe(topic) {
                tracing::warn!("mqtt: subscribing: {e}");
            }
        }
        self.publish_presence();
        self.refill();
    }

    fn on_packet_id(&mut self, pkid: u16) {
        match self.awaiting_pkid.pop_front() {
            Some(Sent::Spooled(id)) => {
                self.in_flight.insert(pkid, id);
            }
            Some(Sent::Offline) => self.offline_pkid = Some(pkid),
            Some(Sent::Retained) | None => {}
        }
    }

    fn on_ack(&mut self, pkid: u16) {
        self.forget_acknowledged(pkid);
        self.refill();
    }

    /// The broker has the record sent with `pkid`: it leaves the spool.
    fn forget_acknowledged(&mut self, pkid: u16) {
        if let Some(id) = self.in_flight.remove(&pkid) {
            lock(&self.parts.spool).remove(id);
        }
    }

    /// The offline status of session `session_seq`: the Last Will's payload and the one a
    /// clean stop publishes.
    fn offline_payload(&self, session_seq: u64) -> Vec<u8> {
        let death = Death {
            online: false,
            boot_id: self.parts.boot_id.clone(),
            session_seq,
        };
        record::encode(&death, self.parts.encoding)
    }

    /// Handles a command the link owns (`rebirth`); returns what the update task must see.
    fn on_message(&mut self, topic: &str, payload: Vec<u8>) -> Option<Input> {
        if self.parts.topics.model_push().iter().any(|t| t == topic) {
            return Some(Input::Push(payload));
        }
        if !self.parts.topics.cmd().iter().any(|t| t == topic) {
            tracing::warn!("mqtt: message on unexpected topic {topic} ignored");
            return None;
        }
        match wire::decode_command(&payload) {
            Ok(Command::Rebirth) => {
                tracing::info!("cmd on {topic}: rebirth");
                self.publish_presence();
                None
            }
            Ok(command) => {
                tracing::info!("cmd on {topic}: {command:?}");
                Input::from_command(command)
            }
            Err(reason) => {
                tracing::warn!("cmd on {topic}: {reason}; ignored");
                None
            }
        }
    }

    async fn on_connection_error(&mut self, error: String, cancel: &CancellationToken) -> Step {
        let was_connected = self.connected;
        self.connected = false;
        // The spool is the source of truth: forget what the client library would replay and
        // send every unacknowledged record again, in order, from the spool.
        self.parts.session.forget_pending();
        self.awaiting_pkid.clear();
        self.in_flight.clear();
        self.offline_pkid = None;
        self.cursor = 0;
        self.failures += 1;
        let delay = jittered(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if was_connected {
            tracing::warn!(
                "mqtt {}: connection lost: {error}; reconnecting in {:.1} s",
                self.parts.broker,
                delay.as_secs_f64()
            );
        } else {
            tracing::warn!(
                "mqtt {}: cannot connect: {error}; retrying in {:.1} s (attempt {})",
                self.parts.broker,
                delay.as_secs_f64(),
                self.failures
            );
        }
        self.arm_last_will();
        tokio::select! {
            _ = tokio::time::sleep(delay) => Step::Continue,
            _ = cancel.cancelled() => {
                tracing::info!("mqtt: shutting down while disconnected; the spool keeps {} records", lock(&self.parts.spool).len());
                Step::Stop
            }
        }
    }

    /// The will of the next connection: offline, with that connection's session number.
    fn arm_last_will(&mut self) {
        let payload = self.offline_payload(self.session_seq + 1);
        let topic = self.parts.topics.status();
        self.parts.session.set_will(topic, payload);
    }

    /// The retained birth status and model state, both from one snapshot of the presence:
    /// read twice, an update landing between the reads (the updater sets the model and then
    /// the result in two steps) would leave a stale birth retained with no change left to
    /// correct it. A publish the client refused is retried after the next event.
    fn publish_presence(&mut self) {
        let presence = self.parts.presence.borrow_and_update().clone();
        let birth = Birth {
            online: true,
            agent_version: crate::AGENT_VERSION.to_string(),
            boot_id: self.parts.boot_id.clone(),
            session_seq: self.session_seq,
            model: presence.model,
            capabilities: presence.capabilities,
            ts: rfc3339(SystemTime::now()),
        };
        let birth = record::encode(&birth, self.parts.encoding);
        let state = record::encode(&presence.state, self.parts.encoding);
        self.presence_unsent =
            !(self.publish(self.parts.topics.status(), birth, true, Sent::Retained)
                && self.publish(self.parts.topics.model_state(), state, true, Sent::Retained));
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool, sent: Sent) -> bool {
        match self
            .parts
            .session
            .try_publish(topic.clone(), payload, retain)
        {
            Ok(()) => {
                self.awaiting_pkid.push_back(sent);
                true
            }
            Err(e) => {
                tracing::warn!("mqtt: publishing to {topic}: {e}");
                false
            }
        }
    }

    /// Hands spooled records to the client, oldest first, up to the in-flight bound.
    fn refill(&mut self) {
        while self.connected && self.awaiting_pkid.len() + self.in_flight.len() < MAX_IN_FLIGHT {
            let record = {
                let mut spool = lock(&self.parts.spool);
                let Some(id) = spool.next_after(self.cursor) else {
                    return;
                };
                match spool.read(id) {
                    Ok(record) => record,
                    Err(e) => {
                        // A record that cannot be read can never be published: drop it, loudly.
                        tracing::error!("{e}; dropping spool record {id}");
                        spool.remove(id);
                        continue;
                    }
                }
            };
            if !self.publish(
                record.topic,
                record.payload,
                false,
                Sent::Spooled(record.id),
            ) {
                return;
            }
            self.cursor = record.id;
        }
    }

    fn nothing_left(&self) -> bool {
        self.awaiting_pkid.is_empty()
            && self.in_flight.is_empty()
            && lock(&self.parts.spool).next_after(self.cursor).is_none()
    }

    /// Shutdown: flush the spool for at most `drain_timeout`, publish the retained offline
    /// status and wait for its PUBACK, then disconnect. Records left are sent after restart.
    async fn drain(mut self) {
        if !self.connected {
            return;
        }
        let deadline = Instant::now() + self.parts.drain_timeout;
        let mut offline_sent = false;
        loop {
            if !offline_sent && (self.nothing_left() || Instant::now() >= deadline) {
                let payload = self.offline_payload(self.session_seq);
                offline_sent =
                    self.publish(self.parts.topics.status(), payload, true, Sent::Offline);
                if !offline_sent {
                    break;
                }
            }
            let event = tokio::select! {
                event = self.parts.session.poll() => event,
                _ = tokio::time::sleep_until(deadline), if !offline_sent => continue,
                _ = tokio::time::sleep_until(deadline + BACKOFF_MIN), if offline_sent => break,
            };
            match event {
                Ok(Wire::PacketId(pkid)) => self.on_packet_id(pkid),
                Ok(Wire::Acked(pkid)) => {
                    if self.offline_pkid == Some(pkid) {
                        tracing::info!("mqtt: offline status delivered");
                        break;
                    }
                    self.forget_acknowledged(pkid);
                    if !offline_sent {
                        self.refill();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("mqtt: connection lost while shutting down: {e}");
                    return;
                }
            }
        }
        if self.parts.session.try_disconnect().is_ok() {
            // Let the event loop write the DISCONNECT packet, so the broker discards the will.
            let flush = async {
                loop {
                    match self.parts.session.poll().await {
                        Ok(Wire::DisconnectSent) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            let _ = tokio::time::timeout(BACKOFF_MIN, flush).await;
        }
    }
}

fn jittered(delay: Duration) -> Duration {
    let factor = rand::thread_rng().gen_range(1.0 - BACKOFF_JITTER..=1.0 + BACKOFF_JITTER);
    delay.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_jitter_stays_within_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
    }
}
