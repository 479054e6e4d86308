//! The local inference API of a real daemon (Open Inference Protocol over HTTP), checked with a
//! plain HTTP client written from the specs, with Triton's unmodified Python client, and
//! against in-process inference on the same inputs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use plaster_agent_tests::broker::Broker;
use plaster_agent_tests::daemon::{Daemon, DaemonConfig};
use plaster_agent_tests::http::{self, Response};
use serde_json::{json, Value};

const READY: Duration = Duration::from_secs(120);

/// A daemon with the API on a port of its own; no workload, so every inference is ours.
fn start(
    dir: &Path,
    broker: &Broker,
    configure: impl FnOnce(&mut DaemonConfig),
) -> (Daemon, String) {
    let mut config = DaemonConfig::new(dir, "api-1", &broker.url());
    config.workload_rate_per_s = 0.0;
    config.telemetry_interval_s = 0.5;
    configure(&mut config);
    let daemon = Daemon::start(&config.write(dir));
    let addr = daemon.api_addr();
    daemon.wait_for_log("inference API serving", READY);
    (daemon, addr)
}

fn digits_rows(n: usize) -> (Vec<Vec<f32>>, Vec<i64>, Vec<Vec<f32>>) {
    let path = plaster_agent_tests::model_path("reference/digits.npz");
    let mut npz = ndarray_npy::NpzReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let x: tract_onnx::prelude::tract_ndarray::Array2<f32> = npz.by_name("x").unwrap();
    let label: tract_onnx::prelude::tract_ndarray::Array1<i64> = npz.by_name("label").unwrap();
    let p: tract_onnx::prelude::tract_ndarray::Array2<f32> = npz.by_name("probabilities").unwrap();
    (
        x.outer_iter().take(n).map(|r| r.to_vec()).collect(),
        label.iter().take(n).copied().collect(),
        p.outer_iter().take(n).map(|r| r.to_vec()).collect(),
    )
}

fn infer_json(rows: &[Vec<f32>]) -> Value {
    json!({
        "id": "q",
        "inputs": [{
            "name": "X",
            "shape": [rows.len(), 64],
            "datatype": "FP32",
            "data": rows,
        }]
    })
}

fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (ix, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = ix;
        }
    }
    best
}

