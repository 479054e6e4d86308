//! The local inference API: the Open Inference Protocol (KServe v2) over HTTP/1.1 on TCP or a
//! Unix socket, so Triton's and KServe's client libraries work unmodified, and `/metrics` for
//! Prometheus.
//!
//! Shape of the code: `serve` owns the accept loop (a connection limit, each connection a task
//! with hyper's HTTP/1 server and a header timeout); the axum router maps the endpoints to the
//! handlers below; `oip` checks and decodes requests and encodes responses; `batcher` runs
//! inference on its own thread with dynamic batching; `metrics` renders Prometheus text.
//! Handlers never run inference on the async runtime: large bodies are decoded on the
//! blocking pool and answers come back from the batcher thread over a oneshot channel.

pub mod batcher;
pub mod metrics;
pub mod oip;

use std::fmt::Display;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::engine::{Engine, SharedWindow};
use crate::config::{ApiConfig, ApiListen};
use crate::inference::{InferenceError, Precision, PreparedModel};
use crate::lock;
use crate::telemetry::record::Telemetry;
use crate::telemetry::spool::Spool;
use batcher::{Batcher, Job, Plans, Policy};
use metrics::{Metrics, ModelLabels, Snapshot};
use oip::{Datatype, Request, Signature, TensorSpec};

/// A request's headers must arrive within this long (a slow client cannot hold a connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bodies up to this size are decoded on the async thread; larger ones on the blocking pool.
const INLINE_DECODE_BYTES: usize = 64 * 1024;
/// Connections the kernel queues before the agent accepts them (capped by net.core.somaxconn).
const ACCEPT_BACKLOG: u32 = 4096;
/// How long in-flight requests may take to finish when the agent stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Shed connections whose close may linger at once (`linger`); beyond it a shed connection is
/// closed as soon as it is answered. Each is a descriptor for at most `LINGER_TOTAL`.
const LINGER_MAX: usize = 16_384;
/// A lingering close ends once the client has sent nothing for this long (nginx's
/// `lingering_timeout`), ...
const LINGER_IDLE: Duration = Duration::from_secs(5);
/// ... after this long in all (nginx's `lingering_time`), ...
const LINGER_TOTAL: Duration = Duration::from_secs(30);
/// ... or once this many of the client's bytes were discarded.
const LINGER_BYTES: usize = 1 << 20;

