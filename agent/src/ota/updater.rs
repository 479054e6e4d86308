//! The update task: one transfer at a time, each step published on `P/model/events` (through
//! the spool, so events survive a broker outage and are never dropped), the retained model
//! state kept current, and the PLASTER learning figures counted and persisted.
//!
//! Policy for a manifest that arrives while a transfer is in progress: a newer version, or the
//! same bundle pushed again under a new transfer id, supersedes it (the old transfer is
//! rejected as superseded); any other manifest is refused as busy. The same manifest again
//! (same transfer id) is answered with what is missing.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::bundle::{self, write_synced};
use super::store::{Installed, Release, Store};
use super::transfer::{hex_id, ChunkOutcome, Transfer};
use super::wire::{self, Chunk, Command, PushMessage, SignedManifest, TransferId};
use super::{crash_point, TrustedKeys, UpdateError};
use crate::app::serving::{load_engine, Active, Serving};
use crate::config::{Config, Encoding};
use crate::lock;
use crate::mqtt::link::Presence;
use crate::plaster::report::{Learning, Report};
use crate::telemetry::record::{self, rfc3339, ActiveModel, ModelRef, Telemetry, UpdateEvent};
use crate::telemetry::spool::{RecordKind, Spool};

/// How often pauses, deadlines and the canary are looked at.
const TICK: Duration = Duration::from_millis(250);
/// Chunks of ended transfers still arriving (QoS 1 redelivery) are ignored quietly.
const REMEMBER_ENDED: usize = 32;
/// The canary rolls back after this many consecutive windows past a limit (one noisy window
/// is not a regression).
const CANARY_STRIKES: u32 = 2;
/// Telemetry windows of the previous version kept as the canary's baseline.
const BASELINE_WINDOWS: usize = 5;
/// The optional latency gate times each model for at least this many runs and this long
/// (and at most `GATE_MAX_RUNS`), one after the other on the same inputs.
const GATE_MIN_RUNS: u32 = 20;
const GATE_MIN_TIME: Duration = Duration::from_millis(300);
const GATE_MAX_RUNS: u32 = 1000;

/// What the MQTT link hands the updater.
#[derive(Debug)]
pub enum Input {
    /// A message from a push topic, undecoded.
    Push(Vec<u8>),
    /// A decoded `rollback` command.
    Rollback {
        version: u64,
        signature: [u8; 64],
        key_id: String,
    },
}

impl Input {
    /// The updater's input for a command, or `None` for commands the link handles.
    pub fn from_command(command: Command) -> Option<Input> {
        match command {
            Command::Rollback {
                version,
                signature,
                key_id,
            } => Some(Input::Rollback {
                version,
                signature,
                key_id,
            }),
            Command::Rebirth => None,
        }
    }
}

/// The learning figures that persist across restarts (`state_dir/ota/learning.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Learned {
    pub updates_ok: u64,
    pub updates_rejected: u64,
    pub rollbacks: u64,
    pub push_to_active_s: Option<f64>,
}