/// The class probabilities of a JSON response (the digits model's second output; its first
/// is the predicted label), one row per sample.
fn scores(response: &Response) -> Vec<Vec<f64>> {
    let json = response.json();
    let output = json["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "probabilities")
        .unwrap_or_else(|| panic!("no probabilities output in {json}"));
    let shape: Vec<usize> = serde_json::from_value(output["shape"].clone()).unwrap();
    let data: Vec<f64> = serde_json::from_value(output["data"].clone()).unwrap();
    data.chunks(shape[1]).map(|c| c.to_vec()).collect()
}

#[test]
fn oip_endpoints_answer_as_the_protocol_specifies() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let (mut daemon, addr) = start(dir.path(), &broker, |_| {});

    let r = http::get(&addr, "/v2/health/live");
    assert_eq!((r.status, r.json()), (200, json!({"live": true})));
    let r = http::get(&addr, "/v2/health/ready");
    assert_eq!((r.status, r.json()), (200, json!({"ready": true})));
    let r = http::get(&addr, "/v2");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let server = r.json();
    assert_eq!(server["name"], "plaster-agent");
    assert!(server["version"].is_string());
    assert_eq!(
        server["extensions"],
        json!(["binary_tensor_data", "parameters"])
    );

    // Model metadata, field by field (OIP's $metadata_model_response).
    let r = http::get(&addr, "/v2/models/digits");
    assert_eq!(r.status, 200);
    let meta = r.json();
    assert_eq!(meta["name"], "digits");
    assert_eq!(meta["platform"], "onnx");
    assert_eq!(
        meta["inputs"],
        json!([{"name": "X", "datatype": "FP32", "shape": [-1, 64]}])
    );
    assert_eq!(
        meta["outputs"],
        json!([
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
        ])
    );
    assert_eq!(meta["parameters"]["max_batch_size"], 8);
    assert_eq!(meta["parameters"]["runtime"], "cpu");
    assert!(
        meta.get("versions").is_none(),
        "an unversioned model lists no versions"
    );
    let r = http::get(&addr, "/v2/models/digits/ready");
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"name": "digits", "ready": true}))
    );

    // JSON inference: 5 rows, the predictions onnxruntime made.
    let (rows, labels, reference) = digits_rows(5);
    let r = http::post_json(&addr, "/v2/models/digits/infer", &infer_json(&rows));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json = r.json();
    assert_eq!(json["model_name"], "digits");
    assert_eq!(json["id"], "q");
    assert!(json["parameters"]["queue_us"].as_u64().is_some());
    assert!(json["parameters"]["compute_us"].as_u64().unwrap() > 0);
    assert_eq!(json["outputs"][0]["shape"], json!([5]));
    let predicted: Vec<i64> = serde_json::from_value(json["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(predicted, labels, "the label output");
    let got = scores(&r);
    for ((row, label), expected) in got.iter().zip(&labels).zip(&reference) {
        assert_eq!(argmax(row) as i64, *label);
        for (a, b) in row.iter().zip(expected) {
            assert!((a - f64::from(*b)).abs() < 1e-4, "{a} vs onnxruntime {b}");
        }
    }

    // Binary tensor data both ways: the same numbers.
    let header = json!({
        "inputs": [{"name": "X", "shape": [5, 64], "datatype": "FP32",
                    "parameters": {"binary_data_size": 5 * 64 * 4}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    for v in rows.iter().flatten() {
        body.extend_from_slice(&v.to_le_bytes());
    }
    let length = header.len().to_string();
    let r = http::request(
        &addr,
        "POST",
        "/v2/models/digits/infer",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Inference-Header-Content-Length", &length),
        ],
        &body,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let n: usize = r
        .header("inference-header-content-length")
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&r.body[..n]).unwrap();
    assert_eq!(
        head["outputs"][0]["parameters"]["binary_data_size"],
        5 * 10 * 4
    );
    let binary: Vec<f64> = r.body[n..]
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
        .collect();
    // JSON carries each FP32 value in its shortest form: the same f32 as the binary bytes.
    let json_f32: Vec<f32> = got.concat().iter().map(|v| *v as f32).collect();
    let binary_f32: Vec<f32> = binary.iter().map(|v| *v as f32).collect();
    assert_eq!(binary_f32, json_f32, "binary and JSON outputs differ");

    // /metrics: Prometheus text, every sample of a declared family, counts that add up.
    let r = http::get(&addr, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body).unwrap();
    let families = check_exposition(&text);
    assert_eq!(families["plaster_inferences_total{source=\"api\"}"], 10.0);
    assert_eq!(
        families["plaster_latency_seconds_count{source=\"api\"}"],
        2.0
    );
    assert!(
        text.contains("plaster_model_info{name=\"digits\""),
        "{text}"
    );

    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0));
}

/// Checks the text exposition format (HELP and TYPE before a family's samples, parseable
/// values, cumulative buckets ending at the count) and returns every sample by name+labels.
fn check_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let mut last_bucket: Option<(String, f64)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "{name} has no TYPE line");
        if name.ends_with("_bucket") {
            let series = key.split(",le=").next().unwrap().to_string();
            if let Some((prev_series, prev)) = &last_bucket {
                if *prev_series == series {
                    assert!(value >= *prev, "buckets not cumulative at {line}");
                }
            }
            last_bucket = Some((series, value));
        }
        if name.ends_with("_count") {
            let series = key.replace("_count", "_bucket");
            let inf = if series.ends_with('}') {
                format!("{},le=\"+Inf\"}}", series.trim_end_matches('}'))
            } else {
                format!("{series}{{le=\"+Inf\"}}")
            };
            assert_eq!(samples.get(&inf), Some(&value), "+Inf bucket of {key}");
        }
        samples.insert(key.to_string(), value);
    }
    samples
}