/// An API failure: the HTTP status and the OIP error body `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> ApiError {
        ApiError {
            status,
            message,
            retry_after_s: None,
        }
    }

    pub fn bad_request(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: String) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(e: impl Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }

    pub fn unavailable(message: String) -> ApiError {
        ApiError {
            retry_after_s: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    pub fn queue_full() -> ApiError {
        ApiError::unavailable(
            "the inference queue is full (api.max_queue); retry after the Retry-After delay".into(),
        )
    }

    fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds api.max_body_bytes ({limit} bytes)"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, json_body(&json!({ "error": self.message }))).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

fn json_body(value: &serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The model as the API serves it: its OIP metadata and its batcher.
pub struct Served {
    pub name: String,
    pub version: Option<u64>,
    pub sha256: String,
    pub runtime: &'static str,
    pub precision: Precision,
    pub activated_at: SystemTime,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub batch_axis: bool,
    pub max_batch: usize,
    batcher: Batcher,
}

impl Served {
    /// Prepares the plans the batcher needs (one per batch size when the model has a batch
    /// axis), warms each up once and starts the batcher. Blocking: run it off the runtime.
    pub fn start(
        engine: &Engine,
        config: &ApiConfig,
        window: SharedWindow,
        metrics: Arc<Metrics>,
    ) -> Result<Served, InferenceError> {
        let model = &engine.model;
        let mut plans = vec![engine.prepared.clone()];
        let mut batch_axis = false;
        if model.has_dynamic_batch() && config.max_batch > 1 && engine.prepared.batch() == 1 {
            let mut bigger = Vec::new();
            for size in batcher::batch_sizes(config.max_batch).into_iter().skip(1) {
                bigger.push(PreparedModel::prepare(
                    model,
                    size,
                    &engine.choice,
                    engine.prepared.options(),
                )?);
            }
            // Batching needs axis 0 of every output to follow the batch size.
            let largest = bigger.last().expect("max_batch > 1 gives a plan above 1");
            batch_axis = largest
                .output_facts()?
                .iter()
                .all(|(_, shape)| shape.first() == Some(&largest.batch()));
            if batch_axis {
                plans.extend(bigger);
            } else {
                tracing::warn!(
                    "{}: an output has no batch axis; the API runs requests one by one",
                    model.source.name
                );
            }
        }
        for plan in &plans[1..] {
            let mut session = plan.session()?;
            session.run(plan.synthetic_inputs(0)?)?;
        }
        let plan = &plans[0];
        let batch_dim = |ix: usize, d: usize| if ix == 0 && batch_axis { -1 } else { d as i64 };
        let mut inputs = Vec::new();
        for (ix, spec) in model.inputs.iter().enumerate() {
            let datatype = Datatype::of(spec.datum_type).ok_or_else(|| {
                model.invalid_msg(format!(
                    "input \"{}\" has type {:?}, which the inference API cannot carry",
                    spec.name, spec.datum_type
                ))
            })?;
            inputs.push(TensorSpec {
                name: spec.name.clone(),
                datatype,
                shape: plan
                    .input_shape(ix)
                    .into_iter()
                    .enumerate()
                    .map(|(axis, d)| batch_dim(axis, d))
                    .collect(),
            });
        }
        let mut outputs = Vec::new();
        let mut output_types = Vec::new();
        for (ix, (dt, shape)) in plan.output_facts()?.into_iter().enumerate() {
            // An f16 plan computes in f16; the model declares (and clients get) f32. Indices
            // (ArgMax, a classifier's label) are tract's TDim inside: INT64 outside, as in ONNX.
            let declared = match dt {
                DatumType::F16 if plan.precision() == Precision::F16 => DatumType::F32,
                DatumType::TDim => DatumType::I64,
                dt => dt,
            };
            let name = model
                .outputs
                .get(ix)
                .cloned()
                .unwrap_or_else(|| format!("output_{ix}"));
            let datatype = Datatype::of(declared).ok_or_else(|| {
                model.invalid_msg(format!(
                    "output \"{name}\" has type {declared:?}, which the inference API cannot carry"
                ))
            })?;
            output_types.push(declared);
            outputs.push(TensorSpec {
                name,
                datatype,
                shape: shape
                    .into_iter()
                    .enumerate()
                    .map(|(axis, d)| batch_dim(axis, d))
                    .collect(),
            });
        }
        let plans = Plans {
            plans,
            batch_axis,
            output_types,
        };
        let max_batch = plans.max_batch();
        let policy = Policy {
            max_batch,
            max_queue_delay: config.max_queue_delay,
            max_queue: config.max_queue,
            instances: config.instances,
        };
        let batcher = Batcher::start(plans, policy, window, metrics)?;
        Ok(Served {
            name: model.source.name.clone(),
            version: None,
            sha256: model.sha256.clone(),
            runtime: engine.prepared.runtime().as_str(),
            precision: engine.prepared.precision(),
            activated_at: engine.loaded_at,
            inputs,
            outputs,
            batch_axis,
            max_batch,
            batcher,
        })
    }

    fn signature(&self) -> Signature<'_> {
        Signature {
            inputs: &self.inputs,
            outputs: &self.outputs,
            batch_axis: self.batch_axis,
            max_batch: self.max_batch,
        }
    }

    /// `GET /v2/models/<name>`.
    fn metadata(&self) -> serde_json::Value {
        let mut metadata = json!({
            "name": self.name,
            "platform": "onnx",
            "inputs": self.inputs,
            "outputs": self.outputs,
            "parameters": {
                "runtime": self.runtime,
                "precision": self.precision.as_str(),
                "sha256": self.sha256,
                "max_batch_size": self.max_batch,
            },
        });
        if let Some(v) = self.version {
            metadata["versions"] = json!([v.to_string()]);
        }
        metadata
    }
}

/// What every handler reads.
#[derive(Clone)]
pub struct Shared {
    /// The served model, `None` while it loads (the API is live but not ready).
    pub model: watch::Receiver<Option<Arc<Served>>>,
    pub metrics: Arc<Metrics>,
    /// The last telemetry record, for `/metrics`.
    pub last: watch::Receiver<Option<Arc<Telemetry>>>,
    pub spool: Arc<Mutex<Spool>>,
    pub max_body_bytes: usize,
    /// Request bytes being read or decoded at once, in KiB: bodies wait for none of it and
    /// are refused (503) when it is spent, so many large bodies cannot exhaust memory.
    pub body_budget: Arc<Semaphore>,
}

impl Shared {
    /// The budget for `max_body_bytes`: room for this many bodies of the largest size at once.
    pub const BODIES_IN_FLIGHT: usize = 4;

    pub fn body_budget(max_body_bytes: usize) -> Arc<Semaphore> {
        let kib =
            (max_body_bytes.div_ceil(1024) * Shared::BODIES_IN_FLIGHT).min(Semaphore::MAX_PERMITS);
        Arc::new(Semaphore::new(kib))
    }
}

impl Shared {
    /// The model a request names, or why it cannot be served.
    fn served(&self, name: &str, version: Option<&str>) -> Result<Arc<Served>, ApiError> {
        let served = self
            .model
            .borrow()
            .clone()
            .ok_or_else(|| ApiError::unavailable("the model is still loading".into()))?;
        if served.name != name {
            return Err(ApiError::not_found(format!(
                "unknown model \"{name}\": this agent serves \"{}\"",
                served.name
            )));
        }
        if let Some(version) = version {
            if served.version.map(|v| v.to_string()).as_deref() != Some(version) {
                return Err(ApiError::not_found(format!(
                    "model \"{name}\" has no version \"{version}\" (active: {})",
                    served
                        .version
                        .map(|v| format!("\"{v}\""))
                        .unwrap_or_else(|| "unversioned".into())
                )));
            }
        }
        Ok(served)
    }
}

/// The router: every OIP endpoint, `/metrics`, and OIP error bodies for unknown paths and
/// methods.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_version),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_version),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/metrics", get(prometheus))
        .fallback(|| async { ApiError::not_found("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint".into(),
            )
        })
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            count_responses,
        ))
        .with_state(shared)
}