impl Learned {
    pub fn load(state_dir: &std::path::Path) -> Learned {
        std::fs::read(state_dir.join("ota").join("learning.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The report's `learning` section for a model active since `active_since`.
    pub fn report(&self, active_since: SystemTime) -> Learning {
        Learning {
            status: "measured".to_string(),
            active_since: Some(rfc3339(active_since)),
            push_to_active_s: self.push_to_active_s,
            updates_ok: self.updates_ok,
            updates_rejected: self.updates_rejected,
            rollbacks: self.rollbacks,
        }
    }
}

/// Everything the updater needs.
pub struct UpdaterParts {
    pub config: Config,
    pub store: Store,
    pub serving: Arc<Serving>,
    pub presence: watch::Sender<Presence>,
    pub learned: Arc<Mutex<Learned>>,
    pub spool: Arc<Mutex<Spool>>,
    pub spooled: Arc<Notify>,
    pub events_topic: String,
    pub encoding: Encoding,
    /// Each telemetry record: the canary's figures.
    pub telemetry: watch::Receiver<Option<Arc<Telemetry>>>,
}

/// A version on probation after activation.
struct Canary {
    until: Instant,
    transfer_id: TransferId,
    version: u64,
    /// The previous version's median p90 and joules per inference.
    baseline_p90_ms: Option<f64>,
    baseline_joules: Option<f64>,
    /// Telemetry windows seen since activation (the first straddles the swap and is skipped).
    windows: u32,
    strikes: u32,
    failures_at_start: (u64, u64),
}

pub struct Updater {
    parts: UpdaterParts,
    keys: TrustedKeys,
    transfers_dir: PathBuf,
    transfer: Option<Transfer>,
    /// When the current transfer last made progress (or was reported as paused).
    last_progress: Instant,
    ended: VecDeque<TransferId>,
    baseline: VecDeque<Arc<Telemetry>>,
    canary: Option<Canary>,
}

impl Updater {
    pub fn new(parts: UpdaterParts) -> std::io::Result<Updater> {
        let transfers_dir = parts.config.state_dir.join("ota").join("transfers");
        std::fs::create_dir_all(&transfers_dir)?;
        Ok(Updater {
            keys: TrustedKeys::from_config(&parts.config.ota.trusted_keys),
            parts,
            transfers_dir,
            transfer: None,
            last_progress: Instant::now(),
            ended: VecDeque::new(),
            baseline: VecDeque::new(),
            canary: None,
        })
    }

    /// Runs until `cancel` or until the link drops its sender.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>, cancel: CancellationToken) {
        self.resume().await;
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                input = inputs.recv() => match input {
                    Some(Input::Push(bytes)) => self.on_push(&bytes).await,
                    Some(Input::Rollback { version, signature, key_id }) => {
                        self.on_rollback_command(version, &signature, &key_id).await
                    }
                    None => break,
                },
                _ = ticks.tick() => self.on_tick().await,
                changed = self.parts.telemetry.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let record = self.parts.telemetry.borrow_and_update().clone();
                    if let Some(record) = record {
                        self.on_telemetry(record).await;
                    }
                }
            }
        }
    }

    fn active(&self) -> Arc<Active> {
        self.parts.serving.active_tx.borrow().clone()
    }

    fn event(
        &self,
        transfer_id: TransferId,
        version: u64,
        state: &str,
        reason: Option<String>,
        missing: Option<Vec<[u64; 2]>>,
        metrics: Option<Report>,
    ) -> UpdateEvent {
        UpdateEvent {
            transfer_id,
            version,
            state: state.to_string(),
            reason,
            missing,
            ts: rfc3339(SystemTime::now()),
            metrics,
        }
    }

    /// Spools an event for `P/model/events`; final ones also become the retained state's
    /// `last_result`.
    fn publish(&self, event: UpdateEvent) {
        tracing::info!(
            "update {} v{}: {}{}",
            hex_id(&event.transfer_id),
            event.version,
            event.state,
            event
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        let payload = record::encode(&event, self.parts.encoding);
        if let Err(e) =
            lock(&self.parts.spool).push(RecordKind::Event, &self.parts.events_topic, &payload)
        {
            tracing::error!("update event not spooled: {e}");
        }
        self.parts.spooled.notify_one();
        if matches!(
            event.state.as_str(),
            "activated" | "rejected" | "rolled_back"
        ) {
            self.parts
                .presence
                .send_modify(|p| p.state.last_result = Some(event));
        }
    }

    /// A `rejected` event that counts no update (a refused command, a failed rollback).
    fn refuse(
        &self,
        transfer_id: TransferId,
        version: u64,
        reason: String,
        metrics: Option<Report>,
    ) {
        self.publish(self.event(
            transfer_id,
            version,
            "rejected",
            Some(reason),
            None,
            metrics,
        ));
    }

    fn save_learned(&self, edit: impl FnOnce(&mut Learned)) {
        let mut learned = lock(&self.parts.learned);
        edit(&mut learned);
        let json = serde_json::to_vec(&*learned).expect("learning serializes");
        if let Err(e) = write_synced(
            &self
                .parts
                .config
                .state_dir
                .join("ota")
                .join("learning.json"),
            &json,
        ) {
            tracing::warn!("learning figures not saved: {e}");
        }
    }

    fn reject(&mut self, transfer_id: TransferId, version: u64, error: &UpdateError) {
        self.save_learned(|l| l.updates_rejected += 1);
        self.refuse(transfer_id, version, error.to_string(), None);
        self.remember_ended(transfer_id);
    }

    fn remember_ended(&mut self, id: TransferId) {
        self.ended.push_back(id);
        if self.ended.len() > REMEMBER_ENDED {
            self.ended.pop_front();
        }
    }

    /// After a restart: every staged transfer reports what it still lacks (or finishes).
    async fn resume(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.transfers_dir) else {
            return;
        };
        let mut staged: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        staged.sort();
        for dir in staged {
            match Transfer::reopen(&dir, self.parts.config.ota.max_bundle_bytes) {
                Ok((transfer, signed)) => {
                    if self.transfer.is_some() {
                        // Only one transfer at a time; an older leftover goes.
                        self.end_transfer_with(transfer, "superseded while the agent was down");
                        continue;
                    }
                    if let Err(e) =
                        self.keys
                            .verify(&signed.key_id, &signed.manifest, &signed.signature)
                    {
                        let (id, version) = (transfer.id, transfer.manifest.version);
                        transfer.remove();
                        self.reject(id, version, &e);
                        continue;
                    }
                    let active = self.active();
                    if active.release.as_ref().is_some_and(|r| {
                        r.version == transfer.manifest.version
                            && r.bundle_sha256 == hex::encode(transfer.manifest.sha256)
                    }) {
                        // The agent stopped after activating but before saying so.
                        let (id, version) = (transfer.id, transfer.manifest.version);
                        let push_to_active_s = active
                            .activated_at
                            .duration_since(transfer.started)
                            .map(|d| d.as_secs_f64())
                            .ok();
                        transfer.remove();
                        self.remember_ended(id);
                        self.save_learned(|l| {
                            l.updates_ok += 1;
                            l.push_to_active_s = push_to_active_s;
                        });
                        let metrics = self.validation_report(&active);
                        self.publish(self.event(
                            id,
                            version,
                            "activated",
                            None,
                            None,
                            Some(metrics),
                        ));
                        continue;
                    }
                    tracing::info!(
                        "resuming transfer {} of {} v{}: {} of {} chunks staged",
                        hex_id(&transfer.id),
                        transfer.manifest.name,
                        transfer.manifest.version,
                        transfer.received_chunks(),
                        transfer.manifest.chunks
                    );
                    self.transfer = Some(transfer);
                    self.last_progress = Instant::now();
                    if self.transfer.as_ref().is_some_and(Transfer::is_complete) {
                        self.finish().await;
                    } else {
                        self.report_missing();
                    }
                }
                Err(e) => {
                    tracing::warn!("removing unreadable staged transfer {}: {e}", dir.display());
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
    }

    fn end_transfer_with(&mut self, transfer: Transfer, reason: &str) {
        let (id, version) = (transfer.id, transfer.manifest.version);
        transfer.remove();
        self.reject(id, version, &UpdateError::Busy(reason.to_string()));
    }

    fn report_missing(&mut self) {
        if let Some(t) = &self.transfer {
            let event = self.event(
                t.id,
                t.manifest.version,
                "receiving",
                None,
                Some(t.missing()),
                None,
            );
            self.publish(event);
        }
        self.last_progress = Instant::now();
    }

    async fn on_push(&mut self, bytes: &[u8]) {
        match wire::decode_push(bytes) {
            Ok(PushMessage::Manifest(signed)) => self.on_manifest(signed),
            Ok(PushMessage::Chunk(chunk)) => self.on_chunk(chunk).await,
            Err(reason) => {
                // Without a decodable transfer id there is nobody to answer.
                tracing::warn!("push message refused: {reason}");
            }
        }
    }

    fn on_manifest(&mut self, signed: SignedManifest) {
        let id = signed.transfer_id;
        if let Some(current) = &self.transfer {
            if current.id == id {
                // The sender asks again (it restarted, or missed our answer).
                self.report_missing();
                return;
            }
        }
        let ota = &self.parts.config.ota;
        let manifest = match wire::decode_manifest(&signed.manifest, ota.max_bundle_bytes) {
            Ok(m) => m,
            Err(reason) => {
                // The version of an undecodable manifest is unknown: 0.
                let version =
                    wire::decode_manifest(&signed.manifest, u64::MAX).map_or(0, |m| m.version);
                return self.reject(id, version, &UpdateError::Protocol(reason));
            }
        };
        if let Err(e) = self
            .keys
            .verify(&signed.key_id, &signed.manifest, &signed.signature)
        {
            return self.reject(id, manifest.version, &e);
        }
        let active = self.active().version().unwrap_or(0);
        if manifest.version <= active {
            return self.reject(
                id,
                manifest.version,
                &UpdateError::NotNewer {
                    new: manifest.version,
                    active,
                },
            );
        }
        if let Some(current) = self.transfer.take() {
            // A newer version wins; so does the same bundle pushed again (an operator re-ran
            // `push` after losing the first one), which starts over.
            let same_bundle = manifest.version == current.manifest.version
                && manifest.sha256 == current.manifest.sha256;
            if manifest.version > current.manifest.version || same_bundle {
                let reason = format!(
                    "superseded by transfer {} (version {})",
                    hex_id(&id),
                    manifest.version
                );
                self.end_transfer_with(current, &reason);
            } else {
                let reason = format!(
                    "busy: transfer {} (version {}) is in progress; push a newer version or wait until it ends",
                    hex_id(&current.id),
                    current.manifest.version
                );
                self.transfer = Some(current);
                return self.reject(id, manifest.version, &UpdateError::Busy(reason));
            }
        }
        let version = manifest.version;
        tracing::info!(
            "update {}: {} v{} ({} bytes in {} chunks) signed by {:?}",
            hex_id(&id),
            manifest.name,
            version,
            manifest.size,
            manifest.chunks,
            signed.key_id
        );
        match Transfer::create(&self.transfers_dir, &signed, manifest) {
            Ok(transfer) => {
                self.transfer = Some(transfer);
                self.last_progress = Instant::now();
                self.publish(self.event(id, version, "receiving", None, None, None));
            }
            Err(e) => self.reject(id, version, &e),
        }
    }

    async fn on_chunk(&mut self, chunk: Chunk) {
        let Some(transfer) = self.transfer.as_mut().filter(|t| t.id == chunk.transfer_id) else {
            if !self.ended.contains(&chunk.transfer_id) {
                let error = UpdateError::Protocol(format!(
                    "chunk for unknown transfer {}: send its manifest first (or the transfer already ended)",
                    hex_id(&chunk.transfer_id)
                ));
                self.refuse(chunk.transfer_id, 0, error.to_string(), None);
                self.remember_ended(chunk.transfer_id);
            }
            return;
        };
        match transfer.write_chunk(&chunk) {
            Ok(ChunkOutcome::Stored) => {
                self.last_progress = Instant::now();
                if transfer.is_complete() {
                    self.finish().await;
                }
            }
            Ok(ChunkOutcome::Duplicate) => {}
            Err(e) => {
                let transfer = self.transfer.take().expect("checked above");
                let (id, version) = (transfer.id, transfer.manifest.version);
                transfer.remove();
                self.reject(id, version, &e);
            }
        }
    }

    async fn on_tick(&mut self) {
        let ota = &self.parts.config.ota;
        if let Some(t) = &self.transfer {
            let deadline = t.started + ota.transfer_deadline;
            if SystemTime::now() >= deadline {
                let missing = t.missing();
                let reason = format!(
                    "transfer incomplete after its {} s deadline: {} of {} chunks missing ({})",
                    ota.transfer_deadline.as_secs(),
                    t.manifest.chunks - t.received_chunks(),
                    t.manifest.chunks,
                    describe_ranges(&missing)
                );
                let transfer = self.transfer.take().expect("checked above");
                let (id, version) = (transfer.id, transfer.manifest.version);
                transfer.remove();
                self.reject(id, version, &UpdateError::Protocol(reason));
            } else if self.last_progress.elapsed() >= ota.chunk_pause {
                self.report_missing();
            }
        }
        if self
            .canary
            .as_ref()
            .is_some_and(|c| Instant::now() >= c.until)
        {
            let canary = self.canary.take().expect("checked above");
            tracing::info!("update v{}: canary window passed", canary.version);
        }
    }

    /// All chunks are in: verify, unpack, install, validate, activate.
    async fn finish(&mut self) {
        let mut transfer = self.transfer.take().expect("finish needs a transfer");
        let (id, version) = (transfer.id, transfer.manifest.version);
        self.publish(self.event(id, version, "received", None, None, None));
        let verified = tokio::task::block_in_place(|| transfer.verify_digest());
        if let Err(e) = verified {
            transfer.remove();
            return self.reject(id, version, &e);
        }
        self.publish(self.event(id, version, "verified", None, None, None));
        let started = transfer.started;
        let release = Release {
            name: transfer.manifest.name.clone(),
            version,
            bundle_sha256: hex::encode(transfer.manifest.sha256),
            model_sha256: String::new(),
            installed_at: rfc3339(SystemTime::now()),
        };
        let min_accuracy = transfer.manifest.min_accuracy;
        let installed = self.install(&transfer, release);
        crash_point("installed");
        let installed = match installed {
            Ok(installed) => installed,
            Err(e) => {
                transfer.remove();
                return self.reject(id, version, &e);
            }
        };
        self.publish(self.event(id, version, "validating", None, None, None));
        match self.validate(&installed, min_accuracy).await {
            Ok((active, served)) => {
                crash_point("validated");
                if let Err(e) = self.activate(&installed, active.clone(), served).await {
                    self.parts.store.remove(&installed);
                    transfer.remove();
                    return self.reject(id, version, &e);
                }
                crash_point("activated");
                let push_to_active_s = started.elapsed().map(|d| d.as_secs_f64()).ok();
                self.save_learned(|l| {
                    l.updates_ok += 1;
                    l.push_to_active_s = push_to_active_s;
                });
                transfer.remove();
                self.remember_ended(id);
                let metrics = self.validation_report(&active);
                self.publish(self.event(id, version, "activated", None, None, Some(metrics)));
                self.parts
                    .store
                    .prune(self.parts.config.ota.keep_versions as usize);
                self.refresh_state();
                self.start_canary(id, version);
            }
            Err(e) => {
                self.parts.store.remove(&installed);
                transfer.remove();
                self.reject(id, version, &e);
            }
        }
    }

    /// Unpacks the verified bundle into the store (not active yet).
    fn install(&self, transfer: &Transfer, release: Release) -> Result<Installed, UpdateError> {
        let store = &self.parts.store;
        let staging = store.staging_dir(&release);
        let _ = std::fs::remove_dir_all(&staging);
        tokio::task::block_in_place(|| {
            bundle::unpack(&transfer.bundle_path(), &staging, transfer.manifest.size).map_err(
                |e| match e {
                    bundle::BundleError::Io { source, .. } => UpdateError::disk(source),
                    invalid => UpdateError::Bundle(invalid),
                },
            )?;
            crash_point("unpacked");
            store.install(&staging, release).map_err(|e| {
                let _ = std::fs::remove_dir_all(&staging);
                UpdateError::disk(e)
            })
        })
    }

    /// Loads the installed version on the configured runtime, warms it up, measures its
    /// accuracy and applies the gate; prepares its API plans. The active model keeps serving.
    async fn validate(
        &self,
        installed: &Installed,
        min_accuracy: Option<f64>,
    ) -> Result<(Arc<Active>, Option<crate::api::Served>), UpdateError> {
        let mut model_config = self.parts.config.model.clone();
        model_config.path = installed.dir.clone();
        let release = installed.release.clone();
        let serving = self.parts.serving.clone();
        let max_drop = self.parts.config.ota.max_accuracy_drop;
        let max_latency_increase = self.parts.config.ota.max_latency_increase;
        let current = self.active();
        tokio::task::spawn_blocking(move || {
            let current_accuracy = current.engine.accuracy_at_load.as_ref().map(|a| a.value);
            let engine = load_engine(&model_config, Some(&release))
                .map_err(|e| UpdateError::Model(e.to_string()))?;
            match (&engine.accuracy_at_load, min_accuracy) {
                (None, Some(min)) => return Err(UpdateError::NoDataset(min)),
                (Some(accuracy), Some(min)) if accuracy.value < min => {
                    return Err(UpdateError::BelowMinAccuracy {
                        value: accuracy.value,
                        min,
                    })
                }
                _ => {}
            }
            if let (Some(accuracy), Some(active)) = (&engine.accuracy_at_load, current_accuracy) {
                if accuracy.value < active - max_drop - 1e-9 {
                    return Err(UpdateError::AccuracyDrop {
                        value: accuracy.value,
                        active,
                        drop: max_drop,
                    });
                }
            }
            if let Some(limit) = max_latency_increase {
                let timed = |prepared: &crate::inference::PreparedModel| {
                    gate_p90_ms(prepared).map_err(|e| UpdateError::Model(e.to_string()))
                };
                let (new_ms, active_ms) =
                    (timed(&engine.prepared)?, timed(&current.engine.prepared)?);
                if new_ms > active_ms * (1.0 + limit) {
                    return Err(UpdateError::Latency {
                        new_ms,
                        active_ms,
                        limit,
                    });
                }
            }
            let active = Arc::new(Active {
                engine: Arc::new(engine),
                release: Some(release),
                activated_at: SystemTime::now(),
            });
            let served = serving
                .prepare(&active)
                .map_err(|e| UpdateError::Model(format!("preparing the API's plans: {e}")))?;
            Ok((active, served))
        })
        .await
        .map_err(|e| UpdateError::Model(format!("the validation task failed: {e}")))?
    }

    /// Points `active` at the version on disk, then swaps it in memory.
    async fn activate(
        &self,
        installed: &Installed,
        active: Arc<Active>,
        served: Option<crate::api::Served>,
    ) -> Result<(), UpdateError> {
        tokio::task::block_in_place(|| self.parts.store.activate(installed))
            .map_err(UpdateError::disk)?;
        let serving = self.parts.serving.clone();
        tokio::task::spawn_blocking(move || serving.swap(active, served))
            .await
            .map_err(|e| UpdateError::Model(format!("the swap task failed: {e}")))?
            .map_err(|e| UpdateError::Model(e.to_string()))
    }

    /// The PLASTER figures of a newly active version, as its `activated` event carries them:
    /// what was measured at load (accuracy) and the model's fixed figures.
    fn validation_report(&self, active: &Active) -> Report {
        let learned = lock(&self.parts.learned).clone();
        crate::app::producer::model_report(
            &self.parts.config.device_id,
            active,
            learned.report(active.activated_at),
        )
    }

    /// Republishes the retained status and model state after the active model changed.
    fn refresh_state(&self) {
        let active = self.active();
        let previous = previous_refs(&self.parts.store);
        let model = ModelRef {
            name: active.name().to_string(),
            version: active.version(),
            sha256: active.engine.model.sha256.clone(),
        };
        self.parts.presence.send_modify(|p| {
            p.model = model.clone();
            p.state.active = ActiveModel {
                name: model.name.clone(),
                version: model.version,
                sha256: model.sha256.clone(),
                activated_at: rfc3339(active.activated_at),
            };
            p.state.previous = previous;
        });
    }

    fn start_canary(&mut self, transfer_id: TransferId, version: u64) {
        let ota = &self.parts.config.ota;
        if ota.canary.is_zero() {
            return;
        }
        let median = |values: Vec<f64>| -> Option<f64> {
            let mut values = values;
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied()
        };
        let baseline_p90_ms = median(
            self.baseline
                .iter()
                .filter_map(|t| t.report.latency_ms.p90)
                .collect(),
        );
        let baseline_joules = median(
            self.baseline
                .iter()
                .filter_map(|t| t.report.energy.joules_per_inference)
                .collect(),
        );
        self.baseline.clear();
        self.canary = Some(Canary {
            until: Instant::now() + ota.canary,
            transfer_id,
            version,
            baseline_p90_ms,
            baseline_joules,
            windows: 0,
            strikes: 0,
            failures_at_start: self.parts.serving.metrics.totals(),
        });
    }

    /// A telemetry window closed: baseline material, or the canary's evidence.
    async fn on_telemetry(&mut self, record: Arc<Telemetry>) {
        let Some(canary) = &mut self.canary else {
            self.baseline.push_back(record);
            if self.baseline.len() > BASELINE_WINDOWS {
                self.baseline.pop_front();
            }
            return;
        };
        canary.windows += 1;
        if canary.windows == 1 || record.report.latency_ms.count == 0 {
            return;
        }
        let ota = &self.parts.config.ota;
        let mut faults = Vec::new();
        if let (Some(base), Some(p90)) = (canary.baseline_p90_ms, record.report.latency_ms.p90) {
            if p90 > base * (1.0 + ota.canary_max_latency_increase) {
                faults.push(format!(
                    "p90 latency {p90:.3} ms is more than {:.0} % above the previous version's {base:.3} ms",
                    ota.canary_max_latency_increase * 100.0
                ));
            }
        }
        if let (Some(base), Some(joules)) = (
            canary.baseline_joules,
            record.report.energy.joules_per_inference,
        ) {
            if joules > base * (1.0 + ota.canary_max_energy_increase) {
                faults.push(format!(
                    "{joules:.6} J per inference is more than {:.0} % above the previous version's {base:.6} J",
                    ota.canary_max_energy_increase * 100.0
                ));
            }
        }
        let (inferences, failures) = self.parts.serving.metrics.totals();
        let (inferences0, failures0) = canary.failures_at_start;
        let (done, failed) = (inferences - inferences0, failures - failures0);
        if done + failed > 0 {
            let rate = failed as f64 / (done + failed) as f64;
            if rate > ota.canary_max_error_rate {
                faults.push(format!(
                    "error rate {rate:.4} exceeds ota.canary_max_error_rate {}",
                    ota.canary_max_error_rate
                ));
            }
        }
        if faults.is_empty() {
            canary.strikes = 0;
            return;
        }
        canary.strikes += 1;
        if canary.strikes < CANARY_STRIKES {
            return;
        }
        let canary = self.canary.take().expect("checked above");
        let reason = format!("canary: {}", faults.join("; "));
        let metrics = Some(record.report.clone());
        self.roll_back(canary.transfer_id, canary.version, reason, metrics)
            .await;
    }

    async fn on_rollback_command(&mut self, version: u64, signature: &[u8; 64], key_id: &str) {
        let id = [0u8; 16];
        if let Err(e) = self
            .keys
            .verify(key_id, &wire::rollback_message(version), signature)
        {
            tracing::warn!("rollback command refused: {e}");
            return self.refuse(id, version, format!("rollback: {e}"), None);
        }
        let active = self.active().version();
        if active != Some(version) {
            let reason = match active {
                Some(active) => {
                    format!("rollback: version {version} is not active (active is {active})")
                }
                None => {
                    format!("rollback: version {version} is not active (the configured model is)")
                }
            };
            return self.refuse(id, version, reason, None);
        }
        self.canary = None;
        let reason = format!("rollback command signed by {key_id:?}");
        self.roll_back(id, version, reason, None).await;
    }

    /// Makes the previous version (or the configured first model) active again and removes
    /// the rolled-back one.
    async fn roll_back(
        &mut self,
        transfer_id: TransferId,
        version: u64,
        reason: String,
        metrics: Option<Report>,
    ) {
        let store = &self.parts.store;
        let rolled_back = store.active();
        let target = store.previous().into_iter().next();
        let mut model_config = self.parts.config.model.clone();
        let release = match &target {
            Some(installed) => {
                model_config.path = installed.dir.clone();
                Some(installed.release.clone())
            }
            None if model_config.path == store.active_path() => {
                let reason = format!("{reason}; but there is no previous version to roll back to");
                return self.refuse(transfer_id, version, reason, metrics);
            }
            None => None,
        };
        let serving = self.parts.serving.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let engine = load_engine(&model_config, release.as_ref()).map_err(|e| e.to_string())?;
            let active = Arc::new(Active {
                engine: Arc::new(engine),
                release,
                activated_at: SystemTime::now(),
            });
            let served = serving.prepare(&active).map_err(|e| e.to_string())?;
            Ok::<_, String>((active, served))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let (active, served) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                let reason = format!("{reason}; but the previous version does not load: {e}");
                return self.refuse(transfer_id, version, reason, metrics);
            }
        };
        let written = tokio::task::block_in_place(|| match &target {
            Some(installed) => store.activate(installed),
            None => store.deactivate(),
        });
        if let Err(e) = written {
            let reason = format!("{reason}; but the active link could not be written: {e}");
            return self.refuse(transfer_id, version, reason, metrics);
        }
        let serving = self.parts.serving.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || serving.swap(active, served)).await
        {
            tracing::error!("rollback: restarting the workload: {e}");
        }
        if let Some(rolled_back) = rolled_back {
            self.parts.store.remove(&rolled_back);
        }
        self.save_learned(|l| l.rollbacks += 1);
        self.publish(self.event(
            transfer_id,
            version,
            "rolled_back",
            Some(reason),
            None,
            metrics,
        ));
        self.refresh_state();
    }
}

/// p90 latency in ms of `prepared` on synthetic inputs, single stream, after one warm-up run.
fn gate_p90_ms(
    prepared: &crate::inference::PreparedModel,
) -> Result<f64, crate::inference::InferenceError> {
    let mut session = prepared.session()?;
    let inputs = prepared.synthetic_inputs(0)?;
    session.run(inputs.clone())?;
    let mut latency = crate::plaster::latency::LatencyRecorder::new();
    let start = Instant::now();
    let mut runs = 0;
    while runs < GATE_MAX_RUNS && (runs < GATE_MIN_RUNS || start.elapsed() < GATE_MIN_TIME) {
        let t = Instant::now();
        session.run(inputs.clone())?;
        latency.record(t.elapsed());
        runs += 1;
    }
    Ok(latency.quantile(0.9).as_secs_f64() * 1e3)
}

/// The versions kept for rollback, as the retained model state lists them.
pub fn previous_refs(store: &Store) -> Vec<ModelRef> {
    store.previous().iter().map(Installed::model_ref).collect()
}

/// `3..5, 9` for the event reasons.
fn describe_ranges(ranges: &[[u64; 2]]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|[a, b]| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..{b}")
            }
        })
        .collect();
    parts.join(", ")
}
