//! `plaster-agent bench` end to end: the real binary on the real models in models/.

use std::fs;

use ndarray_npy::NpzWriter;
use plaster_agent_tests::{agent, expected, model_path};
use serde_json::Value;
use tract_onnx::prelude::tract_ndarray::{Array1, Array2};

const QUICK: &[&str] = &["--duration", "0.3"];

fn bench_json(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(QUICK);
    all.push("--json");
    agent(&all).json()
}

#[test]
fn digits_scorecard_reports_every_letter_with_the_generated_accuracy() {
    let report = bench_json(&["models/digits", "--device", "cpu"]);
    assert_eq!(report["schema"], "plaster/v1");

    // A: the exact figure the generating script computed with onnxruntime, to the last sample.
    let want = &expected()["digits"]["accuracy"];
    let accuracy = &report["accuracy"];
    assert_eq!(accuracy["metric"], "top1");
    assert_eq!(accuracy["samples"], want["samples"]);
    assert_eq!(accuracy["value"].as_f64(), want["top1"].as_f64());
    assert_eq!(accuracy["precision"], "f32");
    assert_eq!(accuracy["delta_vs_f32"], Value::Null);

    let device = &report["device"];
    assert_eq!(device["runtime"], "cpu");
    assert_eq!(device["threads"], 1);
    assert_eq!(device["arch"], std::env::consts::ARCH);
    assert!(!device["id"].as_str().unwrap().is_empty());

    let model = &report["model"];
    assert_eq!(model["name"], "digits");
    assert_eq!(model["format"], "onnx");
    assert_eq!(model["version"], Value::Null);
    let bytes = fs::read(model_path("digits/model.onnx")).unwrap();
    assert_eq!(model["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(report["size"]["file_bytes"], bytes.len() as u64);

    let p = &report["programmability"];
    assert!(p["nodes_total"].as_u64().unwrap() > 0);
    assert_eq!(p["nodes_on_accelerator"], 0);
    assert_eq!(p["cpu_fallback_ops"], serde_json::json!([]));

    let l = &report["latency_ms"];
    let count = l["count"].as_u64().unwrap();
    assert!(count > 0);
    let (p50, p90, p99, max) = (
        l["p50"].as_f64().unwrap(),
        l["p90"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max * 1.001,
        "{l}"
    );

    // 64 inputs x 64 hidden + 64 x 10 output weights, plus biases: the MLP's real size.
    assert_eq!(report["size"]["parameters"], 64 * 64 + 64 + 64 * 10 + 10);
    assert!(report["size"]["flops_per_inference"].as_u64().unwrap() >= 2 * (64 * 64 + 64 * 10));
    assert!(report["size"]["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);

    let t = &report["throughput"];
    assert_eq!(t["scenario"], "single-stream");
    assert_eq!(t["batch"], 1);
    let ips = t["inferences_per_s"].as_f64().unwrap();
    let duration = t["duration_s"].as_f64().unwrap();
    assert!((ips * duration - count as f64).abs() < 1.0, "{t}");
    assert_eq!(t["valid"], Value::Null);

    assert!(report["energy"]["status"]
        .as_str()
        .unwrap()
        .starts_with("unavailable: "));
    assert_eq!(report["energy"]["joules_per_inference"], Value::Null);
    assert_eq!(report["energy"]["samples"], 0);
    let learning = &report["learning"];
    assert_eq!(
        learning["status"],
        "unavailable: bench runs no model updates"
    );
    assert_eq!(learning["push_to_active_s"], Value::Null);
    assert_eq!(learning["updates_ok"], 0);
}

#[test]
fn report_has_exactly_the_documented_keys() {
    let report = bench_json(&["models/digits/model.onnx", "--device", "cpu"]);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    let sorted = |mut v: Vec<&str>| {
        v.sort();
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(
        keys(&report),
        sorted(vec![
            "schema",
            "device",
            "model",
            "programmability",
            "latency_ms",
            "accuracy",
            "size",
            "throughput",
            "energy",
            "learning"
        ])
    );
    assert_eq!(
        keys(&report["device"]),
        sorted(vec!["id", "arch", "runtime", "threads"])
    );
    assert_eq!(
        keys(&report["model"]),
        sorted(vec!["name", "version", "sha256", "format"])
    );
    assert_eq!(
        keys(&report["latency_ms"]),
        sorted(vec!["count", "mean", "p50", "p90", "p99", "max"])
    );
    assert_eq!(
        keys(&report["size"]),
        sorted(vec![
            "file_bytes",
            "parameters",
            "flops_per_inference",
            "peak_rss_bytes"
        ])
    );
    assert_eq!(
        keys(&report["energy"]),
        sorted(vec![
            "status",
            "source",
            "joules_per_inference",
            "marginal_joules_per_inference",
            "inferences_per_joule",
            "mean_power_w",
            "idle_power_w",
            "samples",
            "battery"
        ])
    );
    assert_eq!(
        keys(&report["learning"]),
        sorted(vec![
            "status",
            "active_since",
            "push_to_active_s",
            "updates_ok",
            "updates_rejected",
            "rollbacks"
        ])
    );
    // A plain .onnx file has no bundle dataset: accuracy is null, not invented.
    assert_eq!(report["accuracy"], Value::Null);
    assert_eq!(report["model"]["name"], "digits");
}

#[test]
fn squeezenet_size_and_programmability() {
    let report = bench_json(&["models/squeezenet/model.onnx", "--device", "cpu"]);
    assert_eq!(
        report["size"]["parameters"],
        expected()["squeezenet"]["parameters"]
    );
    // SqueezeNet 1.1 at 224x224 costs about 352 M multiply-accumulates (2 FLOPs each) in its
    // convolutions; tract's cost model must land within 10% of that.
    let flops = report["size"]["flops_per_inference"].as_u64().unwrap() as f64;
    assert!((flops / 704e6 - 1.0).abs() < 0.1, "{flops}");
    assert!(report["programmability"]["nodes_total"].as_u64().unwrap() >= 26);
    assert_eq!(report["throughput"]["batch"], 1);
}

#[test]
fn offline_uses_a_batch_and_counts_samples() {
    let report = bench_json(&["models/digits", "--device", "cpu", "--scenario", "offline"]);
    let t = &report["throughput"];
    assert_eq!(t["scenario"], "offline");
    assert_eq!(t["batch"], 8);
    let queries = report["latency_ms"]["count"].as_f64().unwrap();
    let ips = t["inferences_per_s"].as_f64().unwrap();
    assert!(
        (ips * t["duration_s"].as_f64().unwrap() - 8.0 * queries).abs() < 8.0,
        "{t}"
    );
    assert_eq!(
        report["accuracy"]["value"].as_f64(),
        expected()["digits"]["accuracy"]["top1"].as_f64()
    );
}

#[test]
fn server_reports_its_rate_and_bound() {
    let report = bench_json(&[
        "models/digits",
        "--device",
        "cpu",
        "--scenario",
        "server",
        "--target-qps",
        "200",
        "--latency-bound-ms",
        "100",
    ]);
    let t = &report["throughput"];
    assert_eq!(t["scenario"], "server");
    assert_eq!(t["target_qps"], 200.0);
    assert_eq!(t["latency_bound_ms"], 100.0);
    assert!(t["bound_met"].is_boolean());
}

#[test]
fn server_find_peak_returns_a_rate() {
    let report = bench_json(&[
        "models/digits",
        "--device",
        "cpu",
        "--scenario",
        "server",
        "--find-peak",
        "--latency-bound-ms",
        "20",
    ]);
    let t = &report["throughput"];
    assert!(t["target_qps"].as_f64().unwrap() > 0.0);
    assert!(t["bound_met"].is_boolean());
}

#[test]
fn strict_run_that_is_too_short_is_reported_invalid() {
    // --strict stretches the run to MLPerf's 600 s; check the flag is carried, on a run the
    // scenario itself bounds: a server whose first query already blows the bound ends at once.
    let run = agent(&[
        "bench",
        "models/squeezenet/model.onnx",
        "--device",
        "cpu",
        "--scenario",
        "server",
        "--target-qps",
        "100000",
        "--latency-bound-ms",
        "0.001",
        "--strict",
        "--json",
    ]);
    let report = run.json();
    assert_eq!(report["throughput"]["valid"], false);
    assert_eq!(report["throughput"]["bound_met"], false);
}

#[test]
fn f16_reports_its_delta_against_f32() {
    let report = bench_json(&["models/digits", "--device", "cpu", "--precision", "f16"]);
    let a = &report["accuracy"];
    assert_eq!(a["precision"], "f16");
    let value = a["value"].as_f64().unwrap();
    let delta = a["delta_vs_f32"].as_f64().unwrap();
    let f32_value = expected()["digits"]["accuracy"]["top1"].as_f64().unwrap();
    assert!((value - delta - f32_value).abs() < 1e-12, "{a}");
    // Half precision barely moves a 64-unit MLP: within two samples of f32.
    assert!(delta.abs() <= 2.0 / 540.0, "{a}");
}

#[test]
fn auto_falls_back_to_the_cpu_where_cuda_cannot_start() {
    let cuda = agent(&[
        "bench",
        "models/digits",
        "--device",
        "cuda",
        "--duration",
        "0.1",
        "--json",
    ]);
    let auto = bench_json(&["models/digits", "--device", "auto"]);
    if cuda.code == 0 {
        assert_eq!(auto["device"]["runtime"], "cuda");
    } else {
        assert_eq!(auto["device"]["runtime"], "cpu");
        // The message says what failed and names the library the loader could not find.
        let line = cuda
            .stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or_default();
        assert!(
            line.starts_with("error: --device cuda: CUDA runtime unavailable: "),
            "{line}"
        );
        let driver_installed = std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so.1"))
            .unwrap_or(false);
        if !driver_installed {
            assert!(line.contains("libcuda.so.1"), "{line}");
        }
        assert_eq!(cuda.code, 1);
        assert!(!cuda.stderr.contains("panicked"));
    }
}

#[test]
fn human_scorecard_shows_the_seven_letters() {
    let run = agent(&[
        "bench",
        "models/digits",
        "--device",
        "cpu",
        "--duration",
        "0.2",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for row in [
        "Programmability",
        "Latency",
        "Accuracy",
        "Size of model",
        "Throughput",
        "Energy efficiency",
        "Rate of learning",
    ] {
        assert!(run.stdout.contains(row), "missing {row}: {}", run.stdout);
    }
    assert!(
        run.stdout.contains("top-1 96.48% of 540 samples (f32)"),
        "{}",
        run.stdout
    );
}

// ---- bad input: each with its exact message, exit status and no panic ----

fn check_error(args: &[&str], code: i32, message: &str) {
    agent(args).assert_error(code, message);
}

#[test]
fn missing_model_file() {
    check_error(
        &["bench", "models/nope.onnx"],
        1,
        "error: model \"models/nope.onnx\": file not found",
    );
}

#[test]
fn a_file_that_is_not_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.onnx");
    fs::write(&path, "these are meeting notes, not a model\n").unwrap();
    let p = path.to_str().unwrap();
    let run = agent(&["bench", p]);
    assert!(!run.stderr.contains("panicked"));
    assert_eq!(run.code, 1);
    let line = run.stderr.lines().find(|l| l.starts_with("error")).unwrap();
    assert!(
        line.starts_with(&format!("error: model \"{p}\": not an ONNX model (")),
        "{line}"
    );
}

#[test]
fn an_empty_file_is_not_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.onnx");
    fs::write(&path, "").unwrap();
    let p = path.to_str().unwrap();
    check_error(
        &["bench", p],
        1,
        &format!("error: model \"{p}\": not an ONNX model (no ONNX IR version)"),
    );
}

#[test]
fn an_op_tract_cannot_run_is_named() {
    check_error(
        &["bench", "models/testdata/unsupported_roialign.onnx"],
        1,
        "error: model \"models/testdata/unsupported_roialign.onnx\": unsupported op \"RoiAlign\" (node \"roi_align\")",
    );
}

#[test]
fn a_bundle_directory_without_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().to_str().unwrap();
    check_error(
        &["bench", p],
        1,
        &format!("error: bundle \"{p}\": no model.onnx in the bundle directory"),
    );
}

fn write_npz(path: &std::path::Path, x: Option<Array2<f32>>, y: Option<Array1<i64>>) {
    let mut npz = NpzWriter::new(fs::File::create(path).unwrap());
    if let Some(x) = x {
        npz.add_array("x", &x).unwrap();
    }
    if let Some(y) = y {
        npz.add_array("y", &y).unwrap();
    }
    npz.finish().unwrap();
}

#[test]
fn dataset_errors() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str, x: Option<Array2<f32>>, y: Option<Array1<i64>>, message: &str| {
        let path = dir.path().join(name);
        write_npz(&path, x, y);
        let p = path.to_str().unwrap();
        check_error(
            &[
                "bench",
                "models/digits/model.onnx",
                "--dataset",
                p,
                "--duration",
                "0.1",
            ],
            1,
            &message.replace("{p}", p),
        );
    };
    case(
        "no_x.npz",
        None,
        Some(Array1::zeros(4)),
        "error: dataset \"{p}\": no array \"x\" (inputs); it holds: y",
    );
    case(
        "no_y.npz",
        Some(Array2::zeros((4, 64))),
        None,
        "error: dataset \"{p}\": no array \"y\" (integer labels); it holds: x",
    );
    case(
        "short_y.npz",
        Some(Array2::zeros((4, 64))),
        Some(Array1::zeros(3)),
        "error: dataset \"{p}\": y has 3 labels but x has 4 samples",
    );
    case(
        "wrong_shape.npz",
        Some(Array2::zeros((4, 63))),
        Some(Array1::zeros(4)),
        "error: dataset \"{p}\": x samples have shape [63] but model input \"X\" expects [64] per sample",
    );
    check_error(
        &["bench", "models/digits", "--dataset", "models/none.npz"],
        1,
        "error: dataset \"models/none.npz\": file not found",
    );
    let garbage = dir.path().join("garbage.npz");
    fs::write(&garbage, "not a zip").unwrap();
    let run = agent(&[
        "bench",
        "models/digits",
        "--dataset",
        garbage.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(&format!(
            "error: dataset \"{}\": not an NPZ archive (",
            garbage.display()
        )),
        "{}",
        run.stderr
    );
}

#[test]
fn usage_errors_exit_2() {
    let run = agent(&["bench", "models/digits", "--threads", "0"]);
    run.assert_error(
        2,
        "error: invalid value '0' for '--threads <N>': 0 is not in 1..=1024",
    );
    let run = agent(&["bench", "models/digits", "--duration", "0"]);
    run.assert_error(2, "error: invalid value '0' for '--duration <SECS>': the duration must be more than 0 seconds, got 0");
    let run = agent(&["bench", "models/digits", "--target-qps", "10"]);
    run.assert_error(2, "error: --target-qps applies to --scenario server only");
    let run = agent(&["bench", "models/digits", "--device", "tpu"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("invalid value 'tpu' for '--device <DEVICE>'"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_fixed_batch_model_refuses_another_batch() {
    check_error(
        &["bench", "models/squeezenet/model.onnx", "--batch", "4"],
        1,
        "error: --batch 4: model input \"data_0\" has a fixed batch of 1",
    );
}

#[test]
fn profile_says_where_the_time_goes() {
    let report = bench_json(&[
        "models/squeezenet/model.onnx",
        "--device",
        "cpu",
        "--profile",
    ]);
    let p = &report["profile"];
    assert!(p["runs"].as_u64().unwrap() >= 1);
    let ops = p["ops"].as_array().unwrap();
    let shares: f64 = ops.iter().map(|o| o["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-6, "{shares}");
    // The ops' times account for a run's wall time, within 5% (median over runs).
    let wall = p["wall_ms_per_inference"].as_f64().unwrap();
    let in_ops: f64 = ops
        .iter()
        .map(|o| o["ms_per_inference"].as_f64().unwrap())
        .sum();
    let coverage = p["ops_share_of_wall"].as_f64().unwrap();
    assert!(
        (coverage - 1.0).abs() < 0.05,
        "ops cover {coverage} of a run ({in_ops} of {wall} ms in all)"
    );
    assert!((p["ops_ms_per_inference"].as_f64().unwrap() - in_ops).abs() < 1e-6 * wall.max(1.0));
    // A CNN's convolutions are matmuls (ours on AVX-512 or AVX2 CPUs, else tract's): the cost model
    // gives their rate.
    let conv_op = if plaster_agent::inference::rewrite::gemm_kernel_available() {
        "GemmConv"
    } else {
        "OptMatMul"
    };
    let matmul = ops
        .iter()
        .find(|o| o["op"] == conv_op)
        .unwrap_or_else(|| panic!("{conv_op} in the profile"));
    assert!(matmul["gflops_per_s"].as_f64().unwrap() > 0.0);
    assert!(matmul["nodes"].as_u64().unwrap() >= 20);
    let sorted = ops
        .windows(2)
        .all(|w| w[0]["ms_per_inference"].as_f64() >= w[1]["ms_per_inference"].as_f64());
    assert!(sorted, "ops are listed slowest first");
    // The slowest nodes, by name: each no slower than its op kind's total, slowest first.
    let nodes = p["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), plaster_agent::inference::SLOWEST_NODES);
    for node in nodes {
        assert!(!node["name"].as_str().unwrap().is_empty(), "{node}");
        let kind = ops.iter().find(|o| o["op"] == node["op"]).unwrap();
        assert!(node["ms_per_inference"].as_f64() <= kind["ms_per_inference"].as_f64());
    }
    let sorted = nodes
        .windows(2)
        .all(|w| w[0]["ms_per_inference"].as_f64() >= w[1]["ms_per_inference"].as_f64());
    assert!(sorted, "nodes are listed slowest first");
    assert!(
        nodes.iter().any(|n| n["op"] == conv_op
            && !n["info"].as_str().unwrap().is_empty()
            && n["gflops_per_s"].as_f64().unwrap() > 0.0),
        "a convolution among the slowest nodes, with its shape and rate: {nodes:?}"
    );
}

#[test]
fn rewrites_are_reported_checked_and_can_be_turned_off() {
    let op_names = |report: &Value| -> Vec<String> {
        report["profile"]["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["op"].as_str().unwrap().to_string())
            .collect()
    };
    let squeezenet = [
        "models/squeezenet/model.onnx",
        "--device",
        "cpu",
        "--profile",
    ];
    let mut args = squeezenet.to_vec();
    args.push("--check-outputs");
    let ours = bench_json(&args);
    let rewrites = &ours["programmability"]["rewrites"];
    assert_eq!(rewrites["max_pools"], 3, "{rewrites}");
    assert!(op_names(&ours).contains(&"RowMaxPool".to_string()));
    // Checked against tract's unmodified plan on the same inputs.
    let diff = ours["outputs_vs_cpu"]["max_abs_diff"].as_f64().unwrap();
    assert!(diff < 1e-5, "rewrites moved SqueezeNet's outputs by {diff}");

    let mut args = squeezenet.to_vec();
    args.push("--no-rewrites");
    let plain = bench_json(&args);
    // Nothing rewritten: the key is left out (no bytes in telemetry for it).
    assert!(
        plain["programmability"].get("rewrites").is_none(),
        "{plain}"
    );
    let ops = op_names(&plain);
    assert!(ops.contains(&"OptMaxPool".to_string()), "{ops:?}");
    assert!(
        !ops.iter()
            .any(|op| op.starts_with("Row") || op == "ChannelAffine"),
        "{ops:?}"
    );
}

#[test]
fn a_reader_that_goes_away_is_not_a_crash() {
    // `plaster-agent bench --json | head -c 10`: stdout closes before the report is written.
    let mut child = std::process::Command::new(plaster_agent_tests::agent_bin())
        .args([
            "bench",
            "models/digits",
            "--device",
            "cpu",
            "--duration",
            "0.2",
            "--json",
        ])
        .current_dir(plaster_agent_tests::repo_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}

#[test]
fn check_outputs_compares_with_the_cpu_in_f32() {
    let same = bench_json(&["models/digits", "--check-outputs"]);
    let check = &same["outputs_vs_cpu"];
    assert_eq!(check["compared"], "cpu f32 vs cpu f32");
    assert_eq!(check["max_abs_diff"], 0.0);
    assert_eq!(check["integer_mismatches"], 0);
    assert!(check["inputs"].as_u64().unwrap() > 0);

    // f16 computes something slightly different: visible, small.
    let half = bench_json(&["models/digits", "--precision", "f16", "--check-outputs"]);
    let check = &half["outputs_vs_cpu"];
    assert_eq!(check["compared"], "cpu f16 vs cpu f32");
    let diff = check["max_abs_diff"].as_f64().unwrap();
    assert!(diff > 0.0 && diff < 0.05, "f16 vs f32: {diff}");

    // Absent unless asked for.
    assert!(bench_json(&["models/digits"])
        .get("outputs_vs_cpu")
        .is_none());
}