async fn count_responses(
    State(shared): State<Shared>,
    request: HttpRequest,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    shared.metrics.responded(response.status().as_u16());
    response
}

async fn server_metadata() -> Response {
    json_body(&json!({
        "name": "plaster-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "parameters"],
    }))
}

async fn live() -> Response {
    json_body(&json!({ "live": true }))
}

/// Ready once the model is loaded and warm; 400 before (OIP: 200 true, 4xx false).
async fn ready(State(shared): State<Shared>) -> Response {
    let ready = shared.model.borrow().is_some();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, json_body(&json!({ "ready": ready }))).into_response()
}

async fn model_metadata(
    State(shared): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json_body(&shared.served(&name, None)?.metadata()))
}

async fn model_metadata_version(
    State(shared): State<Shared>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(json_body(&shared.served(&name, Some(&version))?.metadata()))
}

async fn model_ready(
    State(shared): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let served = shared.served(&name, None)?;
    Ok(json_body(&json!({ "name": served.name, "ready": true })))
}

async fn model_ready_version(
    State(shared): State<Shared>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let served = shared.served(&name, Some(&version))?;
    Ok(json_body(&json!({ "name": served.name, "ready": true })))
}

async fn infer(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    run_inference(&shared, &name, None, &headers, body).await
}

async fn infer_version(
    State(shared): State<Shared>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    run_inference(&shared, &name, Some(&version), &headers, body).await
}