#[test]
fn api_results_equal_in_process_inference_on_the_same_inputs() {
    use plaster_agent::inference::{
        select_runtime, DeviceKind, ModelSource, OnnxModel, PlanOptions, Precision, PreparedModel,
    };
    use tract_onnx::prelude::*;

    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    // A long batching window so concurrent requests share batches (and padding is exercised).
    let (mut daemon, addr) = start(dir.path(), &broker, |c| {
        c.api_extra = "max_queue_delay_us = 50000\ninstances = 2".into();
    });
    let (rows, _, _) = digits_rows(24);

    let source = ModelSource::resolve(&plaster_agent_tests::model_path("digits")).unwrap();
    let model = OnnxModel::load(source).unwrap();
    let choice = select_runtime(DeviceKind::Cpu).unwrap();
    let prepared =
        PreparedModel::prepare(&model, 1, &choice, PlanOptions::new(Precision::F32, 1)).unwrap();
    let mut session = prepared.session().unwrap();
    let in_process: Vec<Vec<f32>> = rows
        .iter()
        .map(|row| {
            let x = Tensor::from_shape(&[1, 64], row).unwrap();
            let out = session.run(tvec![x.into_tvalue()]).unwrap();
            out[1]
                .to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .copied()
                .collect()
        })
        .collect();

    // 24 clients at once, one row each: the batcher runs them in batches of up to 8.
    let answers: Vec<(Vec<f64>, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .iter()
            .map(|row| {
                let addr = addr.clone();
                scope.spawn(move || {
                    let r = http::post_json(
                        &addr,
                        "/v2/models/digits/infer",
                        &infer_json(std::slice::from_ref(row)),
                    );
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    let batch = r.json()["parameters"]["batch_size"].as_u64().unwrap();
                    (scores(&r).remove(0), batch)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().any(|(_, batch)| *batch > 1),
        "no request shared a batch: {:?}",
        answers.iter().map(|a| a.1).collect::<Vec<_>>()
    );
    for ((api, _), local) in answers.iter().zip(&in_process) {
        assert_eq!(
            argmax(api),
            argmax(&local.iter().map(|v| f64::from(*v)).collect::<Vec<_>>())
        );
        for (a, b) in api.iter().zip(local) {
            assert!(
                (a - f64::from(*b)).abs() <= 1e-5 * (1.0 + a.abs()),
                "API {a} vs in-process {b}"
            );
        }
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0));
}

#[test]
fn bad_requests_get_exact_oip_errors_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let (mut daemon, addr) = start(dir.path(), &broker, |c| {
        c.api_extra = "max_body_bytes = 65536".into();
    });
    let (rows, _, _) = digits_rows(1);
    let good = infer_json(&rows).to_string();
    let infer = "/v2/models/digits/infer";
    let post = |path: &str, body: &str| {
        http::request(
            &addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    };

    let cases: Vec<(Response, u16, String)> = vec![
        (post(infer, "{\"inputs\": [{\"name\": "), 400,
         "malformed inference request: EOF while parsing a value at line 1 column 21".into()),
        (post(infer, &good.replace("FP32", "INT64")), 400,
         "input \"X\": datatype INT64 does not match the model's FP32".into()),
        (post(infer, &good.replace("[1,64]", "[1,63]")), 400,
         "input \"X\": shape [1, 63] does not match the model's [-1, 64] (-1: a batch of 1 to 8)".into()),
        (post(infer, &good.replace("[1,64]", "[9,64]")), 400,
         "input \"X\": batch size 9 is outside 1..=8 (the server's max_batch)".into()),
        (post(infer, "{\"inputs\": []}"), 400, "missing input \"X\" (FP32 [-1, 64])".into()),
        (post(infer, &good.replace("\"name\":\"X\"", "\"name\":\"x\"")), 400,
         "unexpected input \"x\": the model's inputs are \"X\"".into()),
        (post("/v2/models/mnist/infer", &good), 404,
         "unknown model \"mnist\": this agent serves \"digits\"".into()),
        (post("/v2/models/digits/versions/3/infer", &good), 404,
         "model \"digits\" has no version \"3\" (active: unversioned)".into()),
        (http::get(&addr, "/v2/models/digits/versions/3"), 404,
         "model \"digits\" has no version \"3\" (active: unversioned)".into()),
        (post(infer, &format!("{{\"inputs\": [], \"pad\": \"{}\"}}", "x".repeat(70_000))), 413,
         "request body exceeds api.max_body_bytes (65536 bytes)".into()),
        (http::get(&addr, "/v2/repository/index"), 404, "no such endpoint".into()),
        (http::get(&addr, infer), 405, "method not allowed on this endpoint".into()),
    ];
    for (r, status, message) in cases {
        assert_eq!((r.status, r.error()), (status, message));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }

    // The binary extension: a header length that lies about the body, a chunk cut short,
    // and NaN / infinity, which JSON cannot carry but binary data can.
    let binary = |values: &[f32], size: usize, claimed: Option<usize>| {
        let header = json!({"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32",
                                         "parameters": {"binary_data_size": size}}]})
        .to_string();
        let mut body = header.clone().into_bytes();
        values
            .iter()
            .for_each(|v| body.extend_from_slice(&v.to_le_bytes()));
        let length = claimed.unwrap_or(header.len()).to_string();
        http::request(
            &addr,
            "POST",
            infer,
            &[("Inference-Header-Content-Length", &length)],
            &body,
        )
    };
    let mut row = rows[0].clone();
    let r = binary(&row, 256, Some(100_000));
    let header_len = json!({"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 256}}]})
    .to_string()
    .len();
    assert_eq!(
        (r.status, r.error()),
        (
            400,
            format!(
                "Inference-Header-Content-Length 100000 exceeds the body's {} bytes",
                header_len + 256
            )
        )
    );
    let r = binary(&row[..60], 256, None);
    assert_eq!((r.status, r.error()), (400, "input \"X\": binary_data_size 256 but only 240 bytes of binary data are left in the body".into()));
    let r = binary(&row, 200, None);
    assert_eq!(
        (r.status, r.error()),
        (
            400,
            "input \"X\": binary_data_size 200 does not match shape [1, 64] of FP32 (256 bytes)"
                .into()
        )
    );
    row[7] = f32::NAN;
    let r = binary(&row, 256, None);
    assert_eq!(
        (r.status, r.error()),
        (
            400,
            "input \"X\": element 7 is NaN; inputs must be finite numbers".into()
        )
    );
    row[7] = f32::INFINITY;
    let r = binary(&row, 256, None);
    assert_eq!(
        (r.status, r.error()),
        (
            400,
            "input \"X\": element 7 is inf; inputs must be finite numbers".into()
        )
    );

    // Still serving, and every refusal was counted.
    let r = post(infer, &good);
    assert_eq!(r.status, 200);
    let metrics = String::from_utf8(http::get(&addr, "/metrics").body).unwrap();
    assert!(
        metrics.contains("plaster_api_responses_total{code=\"4xx\"} 17"),
        "{metrics}"
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0));
}

#[test]
fn a_standard_kserve_client_works_unmodified() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let (mut daemon, addr) = start(dir.path(), &broker, |_| {});
    let script = plaster_agent_tests::repo_root().join("tests/clients/kserve_client.py");
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg(&addr)
        .arg(plaster_agent_tests::model_path(""))
        .output()
        .expect(
            "python3 runs (the client tests need Python 3 with tests/clients/requirements.txt)",
        );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named"),
        "the standard clients are not installed: pip install -r tests/clients/requirements.txt\n{stderr}"
    );
    assert!(
        output.status.success(),
        "the KServe client failed:\n{stderr}"
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["binary_batch1"], 24);
    assert_eq!(seen["json_batch8"], 24);
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0));
}

