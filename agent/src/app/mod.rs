//! `plaster-agent run`: the daemon. It loads the model, starts the MQTT link, the telemetry
//! producer and the built-in workload, tells systemd when it is ready, feeds the watchdog while
//! it is healthy, and drains within a bounded grace period when `shutdown` resolves.
//!
//! Threads: inference (workload) on its own thread; sensor sampling on the sampler's thread;
//! record building (sensor and thermal reads, fsync) on the blocking pool; the MQTT link and
//! the main loop on the async runtime, which therefore never blocks.

pub mod engine;
pub mod producer;
pub mod serving;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::metrics::Metrics;
use crate::api::{self, Listener, Served, Shared};
use crate::config::Config;
use crate::inference::RuntimeKind;
use crate::mqtt::link::{Link, LinkParts, Presence};
use crate::mqtt::options::{Connection, MqttError};
use crate::mqtt::session::AnySession;
use crate::mqtt::topics::Topics;
use crate::ota::store::{Release, Store};
use crate::ota::updater::Learned;
use crate::ota::{Updater, UpdaterParts};
use crate::plaster::energy::EnergyMeter;
use crate::sensors::sampler::best_meter;
use crate::sensors::DiscoveryOptions;
use crate::telemetry::counter::{CounterError, PersistentCounter};
use crate::telemetry::record::{rfc3339, ActiveModel, ModelRef, ModelState};
use crate::telemetry::spool::{Spool, SpoolError};
use engine::{EngineError, SharedWindow, Workload};
use producer::{Producer, ProducerError, ProducerParts};
use serving::{load_engine, Active, Serving};

