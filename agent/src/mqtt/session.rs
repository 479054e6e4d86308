//! One face for rumqttc's MQTT 3.1.1 and MQTT 5 clients, so the link's logic (spool draining,
//! PUBACK tracking, birth and will, backoff) is written once. Only what the link needs.

use std::future::Future;
use std::time::Duration;

use rumqttc::{Outgoing, QoS};

use super::options::{Connection, MqttError, MAX_INCOMING_PACKET, REQUEST_CHANNEL_CAPACITY};
use crate::config::{BrokerUrl, MqttVersion};

/// What the event loop reported, in the link's terms.
#[derive(Debug)]
pub enum Wire {
    /// CONNACK: a new connection is up.
    Connected,
    /// A publish handed to the client went out with this packet id.
    PacketId(u16),
    /// The broker acknowledged the publish with this packet id.
    Acked(u16),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// Our DISCONNECT was written.
    DisconnectSent,
    Other,
}

/// An MQTT client session: the client handle and its event loop, owned by one task.
pub trait Session: Send + 'static {
    fn poll(&mut self) -> impl Future<Output = Result<Wire, String>> + Send;
    fn try_publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), String>;
    fn try_subscribe(&self, topic: String) -> Result<(), String>;
    fn try_disconnect(&self) -> Result<(), String>;
    /// The Last Will of the next connection (QoS 1, retained).
    fn set_will(&mut self, topic: String, payload: Vec<u8>);
    /// Forgets what the library would replay after a reconnect: the link's spool re-sends.
    fn forget_pending(&mut self);
}

/// MQTT 3.1.1.
pub struct V311 {
    client: rumqttc::AsyncClient,
    eventloop: rumqttc::EventLoop,
}

/// MQTT 5.
pub struct V5 {
    client: rumqttc::v5::AsyncClient,
    eventloop: rumqttc::v5::EventLoop,
}

/// Either protocol, as configured.
pub enum AnySession {
    V311(Box<V311>),
    V5(Box<V5>),
}

impl Connection {
    /// A session to `url` as `client_id`: persistent unless `clean` (MQTT 5: a session that
    /// never expires, so subscriptions survive reconnects as in 3.1.1).
    pub fn session(
        &self,
        url: &BrokerUrl,
        client_id: &str,
        keep_alive: Duration,
        clean: bool,
        version: MqttVersion,
    ) -> Result<AnySession, MqttError> {
        let v311 = self.options(url, client_id, keep_alive, clean)?;
        Ok(match version {
            MqttVersion::V311 => {
                let (client, eventloop) = rumqttc::AsyncClient::new(v311, REQUEST_CHANNEL_CAPACITY);
                AnySession::V311(Box::new(V311 { client, eventloop }))
            }
            MqttVersion::V5 => {
                let mut options = rumqttc::v5::MqttOptions::new(client_id, &url.host, url.port);
                options
                    .set_keep_alive(keep_alive)
                    .set_clean_start(clean)
                    .set_session_expiry_interval((!clean).then_some(u32::MAX))
                    .set_max_packet_size(Some(MAX_INCOMING_PACKET as u32))
                    .set_request_channel_capacity(REQUEST_CHANNEL_CAPACITY)
                    .set_transport(v311.transport());
                if let Some(login) = v311.credentials() {
                    options.set_credentials(login.username, login.password);
                }
                let (client, eventloop) =
                    rumqttc::v5::AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
                AnySession::V5(Box::new(V5 { client, eventloop }))
            }
        })
    }
}

impl Session for V311 {
    async fn poll(&mut self) -> Result<Wire, String> {
        use rumqttc::{Event, Packet};
        Ok(
            match self.eventloop.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(Packet::ConnAck(_)) => Wire::Connected,
                Event::Incoming(Packet::PubAck(ack)) => Wire::Acked(ack.pkid),
                Event::Incoming(Packet::Publish(p)) => Wire::Message {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                },
                Event::Outgoing(Outgoing::Publish(pkid)) => Wire::PacketId(pkid),
                Event::Outgoing(Outgoing::Disconnect) => Wire::DisconnectSent,
                _ => Wire::Other,
            },
        )
    }

    fn try_publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|e| e.to_string())
    }

    fn try_subscribe(&self, topic: String) -> Result<(), String> {
        self.client
            .try_subscribe(topic, QoS::AtLeastOnce)
            .map_err(|e| e.to_string())
    }

    fn try_disconnect(&self) -> Result<(), String> {
        self.client.try_disconnect().map_err(|e| e.to_string())
    }

    fn set_will(&mut self, topic: String, payload: Vec<u8>) {
        self.eventloop
            .mqtt_options
            .set_last_will(rumqttc::LastWill::new(
                topic,
                payload,
                QoS::AtLeastOnce,
                true,
            ));
    }

    fn forget_pending(&mut self) {
        self.eventloop.pending.clear();
    }
}

impl Session for V5 {
    async fn poll(&mut self) -> Result<Wire, String> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::Event;
        Ok(
            match self.eventloop.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(Packet::ConnAck(_)) => Wire::Connected,
                Event::Incoming(Packet::PubAck(ack)) => Wire::Acked(ack.pkid),
                Event::Incoming(Packet::Publish(p)) => Wire::Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.to_vec(),
                },
                Event::Outgoing(Outgoing::Publish(pkid)) => Wire::PacketId(pkid),
                Event::Outgoing(Outgoing::Disconnect) => Wire::DisconnectSent,
                _ => Wire::Other,
            },
        )
    }

    fn try_publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        self.client
            .try_publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                retain,
                payload,
            )
            .map_err(|e| e.to_string())
    }

    fn try_subscribe(&self, topic: String) -> Result<(), String> {
        self.client
            .try_subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .map_err(|e| e.to_string())
    }

    fn try_disconnect(&self) -> Result<(), String> {
        self.client.try_disconnect().map_err(|e| e.to_string())
    }

    fn set_will(&mut self, topic: String, payload: Vec<u8>) {
        self.eventloop
            .options
            .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                topic,
                payload,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                None,
            ));
    }

    fn forget_pending(&mut self) {
        self.eventloop.pending.clear();
    }
}