async fn run_inference(
    shared: &Shared,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Reserve the body's size (declared, else the largest allowed) before anything else.
    let declared = content_length(headers).unwrap_or(shared.max_body_bytes as u64);
    let kib = u32::try_from(
        declared
            .min(shared.max_body_bytes as u64)
            .div_ceil(1024)
            .max(1),
    )
    .unwrap_or(u32::MAX);
    let _reserved = shared
        .body_budget
        .clone()
        .try_acquire_many_owned(kib)
        .map_err(|_| {
            shared.metrics.shed_body_budget();
            ApiError::unavailable(
                "too many large requests are being read at once; retry after the Retry-After delay"
                    .into(),
            )
        })?;
    let served = shared.served(name, version)?;
    let body = read_body(headers, body, shared.max_body_bytes).await?;
    let header_length = match headers.get(oip::HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::bad_request(
                        "Inference-Header-Content-Length is not a byte count".into(),
                    )
                })?
                .to_string(),
        ),
    };
    let mut request = if body.len() <= INLINE_DECODE_BYTES {
        Request::parse(&body, header_length.as_deref(), &served.signature())?
    } else {
        let served = served.clone();
        tokio::task::spawn_blocking(move || {
            Request::parse(&body, header_length.as_deref(), &served.signature())
        })
        .await
        .map_err(ApiError::internal)??
    };
    let (reply, answer) = oneshot::channel();
    served
        .batcher
        .submit(Job {
            inputs: std::mem::take(&mut request.inputs),
            batch: request.batch,
            arrived: Instant::now(),
            reply,
        })
        .inspect_err(|e| {
            if e.status == StatusCode::SERVICE_UNAVAILABLE {
                shared.metrics.shed_queue_full();
            }
        })?;
    let done = answer
        .await
        .map_err(|_| ApiError::internal("the inference thread stopped"))??;
    let encoded = oip::encode_response(
        &served.name,
        served.version,
        &request,
        &served.outputs,
        &done.outputs,
        done.timing,
    )?;
    let mut response = Response::new(Body::from(encoded.body));
    let headers = response.headers_mut();
    match encoded.header_length {
        Some(n) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(oip::HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(response)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a body of at most `limit` bytes; a declared or actual larger one is answered 413.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    if content_length(headers).is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

async fn prometheus(State(shared): State<Shared>) -> Response {
    let served = shared.model.borrow().clone();
    let last = shared.last.borrow().clone();
    let (spool_records, spool_bytes) = {
        let spool = lock(&shared.spool);
        (spool.len() as u64, spool.bytes())
    };
    let snapshot = Snapshot {
        model: served.as_ref().map(|s| ModelLabels {
            name: &s.name,
            version: s.version,
            sha256: &s.sha256,
            runtime: s.runtime,
            precision: s.precision.as_str(),
            active_since_s: s
                .activated_at
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }),
        last: last.as_deref(),
        spool_records,
        spool_bytes,
        queue_depth: served.as_ref().map_or(0, |s| s.batcher.depth()),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&shared.metrics, &snapshot),
    )
        .into_response()
}

#[derive(Debug, thiserror::Error)]
#[error("api.listen {listen}: {message}")]
pub struct BindError {
    listen: String,
    message: String,
}

/// A bound listener: TCP, or a Unix socket (whose file is replaced if a stale one exists).
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(listen: &ApiListen) -> Result<Listener, BindError> {
        let error = |e: std::io::Error| BindError {
            listen: listen.to_string(),
            message: e.to_string(),
        };
        match listen {
            ApiListen::Tcp(addr) => {
                // A deep accept queue: a burst of connections waits in the kernel instead of
                // having its SYNs dropped (a client then stalls a whole second to retransmit).
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(error)?;
                socket.set_reuseaddr(true).map_err(error)?;
                socket.bind(*addr).map_err(error)?;
                Ok(Listener::Tcp(socket.listen(ACCEPT_BACKLOG).map_err(error)?))
            }
            ApiListen::Unix(path) => {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(error(e)),
                }
                let listener = UnixListener::bind(path).map_err(error)?;
                // Applications in the agent's group may connect (connecting needs write).
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .map_err(error)?;
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// Where it listens, as a log line says it.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Answered, then closed, to a connection over `api.max_connections`: it costs no task.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 71\r\n\r\n{\"error\":\"too many connections (api.max_connections); retry after 1 s\"}";

/// Serves `router` on `listener` until `cancel`, then lets in-flight requests finish (bounded).
pub async fn serve(
    listener: Listener,
    router: Router,
    max_connections: usize,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let lingering = Arc::new(Semaphore::new(LINGER_MAX));
    let tracker = TaskTracker::new();
    let mut accept_errors = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = accept(&listener) => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors and similar: log, back off briefly, go on.
                accept_errors += 1;
                if accept_errors % 1000 == 1 {
                    tracing::warn!("api: accept failed ({accept_errors} so far): {e}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let router = router.clone();
                let cancel = cancel.clone();
                tracker.spawn(async move {
                    match stream {
                        Stream::Tcp(s) => connection(s, router, cancel).await,
                        Stream::Unix(s) => connection(s, router, cancel).await,
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                metrics.shed_connection();
                // A fresh socket's send buffer holds the answer: no task needed to write it.
                let _ = stream.try_write(BUSY);
                if let Ok(permit) = lingering.clone().try_acquire_owned() {
                    let cancel = cancel.clone();
                    tracker.spawn(async move {
                        linger(stream, cancel).await;
                        drop(permit);
                    });
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "api: requests still running after {} s; closing",
            DRAIN_TIMEOUT.as_secs()
        );
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Stream {
    fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write(bytes),
            Stream::Unix(s) => s.try_write(bytes),
        }
    }

    fn try_read(&self, bytes: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(bytes),
            Stream::Unix(s) => s.try_read(bytes),
        }
    }

    async fn readable(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            Stream::Unix(s) => s.readable().await,
        }
    }

    /// Sends the end of the stream (FIN), still reading what the client sends.
    async fn shutdown_write(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Stream::Tcp(s) => s.shutdown().await,
            Stream::Unix(s) => s.shutdown().await,
        }
    }
}

/// The close of a shed connection, after its 503: half-close, then read and discard what the
/// client sends until it closes its side (bounded by `LINGER_IDLE`, `LINGER_TOTAL` and
/// `LINGER_BYTES`), then close. Closing at once would lose the 503 for many clients: their
/// request arrives after (or just before) the close, the kernel answers it with a reset, and a
/// client that gets the reset before it has read to the end sees "connection reset" instead of
/// the answer and its Retry-After. This is the lingering close of Apache and nginx.
async fn linger(mut stream: Stream, cancel: CancellationToken) {
    if stream.shutdown_write().await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TOTAL;
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        let idle_end = deadline.min(tokio::time::Instant::now() + LINGER_IDLE);
        tokio::select! {
            _ = cancel.cancelled() => return,
            readable = tokio::time::timeout_at(idle_end, stream.readable()) => match readable {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            },
        }
        // Not held across an await: the lingering task stays a few hundred bytes.
        let mut sink = [0u8; 4096];
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(n) => discarded += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

async fn accept(listener: &Listener) -> std::io::Result<Stream> {
    match listener {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
        Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().await?.0)),
    }
}

async fn connection<S>(stream: S, router: Router, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

use tract_onnx::prelude::DatumType;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt;

    async fn call(router: &Router, method: &str, path: &str) -> (StatusCode, HeaderMap, String) {
        let request = HttpRequest::builder()
            .method(method)
            .uri(path)
            .body(Body::from("{}"))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn live_but_not_ready_while_the_model_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (_model_tx, model) = watch::channel(None);
        let (_last_tx, last) = watch::channel(None);
        let router = router(Shared {
            model,
            metrics: Arc::default(),
            last,
            spool: Arc::new(Mutex::new(Spool::open(dir.path(), 1 << 20).unwrap())),
            max_body_bytes: 1 << 20,
            body_budget: Shared::body_budget(1 << 20),
        });
        let (status, _, body) = call(&router, "GET", "/v2/health/live").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, r#"{"live":true}"#)
        );
        let (status, _, body) = call(&router, "GET", "/v2/health/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::BAD_REQUEST, r#"{"ready":false}"#)
        );
        let (status, headers, body) = call(&router, "POST", "/v2/models/digits/infer").await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"the model is still loading"}"#
            )
        );
        assert_eq!(headers[header::RETRY_AFTER], "1");
        let (status, _, body) = call(&router, "GET", "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(!body.contains("plaster_model_info"), "{body}");
        assert!(
            body.contains("plaster_api_responses_total{code=\"5xx\"} 1"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_spent_body_budget_refuses_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let (_model_tx, model) = watch::channel(None);
        let (_last_tx, last) = watch::channel(None);
        let budget = Shared::body_budget(1 << 20);
        let shared = Shared {
            model,
            metrics: Arc::default(),
            last,
            spool: Arc::new(Mutex::new(Spool::open(dir.path(), 1 << 20).unwrap())),
            max_body_bytes: 1 << 20,
            body_budget: budget.clone(),
        };
        let router = router(shared);
        // Four 1 MiB bodies are being read: a fifth waits for none of it.
        let held = budget.clone().try_acquire_many_owned(4 << 10).unwrap();
        let (status, headers, body) = call(&router, "POST", "/v2/models/digits/infer").await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"too many large requests are being read at once; retry after the Retry-After delay"}"#
            )
        );
        assert_eq!(headers[header::RETRY_AFTER], "1");
        drop(held);
        let (status, _, body) = call(&router, "POST", "/v2/models/digits/infer").await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"the model is still loading"}"#
            )
        );
        let (_, _, metrics) = call(&router, "GET", "/metrics").await;
        assert!(
            metrics.contains("plaster_api_shed_total{reason=\"body_budget\"} 1"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn a_shed_client_whose_request_follows_the_answer_reads_it_without_a_reset() {
        use std::io::{Read, Write};
        let listen = ApiListen::Tcp("127.0.0.1:0".parse().unwrap());
        let listener = Listener::bind(&listen).await.unwrap();
        let Listener::Tcp(tcp) = &listener else {
            unreachable!()
        };
        let addr = tcp.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let cancel = CancellationToken::new();
        // No connection slots: every connection is shed.
        let server = tokio::spawn(serve(
            listener,
            Router::new(),
            0,
            metrics.clone(),
            cancel.clone(),
        ));
        let (answer, rest) = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let mut answer = vec![0; BUSY.len()];
            s.read_exact(&mut answer).unwrap();
            // The agent has answered and ended its side before the request was sent: the
            // request reaches a socket the agent still reads (closed, its kernel would reset).
            assert_eq!(s.read(&mut [0; 1]).unwrap(), 0);
            s.write_all(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let read = s.read_to_end(&mut rest).map(|_| rest);
            (answer, read)
        })
        .await
        .unwrap();
        assert_eq!(answer, BUSY);
        assert_eq!(rest.map_err(|e| e.kind()), Ok(Vec::new()));
        cancel.cancel();
        server.await.unwrap();
    }

    #[test]
    fn the_busy_answer_is_a_complete_http_response() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(json["error"].is_string());
    }
}