/// How long a drain may take in all (systemd's default stop timeout is 90 s; fleets set
/// `TimeoutStopSec` lower, the unit file uses 30 s).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Of the grace period, what the MQTT link may spend flushing the spool before going offline.
const DRAIN_FLUSH: Duration = Duration::from_secs(5);
/// Idle power is measured this long at start, before the workload runs.
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// Push messages waiting for the update task; beyond this the MQTT link waits.
const UPDATE_QUEUE: usize = 16;
/// The main loop is unhealthy (and stops feeding the watchdog) when no telemetry window
/// closed for this many intervals.
const STALL_INTERVALS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("state_dir {}: {message}", path.display())]
    StateDir { path: PathBuf, message: String },
    #[error("model: {0}")]
    Engine(#[from] EngineError),
    #[error("workload: {0}")]
    Workload(crate::inference::InferenceError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Counter(#[from] CounterError),
    #[error(transparent)]
    Producer(#[from] ProducerError),
    #[error("mqtt: {0}")]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Api(#[from] api::BindError),
    #[error("the model loader stopped: {0}")]
    Join(String),
}

/// Runs the daemon until `shutdown` resolves, then drains. Errors before the agent is ready
/// (state directory, model) are returned; after that, problems are logged and survived.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let state_error = |e: std::io::Error| AppError::StateDir {
        path: config.state_dir.clone(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(&config.state_dir).map_err(state_error)?;
    let store = Store::open(&config.state_dir).map_err(state_error)?;
    let spool = Spool::open(&config.state_dir.join("spool"), config.mqtt.spool_max_bytes)?;
    let spool = Arc::new(Mutex::new(spool));
    let telemetry_seq = PersistentCounter::open(&config.state_dir.join("telemetry.seq"))?;
    let session_seq = PersistentCounter::open(&config.state_dir.join("session.seq"))?;
    let connection = Connection {
        username: config.mqtt.username.clone(),
        password_file: config.mqtt.password_file.clone(),
        ca_file: config.mqtt.ca_file.clone(),
        cert_file: config.mqtt.cert_file.clone(),
        key_file: config.mqtt.key_file.clone(),
    };
    let session = connection.session(
        &config.mqtt.url,
        &config.device_id,
        config.mqtt.keep_alive,
        false,
        config.mqtt.version,
    )?;

    // The API listens from the start: live while the model loads, ready once it is warm. A
    // taken port fails the start here, before anything else happens.
    let metrics = Arc::new(Metrics::default());
    let window = SharedWindow::default();
    let (served_tx, served_rx) = watch::channel::<Option<Arc<Served>>>(None);
    let (last_tx, last_rx) = watch::channel(None);
    let api_cancel = CancellationToken::new();
    let api_task = match &config.api.listen {
        Some(listen) => {
            let listener = Listener::bind(listen).await?;
            let max_body_bytes = usize::try_from(config.api.max_body_bytes).unwrap_or(usize::MAX);
            tracing::info!("inference API on {}", listener.describe());
            let shared = Shared {
                model: served_rx,
                metrics: metrics.clone(),
                last: last_rx,
                spool: spool.clone(),
                max_body_bytes,
                body_budget: Shared::body_budget(max_body_bytes),
            };
            Some(tokio::spawn(api::serve(
                listener,
                api::router(shared),
                config.api.max_connections,
                metrics.clone(),
                api_cancel.clone(),
            )))
        }
        None => None,
    };

    // An update's active version wins over the configured first model.
    let installed = store.active();
    let mut model_config = config.model.clone();
    let release: Option<Release> = installed.as_ref().map(|i| i.release.clone());
    if let Some(installed) = &installed {
        model_config.path = store.active_path();
        tracing::info!(
            "active version: {} v{} ({})",
            installed.release.name,
            installed.release.version,
            installed.dir.display()
        );
    }
    tracing::info!(
        "loading {} on {}",
        model_config.path.display(),
        config.model.device.as_str()
    );
    let load = {
        let release = release.clone();
        tokio::task::spawn_blocking(move || {
            load_engine(&model_config, release.as_ref()).map(Arc::new)
        })
    };
    tokio::pin!(shutdown);
    let engine = tokio::select! {
        loaded = load => loaded.map_err(|e| AppError::Join(e.to_string()))??,
        _ = &mut shutdown => {
            tracing::info!("stopped while loading the model");
            return Ok(());
        }
    };
    tracing::info!(
        "model {} ({}) ready on {}, batch {}{}",
        engine.model.source.name,
        &engine.model.sha256[..12],
        engine.prepared.runtime().as_str(),
        engine.prepared.batch(),
        engine
            .accuracy_at_load
            .as_ref()
            .map(|a| format!(", top-1 {:.4} on {} samples", a.value, a.samples))
            .unwrap_or_default()
    );
    let active = Arc::new(Active {
        engine: engine.clone(),
        activated_at: engine.loaded_at,
        release,
    });
    let (active_tx, active_rx) = watch::channel(active.clone());
    let serving = Arc::new(Serving {
        api: api_task.as_ref().map(|_| config.api.clone()),
        served_tx,
        workload: Mutex::new(None),
        workload_rate_per_s: config.workload.rate_per_s,
        window: window.clone(),
        metrics: metrics.clone(),
        active_tx,
    });

    if api_task.is_some() {
        let prepared = {
            let (serving, active) = (serving.clone(), active.clone());
            tokio::task::spawn_blocking(move || serving.prepare(&active))
                .await
                .map_err(|e| AppError::Join(e.to_string()))?
        };
        match prepared {
            Ok(served) => {
                let served = served.expect("the API is on");
                let (name, max_batch) = (served.name.clone(), served.max_batch);
                // Ready from this send on; the log line says so after the fact.
                serving.served_tx.send_replace(Some(Arc::new(served)));
                tracing::info!("inference API serving {name} (max batch {max_batch})");
            }
            // Telemetry and the workload go on; the API stays live but never ready.
            Err(e) => tracing::error!("inference API: {e}; it will not report ready"),
        }
    }

    let topics = Topics::new(&config.fleet, &config.device_id);
    let spooled = Arc::new(Notify::new());
    let meter = {
        let energy = config.energy.clone();
        let runtime = engine.prepared.runtime();
        tokio::task::spawn_blocking(move || energy_meter(&energy, runtime))
            .await
            .map_err(|e| AppError::Join(e.to_string()))?
    };
    let learned = Arc::new(Mutex::new(Learned::load(&config.state_dir)));
    let mut producer = Producer::new(ProducerParts {
        device_id: config.device_id.clone(),
        active: active_rx,
        learned: learned.clone(),
        window: window.clone(),
        meter,
        sysfs_root: config.energy.sysfs_root.clone(),
        seq: telemetry_seq,
        spool: spool.clone(),
        spooled: spooled.clone(),
        topic: topics.telemetry(),
        encoding: config.mqtt.encoding,
        last: last_tx,
    })?;
    let telemetry_rx = producer.subscribe();

    let model_ref = ModelRef {
        name: engine.model.source.name.clone(),
        version: active.version(),
        sha256: engine.model.sha256.clone(),
    };
    let presence = Presence {
        model: model_ref.clone(),
        state: ModelState {
            active: ActiveModel {
                name: model_ref.name.clone(),
                version: model_ref.version,
                sha256: model_ref.sha256.clone(),
                activated_at: rfc3339(engine.loaded_at),
            },
            previous: crate::ota::updater::previous_refs(&store),
            last_result: None,
        },
        capabilities: capabilities(
            engine.prepared.runtime(),
            config.workload.rate_per_s,
            api_task.is_some(),
        ),
    };
    let (presence_tx, presence_rx) = watch::channel(presence);
    let (updates_tx, updates_rx) = mpsc::channel(UPDATE_QUEUE);

    let tracker = TaskTracker::new();
    let link_cancel = CancellationToken::new();
    let link_parts = LinkParts {
        session: (),
        topics: topics.clone(),
        encoding: config.mqtt.encoding,
        boot_id: boot_id(),
        session_seq,
        spool: spool.clone(),
        spooled: spooled.clone(),
        presence: presence_rx,
        drain_timeout: DRAIN_FLUSH,
        broker: config.mqtt.url.to_string(),
        updates: updates_tx,
    };
    match session {
        AnySession::V311(session) => {
            tracker.spawn(Link::new(link_parts.with_session(*session)).run(link_cancel.clone()))
        }
        AnySession::V5(session) => {
            tracker.spawn(Link::new(link_parts.with_session(*session)).run(link_cancel.clone()))
        }
    };

    if config.workload.rate_per_s > 0.0 {
        tracing::info!(
            "workload: {} inferences/s from {}",
            config.workload.rate_per_s,
            engine
                .dataset_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "synthetic inputs".into())
        );
        *crate::lock(&serving.workload) = Some(
            Workload::start(
                &engine,
                config.workload.rate_per_s,
                window.clone(),
                metrics.clone(),
            )
            .map_err(AppError::Workload)?,
        );
    }

    let updater_cancel = CancellationToken::new();
    let updater = Updater::new(UpdaterParts {
        config: config.clone(),
        store,
        serving: serving.clone(),
        presence: presence_tx,
        learned,
        spool: spool.clone(),
        spooled: spooled.clone(),
        events_topic: topics.model_events(),
        encoding: config.mqtt.encoding,
        telemetry: telemetry_rx,
    })
    .map_err(state_error)?;
    let updater_task = tokio::spawn(updater.run(updates_rx, updater_cancel.clone()));

    notify_systemd(&[sd_notify::NotifyState::Ready]);
    tracing::info!(
        "running: device {} in fleet {}, telemetry every {} s to {}",
        config.device_id,
        config.fleet,
        config.mqtt.telemetry_interval.as_secs_f64(),
        config.mqtt.url
    );

    // The telemetry loop: one record per interval, built on the blocking pool.
    let started = Instant::now();
    let last_window_ms = Arc::new(AtomicU64::new(0));
    let producer_cancel = CancellationToken::new();
    let producer_task = {
        let cancel = producer_cancel.clone();
        let last_window_ms = last_window_ms.clone();
        let interval = config.mqtt.telemetry_interval;
        tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                producer = match close_window(producer).await {
                    Some(producer) => producer,
                    None => return None,
                };
                last_window_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            Some(producer)
        })
    };

    // The main loop: wait for shutdown, feeding the watchdog while healthy.
    let watchdog = sd_notify::watchdog_enabled();
    let ping_every = watchdog.map_or(Duration::from_secs(3600), |w| w / 2);
    let stall = config.mqtt.telemetry_interval * STALL_INTERVALS + Duration::from_secs(5);
    let mut pings = tokio::time::interval(ping_every);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = pings.tick(), if watchdog.is_some() => {
                let since_window = started.elapsed()
                    .saturating_sub(Duration::from_millis(last_window_ms.load(Ordering::Relaxed)));
                let workload_ok = serving.workload_ok();
                if since_window < stall && workload_ok && !producer_task.is_finished() {
                    notify_systemd(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!(
                        "unhealthy (last telemetry window {:.0} s ago, workload running: {workload_ok}): not feeding the watchdog",
                        since_window.as_secs_f64()
                    );
                }
            }
        }
    }

    // Drain: stop inference, close the last window, flush and go offline, all bounded.
    tracing::info!("shutting down");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    let drain = async {
        // Requests in flight are answered; then the batcher's thread answers what is queued
        // and ends (its drop joins the thread: off the runtime).
        api_cancel.cancel();
        if let Some(api_task) = api_task {
            let _ = api_task.await;
        }
        // An update in progress stops at its next step; its staging stays for the next start.
        updater_cancel.cancel();
        let _ = updater_task.await;
        let _ = tokio::task::spawn_blocking(move || serving.stop()).await;
        producer_cancel.cancel();
        if let Ok(Some(producer)) = producer_task.await {
            close_window(producer).await;
        }
        link_cancel.cancel();
        tracker.close();
        tracker.wait().await;
    };
    if tokio::time::timeout_at(deadline, drain).await.is_err() {
        tracing::warn!(
            "shutdown took longer than {} s; exiting with work left (the spool keeps unsent records)",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Closes a telemetry window on the blocking pool; `None` if the producer thread panicked.
async fn close_window(mut producer: Producer) -> Option<Producer> {
    let joined = tokio::task::spawn_blocking(move || {
        match producer.tick() {
            Ok(Some(seq)) => tracing::debug!("telemetry seq {seq} spooled"),
            Ok(None) => tracing::warn!("telemetry dropped: the spool is full"),
            Err(e) => tracing::error!("telemetry: {e}"),
        }
        producer
    })
    .await;
    match joined {
        Ok(producer) => Some(producer),
        Err(e) => {
            tracing::error!("telemetry producer failed: {e}");
            None
        }
    }
}

/// The best energy source for the runtime in use, its idle power measured before any load.
fn energy_meter(
    energy: &crate::config::EnergyConfig,
    runtime: RuntimeKind,
) -> Box<dyn EnergyMeter> {
    let mut options = DiscoveryOptions::new(&energy.sysfs_root);
    options.total_rail = energy.total_rail.clone();
    options.pin = energy.source;
    let mut meter = best_meter(&options, runtime == RuntimeKind::Cpu, IDLE_WINDOW);
    meter.measure_idle();
    meter
}

/// What this agent can do, as its birth message lists it.
fn capabilities(runtime: RuntimeKind, workload_rate: f64, api: bool) -> Vec<String> {
    let mut capabilities = vec![runtime.as_str().to_string(), "telemetry".to_string()];
    if api {
        capabilities.push("api".to_string());
    }
    if workload_rate > 0.0 {
        capabilities.push("workload".to_string());
    }
    capabilities
}

/// A random id for this run of the agent: a birth and the Last Will that follows it share it,
/// so a dashboard can tell a restart from a reconnect.
fn boot_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) about our state.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("sd_notify: {e}");
    }
}
