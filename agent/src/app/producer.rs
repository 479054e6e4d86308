//! Turns each telemetry window into a PLASTER record and spools it: the window's latency,
//! throughput and accuracy from what inference ran, its energy from the sensor sampler,
//! temperatures and throttling from the thermal zones, and the persisted `seq`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Deserialize;
use tokio::sync::{watch, Notify};

use super::engine::{SharedWindow, Window};
use super::serving::Active;
use crate::config::Encoding;
use crate::device;
use crate::inference::Precision;
use crate::lock;
use crate::ota::updater::Learned;
use crate::plaster::accuracy::Top1;
use crate::plaster::energy::EnergyMeter;
use crate::plaster::report::{
    self, Accuracy, DeviceInfo, Learning, ModelInfo, ProgrammabilityReport, Report, Size,
    Throughput,
};
use crate::sensors::thermal;
use crate::telemetry::counter::{CounterError, PersistentCounter};
use crate::telemetry::record::{self, rfc3339, Telemetry};
use crate::telemetry::spool::{Pushed, RecordKind, Spool, SpoolError};

/// The daemon's scenario name in `throughput.scenario`: whatever load arrived in the window.
pub const LIVE_SCENARIO: &str = "live";

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Counter(#[from] CounterError),
}

/// The parts of every record that change only when the model does.
struct Fixed {
    device: DeviceInfo,
    model: ModelInfo,
    programmability: ProgrammabilityReport,
    file_bytes: u64,
    parameters: u64,
    flops_per_inference: Option<u64>,
    batch: usize,
    precision: Precision,
    accuracy_at_load: Option<Accuracy>,
    active_since: SystemTime,
}

impl Fixed {
    fn of(device_id: &str, active: &Active) -> Fixed {
        let engine = &active.engine;
        let prepared = &engine.prepared;
        Fixed {
            device: DeviceInfo {
                id: device_id.to_string(),
                arch: std::env::consts::ARCH.to_string(),
                runtime: prepared.runtime().as_str().to_string(),
                threads: prepared.options().threads,
            },
            model: ModelInfo {
                name: active.name().to_string(),
                version: active.version(),
                sha256: engine.model.sha256.clone(),
                format: "onnx".to_string(),
            },
            programmability: prepared.programmability().into(),
            file_bytes: engine.model.file_bytes,
            parameters: prepared.parameters(),
            flops_per_inference: prepared.flops_per_inference(),
            batch: prepared.batch(),
            precision: prepared.precision(),
            accuracy_at_load: engine.accuracy_at_load.clone(),
            active_since: active.activated_at,
        }
    }
}

/// The PLASTER report of a model just activated, before any window ran: its fixed figures and
/// the accuracy measured at load (an update's `activated` event carries it).
pub fn model_report(device_id: &str, active: &Active, learning: Learning) -> Report {
    let fixed = Fixed::of(device_id, active);
    let energy = crate::plaster::energy::EnergyReport::unavailable(
        "not measured during validation (telemetry reports it per window)",
    );
    report_of(&fixed, &Window::default(), 0.0, energy, learning)
}

pub struct Producer {
    device_id: String,
    fixed: Fixed,
    active: watch::Receiver<Arc<Active>>,
    learned: Arc<Mutex<Learned>>,
    window: SharedWindow,
    window_started: Instant,
    meter: Box<dyn EnergyMeter>,
    sysfs_root: PathBuf,
    seq: PersistentCounter,
    /// The next record's seq. Kept in memory too: on a full disk the counter file cannot be
    /// rewritten, and the sequence must still advance (the dropped records are its gaps).
    next_seq: u64,
    spool: Arc<Mutex<Spool>>,
    spooled: Arc<Notify>,
    last: watch::Sender<Option<Arc<Telemetry>>>,
    topic: String,
    encoding: Encoding,
}

/// What a spooled telemetry record says about its own sequence number.
#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

pub struct ProducerParts {
    pub device_id: String,
    /// The model that runs (an update replaces it).
    pub active: watch::Receiver<Arc<Active>>,
    pub learned: Arc<Mutex<Learned>>,
    pub window: SharedWindow,
    pub meter: Box<dyn EnergyMeter>,
    pub sysfs_root: PathBuf,
    pub seq: PersistentCounter,
    pub spool: Arc<Mutex<Spool>>,
    pub spooled: Arc<Notify>,
    /// Each record, once spooled, for the local API's `/metrics`.
    pub last: watch::Sender<Option<Arc<Telemetry>>>,
    pub topic: String,
    pub encoding: Encoding,
}

