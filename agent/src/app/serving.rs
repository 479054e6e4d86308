//! What serves the active model: the local API's batcher and the built-in workload, and the
//! one place that replaces them when an update (or a rollback) activates another version.
//!
//! The swap never fails a request: the new model's plans are prepared and warmed while the
//! old one serves; then one `watch` send makes the API route new requests to the new batcher,
//! while requests already queued on the old one are answered by it before it stops (its
//! threads end when its last `Arc` is dropped).

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use super::engine::{Engine, EngineError, SharedWindow, Workload};
use crate::api::metrics::Metrics;
use crate::api::Served;
use crate::config::{ApiConfig, ModelConfig};
use crate::inference::InferenceError;
use crate::lock;
use crate::ota::store::Release;

/// The model that runs, and where it came from.
pub struct Active {
    pub engine: Arc<Engine>,
    /// The installed update, or `None` for the configured first model.
    pub release: Option<Release>,
    pub activated_at: SystemTime,
}

impl Active {
    pub fn version(&self) -> Option<u64> {
        self.release.as_ref().map(|r| r.version)
    }

    pub fn name(&self) -> &str {
        &self.engine.model.source.name
    }
}

/// Loads a model for serving: an installed version takes its release's name.
pub fn load_engine(config: &ModelConfig, release: Option<&Release>) -> Result<Engine, EngineError> {
    let mut engine = Engine::load(config)?;
    if let Some(release) = release {
        engine.model.source.name = release.name.clone();
    }
    Ok(engine)
}

pub struct Serving {
    /// `None` when the local API is off.
    pub api: Option<ApiConfig>,
    pub served_tx: watch::Sender<Option<Arc<Served>>>,
    pub workload: Mutex<Option<Workload>>,
    pub workload_rate_per_s: f64,
    pub window: SharedWindow,
    pub metrics: Arc<Metrics>,
    pub active_tx: watch::Sender<Arc<Active>>,
}

impl Serving {
    /// The API's plans and batcher for `active`, prepared and warmed while the current model
    /// keeps serving. Blocking: run it off the async runtime.
    pub fn prepare(&self, active: &Active) -> Result<Option<Served>, InferenceError> {
        let Some(api) = &self.api else {
            return Ok(None);
        };
        let mut served = Served::start(
            &active.engine,
            api,
            self.window.clone(),
            self.metrics.clone(),
        )?;
        served.version = active.version();
        served.activated_at = active.activated_at;
        Ok(Some(served))
    }

    /// Makes `active` (with the `served` that [`Serving::prepare`] made for it) the model
    /// that serves. Blocking: the old workload's thread is joined.
    pub fn swap(&self, active: Arc<Active>, served: Option<Served>) -> Result<(), InferenceError> {
        if let Some(served) = served {
            let old = self.served_tx.send_replace(Some(Arc::new(served)));
            // The old batcher answers what it has queued, then its threads end.
            drop(old);
        }
        let mut workload = lock(&self.workload);
        if let Some(old) = workload.take() {
            old.stop();
        }
        if self.workload_rate_per_s > 0.0 {
            *workload = Some(Workload::start(
                &active.engine,
                self.workload_rate_per_s,
                self.window.clone(),
                self.metrics.clone(),
            )?);
        }
        drop(workload);
        self.active_tx.send_replace(active);
        Ok(())
    }

    /// Whether the workload (when configured) is still running.
    pub fn workload_ok(&self) -> bool {
        lock(&self.workload)
            .as_ref()
            .is_none_or(Workload::is_running)
    }

    /// Stops serving: the API's model goes, then the workload. Blocking.
    pub fn stop(&self) {
        let served = self.served_tx.send_replace(None);
        drop(served);
        if let Some(workload) = lock(&self.workload).take() {
            workload.stop();
        }
    }
}
