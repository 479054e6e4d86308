//! `plaster-agent watch --broker URL --fleet F`: a live table of every device of a fleet,
//! built from the retained status messages and the telemetry as it arrives.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde::Deserialize;

use crate::config::BrokerUrl;
use crate::mqtt::options::{MqttError, REQUEST_CHANNEL_CAPACITY};
use crate::mqtt::topics::Topics;
use crate::telemetry::record::{self, ModelRef, Telemetry, UpdateEvent};

/// A dashboard reconnects quickly: it holds no state a retry could disturb.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// The broker: mqtt://HOST:PORT or mqtts://HOST:PORT
    #[arg(long, value_name = "URL", value_parser = BrokerUrl::parse)]
    pub broker: BrokerUrl,
    /// The fleet to watch (the topic level plaster/v1/<fleet>/...)
    #[arg(long, value_name = "F")]
    pub fleet: String,
    #[command(flatten)]
    pub login: super::BrokerLogin,
    /// Stop after this many messages (for scripts); by default run until interrupted
    #[arg(long, value_name = "N")]
    pub updates: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error("writing to stdout: {0}")]
    Output(std::io::Error),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What the table shows of one device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceRow {
    pub online: Option<bool>,
    pub session_seq: Option<u64>,
    pub model: Option<ModelRef>,
    pub telemetry: Option<Telemetry>,
    pub last_seq: Option<u64>,
    /// Telemetry records never seen: the sum of the jumps in `seq`.
    pub seq_gaps: u64,
    /// The last model update event: `v3 activated`, `v4 rejected: <reason>`.
    pub update: Option<String>,
    pub problem: Option<String>,
}

/// The fleet as the messages so far describe it.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    pub devices: BTreeMap<String, DeviceRow>,
}

/// A status message is a birth or a Last Will; both carry `online` and `session_seq`.
#[derive(Deserialize)]
struct Status {
    online: bool,
    session_seq: Option<u64>,
    model: Option<ModelRef>,
}

impl Fleet {
    /// Applies one message from `plaster/v1/<fleet>/<device>/{status,telemetry,model/events}`.
    pub fn apply(&mut self, topic: &str, payload: &[u8]) {
        let levels: Vec<&str> = topic.split('/').collect();
        let (Some(device), Some(kind)) = (levels.get(3), levels.get(4)) else {
            return;
        };
        let row = self.devices.entry(device.to_string()).or_default();
        if payload.is_empty() {
            // A cleared retained status: the device was decommissioned.
            return;
        }
        match *kind {
            "status" => match decode_any::<Status>(payload) {
                Ok(status) => {
                    row.online = Some(status.online);
                    row.session_seq = status.session_seq.or(row.session_seq);
                    if status.model.is_some() {
                        row.model = status.model;
                    }
                    row.problem = None;
                }
                Err(e) => row.problem = Some(format!("status: {e}")),
            },
            "telemetry" => match decode_any::<Telemetry>(payload) {
                Ok(telemetry) => {
                    if let Some(last) = row.last_seq {
                        if telemetry.seq > last + 1 {
                            row.seq_gaps += telemetry.seq - last - 1;
                        }
                    }
                    row.last_seq =
                        Some(row.last_seq.map_or(telemetry.seq, |l| l.max(telemetry.seq)));
                    row.telemetry = Some(telemetry);
                    row.problem = None;
                }
                Err(e) => row.problem = Some(format!("telemetry: {e}")),
            },
            "model" if levels.get(5) == Some(&"events") => match decode_any::<UpdateEvent>(payload)
            {
                Ok(event) => {
                    let reason = event.reason.map(|r| format!(": {r}")).unwrap_or_default();
                    row.update = Some(format!("v{} {}{reason}", event.version, event.state));
                }
                Err(e) => row.problem = Some(format!("model/events: {e}")),
            },
            _ => {}
        }
    }