impl Producer {
    /// Starts the first window now. The sequence continues from the persisted counter, or from
    /// the newest spooled record if the agent died between spooling it and saving the counter.
    pub fn new(mut parts: ProducerParts) -> Result<Producer, ProducerError> {
        let newest_spooled = newest_spooled_seq(&lock(&parts.spool), &parts.topic);
        if let Some(seq) = newest_spooled.filter(|&s| s > parts.seq.get()) {
            tracing::info!("telemetry seq continues after spooled record {seq}");
            parts.seq.set(seq)?;
        }
        let fixed = Fixed::of(&parts.device_id, &parts.active.borrow_and_update());
        parts.meter.start_window();
        Ok(Producer {
            device_id: parts.device_id,
            fixed,
            active: parts.active,
            learned: parts.learned,
            window: parts.window,
            window_started: Instant::now(),
            meter: parts.meter,
            sysfs_root: parts.sysfs_root,
            next_seq: parts.seq.get() + 1,
            seq: parts.seq,
            spool: parts.spool,
            spooled: parts.spooled,
            last: parts.last,
            topic: parts.topic,
            encoding: parts.encoding,
        })
    }

    /// Each record, as it is spooled (the update task's canary reads them).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Telemetry>>> {
        self.last.subscribe()
    }

    /// Closes the current window, spools its record and opens the next. Blocking (sensor and
    /// thermal reads, fsync): run it on a blocking thread. Returns the record's `seq`, or
    /// `None` when the full spool had no room for it (counted in `spool_dropped`).
    pub fn tick(&mut self) -> Result<Option<u64>, ProducerError> {
        let window = std::mem::take(&mut *lock(&self.window));
        if self.active.has_changed().unwrap_or(false) {
            self.fixed = Fixed::of(&self.device_id, &self.active.borrow_and_update());
        }
        let now = Instant::now();
        let window_s = (now - self.window_started).as_secs_f64();
        self.window_started = now;
        let energy = self.meter.continue_window(window.inferences);
        let zones = thermal::read_zones(&self.sysfs_root);
        let mut temperatures_c = BTreeMap::new();
        for zone in &zones {
            if let Some(t) = zone.temp_c {
                let mut name = zone.zone.clone();
                let mut n = 2;
                while temperatures_c.contains_key(&name) {
                    name = format!("{}-{n}", zone.zone);
                    n += 1;
                }
                temperatures_c.insert(name, t);
            }
        }
        let report = self.report(&window, window_s, energy);
        let mut spool = lock(&self.spool);
        let seq = self.next_seq;
        let telemetry = Telemetry {
            report,
            seq,
            ts: rfc3339(SystemTime::now()),
            window_s,
            temperatures_c,
            throttled: zones.iter().any(|z| z.throttled()),
            spool_dropped: spool.dropped(),
        };
        let payload = record::encode(&telemetry, self.encoding);
        let pushed = spool.push(RecordKind::Telemetry, &self.topic, &payload)?;
        // The sequence advances even for a dropped record: its seq is the visible gap.
        self.next_seq += 1;
        if let Err(e) = self.seq.set(seq) {
            tracing::warn!("{e}; the sequence continues in memory");
        }
        drop(spool);
        self.spooled.notify_one();
        self.last.send_replace(Some(Arc::new(telemetry)));
        Ok(match pushed {
            Pushed::Stored(_) => Some(seq),
            Pushed::Dropped => None,
        })
    }

    fn report(
        &self,
        window: &Window,
        window_s: f64,
        energy: crate::plaster::energy::EnergyReport,
    ) -> Report {
        let learning = lock(&self.learned).report(self.fixed.active_since);
        report_of(&self.fixed, window, window_s, energy, learning)
    }
}

fn report_of(
    fixed: &Fixed,
    window: &Window,
    window_s: f64,
    energy: crate::plaster::energy::EnergyReport,
    learning: Learning,
) -> Report {
    {
        let accuracy = if window.labelled > 0 {
            let hits = Top1 {
                correct: window.correct as usize,
                samples: window.labelled as usize,
            };
            Some(Accuracy::top1(hits, fixed.precision, None))
        } else {
            fixed.accuracy_at_load.clone()
        };
        Report {
            schema: report::SCHEMA.to_string(),
            device: fixed.device.clone(),
            model: fixed.model.clone(),
            programmability: fixed.programmability.clone(),
            latency_ms: window.latency.summary(),
            accuracy,
            size: Size {
                file_bytes: fixed.file_bytes,
                parameters: fixed.parameters,
                flops_per_inference: fixed.flops_per_inference,
                peak_rss_bytes: device::peak_rss_bytes(),
            },
            throughput: Throughput {
                scenario: LIVE_SCENARIO.to_string(),
                inferences_per_s: if window_s > 0.0 {
                    window.inferences as f64 / window_s
                } else {
                    0.0
                },
                batch: fixed.batch,
                duration_s: window_s,
                target_qps: None,
                latency_bound_ms: None,
                bound_met: None,
                valid: None,
            },
            energy,
            learning,
            profile: None,
            outputs_vs_cpu: None,
        }
    }
}

/// The `seq` of the newest telemetry record in the spool, in either encoding.
fn newest_spooled_seq(spool: &Spool, topic: &str) -> Option<u64> {
    spool.ids().into_iter().rev().find_map(|id| {
        let record = spool.read(id).ok()?;
        if record.kind != RecordKind::Telemetry || record.topic != topic {
            return None;
        }
        record::decode::<SeqOnly>(&record.payload, record::encoding_of(&record.payload))
            .ok()
            .map(|s| s.seq)
    })
}