#[test]
fn the_api_listens_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let socket = dir.path().join("api.sock");
    let mut config = DaemonConfig::new(dir.path(), "api-unix", &broker.url());
    config.workload_rate_per_s = 0.0;
    config.api_listen = format!("unix:{}", socket.display());
    let mut daemon = Daemon::start(&config.write(dir.path()));
    daemon.wait_for_log("inference API serving", READY);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "the agent's group may connect");
    let r = http::request_unix(&socket, "GET", "/v2/health/ready", b"");
    assert_eq!((r.status, r.json()), (200, json!({"ready": true})));
    let (rows, labels, _) = digits_rows(2);
    let r = http::request_unix(
        &socket,
        "POST",
        "/v2/models/digits/infer",
        infer_json(&rows).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let predicted: Vec<i64> = scores(&r).iter().map(|s| argmax(s) as i64).collect();
    assert_eq!(predicted, labels);
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0));
    assert!(!socket.exists(), "the socket file is removed on stop");
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn ten_thousand_connections_are_answered_or_shed_with_memory_bounded() {
    const CONNECTIONS: usize = 10_000;
    // The test holds every connection open at once: it needs the descriptors.
    rlimit::increase_nofile_limit(CONNECTIONS as u64 + 1000).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let (mut daemon, addr) = start(dir.path(), &broker, |c| {
        // Room in the queue for every connection served at once: whoever gets a connection is
        // served; only connections beyond the limit are shed.
        c.api_extra = "max_connections = 256\nmax_queue = 256".into();
    });
    let before = peak_rss_bytes(daemon.pid());
    let (rows, _, _) = digits_rows(1);
    let request = http::encode(
        "POST",
        "/v2/models/digits/infer",
        &[("Content-Type", "application/json")],
        infer_json(&rows).to_string().as_bytes(),
    );
    // All connections open at once, then a request on each: the agent serves up to
    // max_connections of them and answers the others 503 at once.
    let mut streams = Vec::with_capacity(CONNECTIONS);
    let opening = std::time::Instant::now();
    for _ in 0..CONNECTIONS {
        let s = TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        streams.push(s);
    }
    eprintln!("{CONNECTIONS} connections open in {:?}", opening.elapsed());
    for s in &mut streams {
        // A connection the agent already shed may refuse the write; its answer is read below.
        let _ = s.write_all(&request);
    }
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for mut s in streams {
        let mut raw = Vec::new();
        let outcome = match s.read_to_end(&mut raw) {
            Ok(_) if raw.is_empty() => "closed without an answer".to_string(),
            Ok(_) => {
                let r = http::decode(&raw);
                match r.status {
                    200 => "200".to_string(),
                    503 => {
                        assert_eq!(r.header("retry-after"), Some("1"));
                        format!("503 {}", r.error())
                    }
                    other => format!("{other} {}", String::from_utf8_lossy(&r.body)),
                }
            }
            Err(e) => format!("error {}", e.kind()),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    let allowed = [
        "200",
        "503 too many connections (api.max_connections); retry after 1 s",
        "503 the inference queue is full (api.max_queue); retry after the Retry-After delay",
    ];
    for (outcome, n) in &outcomes {
        assert!(
            allowed.contains(&outcome.as_str()),
            "{n} connections: {outcome} (all: {outcomes:?})"
        );
    }
    assert!(
        outcomes.get("200").copied().unwrap_or(0) >= 256,
        "{outcomes:?}"
    );
    let after = peak_rss_bytes(daemon.pid());
    eprintln!(
        "outcomes {outcomes:?}; peak RSS {} MiB before, {} MiB after",
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + (128 << 20),
        "peak RSS grew from {before} to {after} bytes"
    );
    // Still serving.
    let r = http::post_json(&addr, "/v2/models/digits/infer", &infer_json(&rows));
    assert_eq!(r.status, 200);
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0));
}