    pub fn render(&self) -> String {
        let mut table = super::table(vec![
            "device", "status", "model", "p50 ms", "p90 ms", "inf/s", "top-1", "J/inf", "battery",
            "temp °C", "seq", "gaps", "update",
        ]);
        for (id, row) in &self.devices {
            let t = row.telemetry.as_ref();
            let model = row
                .model
                .as_ref()
                .map(|m| {
                    let version = m.version.map(|v| format!(" v{v}")).unwrap_or_default();
                    format!("{}{version} {}", m.name, &m.sha256[..m.sha256.len().min(8)])
                })
                .or_else(|| t.map(|t| t.report.model.name.clone()))
                .unwrap_or_else(|| "-".into());
            let ms = |v: Option<f64>| v.map(super::scorecard::sig).unwrap_or_else(|| "-".into());
            let status = match (row.online, &row.problem) {
                (_, Some(problem)) => format!("bad message: {problem}"),
                (Some(true), None) => "online".into(),
                (Some(false), None) => "offline".into(),
                (None, None) => "?".into(),
            };
            table.add_row(vec![
                id.clone(),
                status,
                model,
                ms(t.and_then(|t| t.report.latency_ms.p50)),
                ms(t.and_then(|t| t.report.latency_ms.p90)),
                t.map(|t| format!("{:.1}", t.report.throughput.inferences_per_s))
                    .unwrap_or_else(|| "-".into()),
                t.and_then(|t| t.report.accuracy.as_ref())
                    .map(|a| format!("{:.2}%", a.value * 100.0))
                    .unwrap_or_else(|| "-".into()),
                t.and_then(|t| t.report.energy.joules_per_inference)
                    .map(super::scorecard::sig)
                    .unwrap_or_else(|| "-".into()),
                t.and_then(|t| t.report.energy.battery.as_ref())
                    .map(|b| format!("{:.0}% {}", b.percent, b.status))
                    .unwrap_or_else(|| "-".into()),
                t.and_then(|t| {
                    t.temperatures_c
                        .values()
                        .copied()
                        .fold(None, |max: Option<f64>, v| {
                            Some(max.map_or(v, |m| m.max(v)))
                        })
                        .map(|max| {
                            format!("{max:.1}{}", if t.throttled { " throttled" } else { "" })
                        })
                })
                .unwrap_or_else(|| "-".into()),
                row.last_seq
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                row.seq_gaps.to_string(),
                row.update.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        format!("{table}\n")
    }
}

/// Payloads are CBOR unless the fleet is configured for JSON; a dashboard reads both.
fn decode_any<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, String> {
    record::decode(payload, record::encoding_of(payload))
}

pub fn run(args: &WatchArgs) -> Result<(), WatchError> {
    let connection = args.login.connection();
    let client_id = format!("plaster-watch-{}", hex::encode(rand::random::<[u8; 6]>()));
    let options = connection.options(&args.broker, &client_id, Duration::from_secs(30), true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WatchError::Runtime)?;
    runtime.block_on(async {
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        let terminal = std::io::stdout().is_terminal();
        let mut fleet = Fleet::default();
        let mut seen = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    eprintln!("watching fleet {} on {}", args.fleet, args.broker);
                    for topic in Topics::fleet_wildcard(&args.fleet) {
                        if let Err(e) = client.try_subscribe(topic, QoS::AtLeastOnce) {
                            eprintln!("error: subscribing: {e}");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    fleet.apply(&publish.topic, &publish.payload);
                    let text = if terminal {
                        format!("\x1b[2J\x1b[H{}", fleet.render())
                    } else {
                        format!("{}\n", fleet.render())
                    };
                    super::write_stdout(&text).map_err(WatchError::Output)?;
                    seen += 1;
                    if args.updates.is_some_and(|n| seen >= n) {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!(
                        "error: mqtt {}: {e}; retrying in {} s",
                        args.broker,
                        RETRY.as_secs()
                    );
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Encoding;
    use crate::telemetry::record::{encode, Death};

    #[test]
    fn status_messages_and_bad_payloads() {
        let mut fleet = Fleet::default();
        let death = Death {
            online: false,
            boot_id: "b".into(),
            session_seq: 4,
        };
        fleet.apply(
            "plaster/v1/lab/jetson-1/status",
            &encode(&death, Encoding::Cbor),
        );
        fleet.apply("plaster/v1/lab/jetson-2/telemetry", b"\x00garbage");
        let one = &fleet.devices["jetson-1"];
        assert_eq!((one.online, one.session_seq), (Some(false), Some(4)));
        assert!(fleet.devices["jetson-2"]
            .problem
            .as_deref()
            .unwrap()
            .starts_with("telemetry: not a CBOR payload of this type"));
        let event = UpdateEvent {
            transfer_id: [1; 16],
            version: 4,
            state: "rejected".into(),
            reason: Some("sha256 mismatch".into()),
            missing: None,
            ts: "2026-11-27T00:00:00.000Z".into(),
            metrics: None,
        };
        fleet.apply(
            "plaster/v1/lab/jetson-1/model/events",
            &encode(&event, Encoding::Cbor),
        );
        assert_eq!(
            fleet.devices["jetson-1"].update.as_deref(),
            Some("v4 rejected: sha256 mismatch")
        );
        let text = fleet.render();
        assert!(
            text.contains("jetson-1") && text.contains("offline") && text.contains("v4 rejected"),
            "{text}"
        );
    }
}
