//! A plain MQTT client for tests (rumqttc's blocking API on its own thread): subscribes on every
//! connection, hands messages over a channel, and decodes payloads generically (a CBOR map
//! read as JSON values), the way any outside client would read them.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Message {
    /// The payload as a JSON value: CBOR maps decode to the same value JSON would.
    pub fn value(&self) -> serde_json::Value {
        if self.payload.first() == Some(&b'{') {
            serde_json::from_slice(&self.payload).expect("JSON payload")
        } else {
            let value: ciborium::Value = ciborium::from_reader(self.payload.as_slice())
                .unwrap_or_else(|e| {
                    panic!(
                        "payload on {} is not CBOR ({e}): {}",
                        self.topic,
                        hex::encode(&self.payload)
                    )
                });
            cbor_to_json(value)
        }
    }
}

/// A CBOR value as JSON: byte strings (transfer ids) become arrays of numbers.
pub fn cbor_to_json(value: ciborium::Value) -> serde_json::Value {
    use ciborium::Value as C;
    use serde_json::Value as J;
    match value {
        C::Bytes(bytes) => J::Array(bytes.into_iter().map(J::from).collect()),
        C::Array(items) => J::Array(items.into_iter().map(cbor_to_json).collect()),
        C::Map(entries) => J::Object(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        C::Text(t) => t,
                        other => format!("{other:?}"),
                    };
                    (key, cbor_to_json(v))
                })
                .collect(),
        ),
        C::Tag(_, inner) => cbor_to_json(*inner),
        C::Integer(i) => {
            let i = i128::from(i);
            u64::try_from(i)
                .map(J::from)
                .or_else(|_| i64::try_from(i).map(J::from))
                .unwrap_or(J::Null)
        }
        C::Float(f) => J::from(f),
        C::Text(t) => J::String(t),
        C::Bool(b) => J::Bool(b),
        _ => J::Null,
    }
}

pub struct Subscriber {
    pub client: Client,
    messages: mpsc::Receiver<Message>,
    /// Everything received so far, for failure messages.
    seen: std::cell::RefCell<Vec<String>>,
}

impl Subscriber {
    /// Connects to the broker on `port` as `client_id` (a persistent session unless `clean`)
    /// and returns once `filters` are subscribed.
    pub fn connect(port: u16, client_id: &str, clean: bool, filters: &[&str]) -> Subscriber {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(clean)
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(options, 64);
        let (tx, messages) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        let subscriber = client.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for filter in &filters {
                            let _ = subscriber.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let message = Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        };
                        if tx.send(message).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    // The broker is down (a test stopped it): retry at a modest pace.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(20))
            .expect("test subscriber connected and subscribed");
        Subscriber {
            client,
            messages,
            seen: Default::default(),
        }
    }

    /// The next message matching `wanted`, failing the test after `timeout` with what came.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        wanted: impl FnMut(&Message) -> bool,
    ) -> Message {
        self.try_wait_for(timeout, wanted).unwrap_or_else(|_| {
            panic!(
                "no {what} within {timeout:?}; received: {:#?}",
                self.seen.borrow()
            )
        })
    }

    /// The next message matching `wanted`, or after `timeout` the messages that did not match.
    pub fn try_wait_for(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&Message) -> bool,
    ) -> Result<Message, Vec<Message>> {
        let deadline = Instant::now() + timeout;
        let mut unmatched = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(message) => {
                    self.seen.borrow_mut().push(format!(
                        "{} ({} B)",
                        message.topic,
                        message.payload.len()
                    ));
                    if wanted(&message) {
                        return Ok(message);
                    }
                    unmatched.push(message);
                }
                Err(_) => return Err(unmatched),
            }
        }
    }

    pub fn disconnect(self) {
        let _ = self.client.disconnect();
    }
}

/// Publishes one message from a short-lived client and waits for the broker's PUBACK.
pub fn publish(port: u16, topic: &str, payload: Vec<u8>, retain: bool) {
    let client_id = format!("test-pub-{}", hex::encode(rand_bytes()));
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut connection) = Client::new(options, 8);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .expect("queue publish");
    for event in connection.iter() {
        match event.expect("test publisher connection") {
            Event::Incoming(Packet::PubAck(_)) => break,
            _ => continue,
        }
    }
    let _ = client.disconnect();
}

fn rand_bytes() -> [u8; 6] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let pid = std::process::id();
    let mut out = [0u8; 6];
    out[..4].copy_from_slice(&nanos.to_le_bytes());
    out[4..].copy_from_slice(&(pid as u16).to_le_bytes());
    out
}