#[test]
fn bench_target_measures_the_served_path_with_the_in_process_accuracy() {
    use plaster_agent_tests::{agent, expected};
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let (mut daemon, addr) = start(dir.path(), &broker, |_| {});
    let url = format!("http://{addr}");

    // Single stream through the API: the dataset answered by the agent gives the accuracy
    // the generating script computed with onnxruntime, to the last sample.
    let report = agent(&[
        "bench",
        "models/digits",
        "--target",
        &url,
        "--duration",
        "0.5",
        "--json",
    ])
    .json();
    assert_eq!(report["schema"], "plaster.bench-target/1");
    assert_eq!(report["scenario"], "single-stream");
    assert_eq!(report["failed"], 0);
    assert!(report["requests"].as_u64().unwrap() > 0);
    assert!(report["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(report["server_compute_us_p50"].as_f64().unwrap() > 0.0);
    let want = &expected()["digits"]["accuracy"];
    assert_eq!(report["accuracy_samples"], want["samples"]);
    assert_eq!(report["accuracy_top1"].as_f64(), want["top1"].as_f64());

    // Server scenario: Poisson arrivals, open loop, against a p99 bound.
    let report = agent(&[
        "bench",
        "models/digits",
        "--target",
        &url,
        "--scenario",
        "server",
        "--target-qps",
        "200",
        "--latency-bound-ms",
        "1000",
        "--duration",
        "0.5",
        "--json",
    ])
    .json();
    assert_eq!(report["target_qps"], 200.0);
    assert_eq!(report["bound_met"], true);
    assert_eq!(report["failed"], 0);

    // A target that is not an OIP server of this model says so.
    let run = agent(&[
        "bench",
        "models/digits",
        "--target",
        "ftp://x",
        "--duration",
        "0.1",
    ]);
    run.assert_error(
        1,
        "error: --target \"ftp://x\" is not an http://HOST:PORT URL",
    );
    let run = agent(&[
        "bench",
        "models/squeezenet/model.onnx",
        "--target",
        &url,
        "--duration",
        "0.1",
    ]);
    run.assert_error(
        1,
        &format!("error: {url}: the target does not serve \"squeezenet\": GET /v2/models/squeezenet: 404 Not Found: {{\"error\":\"unknown model \\\"squeezenet\\\": this agent serves \\\"digits\\\"\"}}"),
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0));
}

#[test]
fn a_taken_port_fails_the_start_with_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut config = DaemonConfig::new(dir.path(), "api-taken", &broker.url());
    config.api_listen = addr.to_string();
    let mut daemon = Daemon::start(&config.write(dir.path()));
    let line = daemon.wait_for_log("error: api.listen", Duration::from_secs(30));
    assert_eq!(
        line,
        format!("error: api.listen http://{addr}: Address already in use (os error 98)")
    );
    assert_eq!(daemon.wait(Duration::from_secs(30)), Some(1));
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_the_rest_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    // SqueezeNet takes milliseconds per inference: with room for one waiting request, eight
    // clients at once overflow the queue.
    let (mut daemon, addr) = start(dir.path(), &broker, |c| {
        c.model = plaster_agent_tests::model_path("squeezenet");
        c.api_extra = "max_queue = 1".into();
    });
    let meta = http::get(&addr, "/v2/models/squeezenet").json();
    assert_eq!(meta["inputs"][0]["shape"], json!([1, 3, 224, 224]));
    let header = json!({"inputs": [{"name": meta["inputs"][0]["name"], "shape": [1, 3, 224, 224],
                                    "datatype": "FP32", "parameters": {"binary_data_size": 3 * 224 * 224 * 4}}],
                        "parameters": {"binary_data_output": true}})
    .to_string();
    let mut body = header.clone().into_bytes();
    for ix in 0..3 * 224 * 224 {
        body.extend_from_slice(&((ix % 255) as f32 / 255.0).to_le_bytes());
    }
    let length = header.len().to_string();
    let barrier = std::sync::Barrier::new(8);
    let statuses: Vec<(u16, Option<String>, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    let r = http::request(
                        &addr,
                        "POST",
                        "/v2/models/squeezenet/infer",
                        &[("Inference-Header-Content-Length", &length)],
                        &body,
                    );
                    let message = if r.status == 200 {
                        String::new()
                    } else {
                        r.error()
                    };
                    (
                        r.status,
                        r.header("retry-after").map(str::to_string),
                        message,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = statuses.iter().filter(|s| s.0 != 200).collect();
    assert!(!refused.is_empty(), "no request was refused: {statuses:?}");
    assert!(statuses.iter().any(|s| s.0 == 200), "{statuses:?}");
    for (status, retry, message) in refused {
        assert_eq!(
            (*status, retry.as_deref(), message.as_str()),
            (
                503,
                Some("1"),
                "the inference queue is full (api.max_queue); retry after the Retry-After delay"
            )
        );
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0));
}
