//! Over-the-air model updates against a real daemon and a real broker: `plaster-agent push`
//! end to end, every bad push refused with its reason while the old model keeps serving,
//! resumption after a kill, a crash at each step of activation, and the canary's rollback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plaster_agent_tests::broker::Broker;
use plaster_agent_tests::daemon::{Daemon, DaemonConfig};
use plaster_agent_tests::http;
use plaster_agent_tests::mqtt::{Message, Subscriber};
use plaster_agent_tests::ota::{
    bundle_of, digits_bundle, events_topic, push_topic, wait_event, Key, Transfer,
};
use plaster_agent_tests::{agent, model_path, Run, TinyFs};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn topic(device: &str, leaf: &str) -> String {
    format!("plaster/v1/lab/{device}/{leaf}")
}

/// The retained model state, as a dashboard that connects now reads it (a fresh connection:
/// retained messages are delivered on subscribe, and later ones as they come).
fn model_state(
    broker: &Broker,
    daemon: &Daemon,
    device: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    retained(broker, daemon, device, "model/state", wanted)
}

/// The retained message on `leaf` once it is one `wanted`; on a timeout the test fails with
/// the values that came instead and the daemon's log.
fn retained(
    broker: &Broker,
    daemon: &Daemon,
    device: &str,
    leaf: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let t = topic(device, leaf);
    static CHECKS: AtomicU64 = AtomicU64::new(0);
    let id = format!(
        "ota-check-{}-{}",
        std::process::id(),
        CHECKS.fetch_add(1, Ordering::Relaxed)
    );
    let sub = Subscriber::connect(broker.port, &id, true, &[t.as_str()]);
    let found = sub.try_wait_for(WAIT, |m: &Message| m.topic == t && wanted(&m.value()));
    sub.disconnect();
    match found {
        Ok(message) => message.value(),
        Err(others) => {
            let others: Vec<Value> = others.iter().map(Message::value).collect();
            panic!(
                "no wanted retained {leaf} within {WAIT:?}; received instead: {others:#?}\nthe daemon's log:\n{}",
                daemon.log()
            )
        }
    }
}

fn push(
    broker: &Broker,
    device: &str,
    key: &Key,
    model: &str,
    version: u64,
    extra: &[&str],
) -> Run {
    let mut args: Vec<String> = [
        "push",
        model,
        "--broker",
        &broker.url(),
        "--fleet",
        "lab",
        "--version",
        &version.to_string(),
        "--key",
        key.path.to_str().unwrap(),
        "--timeout",
        "120",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if device == "--all" {
        args.push("--all".into());
    } else {
        args.extend(["--device".to_string(), device.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent(&args)
}

/// The agent is subscribed to its push and command topics once its birth is out (it
/// subscribes before it publishes the birth, on the same connection).
fn online(sub: &Subscriber, device: &str) {
    let t = topic(device, "status");
    sub.wait_for("birth", WAIT, |m: &Message| {
        m.topic == t && m.value()["online"] == true
    });
}

fn infer_digits(addr: &str) -> http::Response {
    http::post_json(
        addr,
        "/v2/models/digits/infer",
        &json!({"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5f32; 64]}]}),
    )
}

/// A running agent for one test: its own broker, state directory and signing key, the agent
/// started with `[ota]` lines `ota`, ready (API serving, subscribed), and a subscriber to the
/// whole fleet.
struct Agent {
    broker: Broker,
    dir: tempfile::TempDir,
    key: Key,
    sub: Subscriber,
    config: std::path::PathBuf,
    daemon: Daemon,
    addr: String,
}

impl Agent {
    fn start(device: &str, ota: &str) -> Agent {
        Agent::start_with(device, ota, |_| {})
    }

    fn start_with(device: &str, ota: &str, edit: impl FnOnce(&mut DaemonConfig)) -> Agent {
        let broker = Broker::start();
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate(dir.path(), "ops-1");
        let sub = Subscriber::connect(
            broker.port,
            &format!("{device}-dashboard"),
            true,
            &["plaster/v1/lab/#"],
        );
        let mut config = DaemonConfig::new(dir.path(), device, &broker.url());
        config.extra = key.ota_section(ota);
        edit(&mut config);
        let config = config.write(dir.path());
        let daemon = Daemon::start(&config);
        let addr = daemon.api_addr();
        daemon.wait_for_log("inference API serving", WAIT);
        online(&sub, device);
        Agent {
            broker,
            dir,
            key,
            sub,
            config,
            daemon,
            addr,
        }
    }
}

#[test]
fn push_activates_new_versions_without_a_failed_request_and_rollback_goes_back() {
    let device = "ota-1";
    let Agent {
        broker,
        dir: _dir,
        key,
        sub,
        config,
        mut daemon,
        addr,
    } = Agent::start(device, "canary_s = 0");

    // Inference in a loop across every swap: none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let looper = {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let response = infer_digits(&addr);
                if response.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    errors.push(String::from_utf8_lossy(&response.body).into_owned());
                }
            }
            errors
        })
    };

    let digits = model_path("digits");
    let run = push(&broker, device, &key, digits.to_str().unwrap(), 2, &[]);
    assert_eq!(run.code, 0, "push v2: {}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(device) && run.stdout.contains("activated"),
        "{}",
        run.stdout
    );
    let state = model_state(&broker, &daemon, device, |v| v["active"]["version"] == 2);
    assert_eq!(state["active"]["name"], "digits");
    assert_eq!(state["last_result"]["state"], "activated");
    let birth = retained(&broker, &daemon, device, "status", |v| {
        v["model"]["version"] == 2
    });
    assert_eq!(birth["online"], true);

    let run = push(
        &broker,
        device,
        &key,
        digits.to_str().unwrap(),
        3,
        &["--min-accuracy", "0.5"],
    );
    assert_eq!(run.code, 0, "push v3: {}\n{}", run.stdout, run.stderr);
    let state = model_state(&broker, &daemon, device, |v| v["active"]["version"] == 3);
    assert_eq!(state["previous"][0]["version"], 2);
    assert_eq!(
        state["previous"][0]["sha256"], state["active"]["sha256"],
        "the same model.onnx"
    );
    assert_eq!(state["active"]["sha256"].as_str().unwrap().len(), 64);
    let metrics = &state["last_result"]["metrics"];
    assert_eq!(metrics["model"]["version"], 3);
    assert!(
        metrics["accuracy"]["value"].as_f64().unwrap() > 0.9,
        "{metrics}"
    );
    assert_eq!(metrics["learning"]["updates_ok"], 2);
    assert!(metrics["learning"]["push_to_active_s"].as_f64().unwrap() > 0.0);

    // The API answers from the new version.
    let meta = http::get(&addr, "/v2/models/digits").json();
    assert_eq!(meta["versions"], json!(["3"]), "{meta}");

    // A replayed older version is refused, with the reason in the table and exit 1.
    let run = push(&broker, device, &key, digits.to_str().unwrap(), 2, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stdout.contains("version 2 is not newer than active 3"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("error: 1 of 1 device(s) did not activate version 2"),
        "{}",
        run.stderr
    );

    // Telemetry carries the learning figures.
    let t = sub.wait_for("telemetry of v3", WAIT, |m| {
        m.topic == topic(device, "telemetry") && m.value()["model"]["version"] == 3
    });
    let learning = &t.value()["learning"];
    assert_eq!(learning["updates_ok"], 2);
    assert_eq!(learning["updates_rejected"], 1);

    // A signed rollback from v3 goes back to v2.
    let version = "3".to_string();
    let url = broker.url();
    let run = agent(&[
        "rollback",
        "--broker",
        &url,
        "--fleet",
        "lab",
        "--device",
        device,
        "--version",
        &version,
        "--key",
        key.path.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    assert_eq!(run.code, 0, "rollback: {}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("rolled_back"), "{}", run.stdout);
    model_state(&broker, &daemon, device, |v| v["active"]["version"] == 2);

    stop.store(true, Ordering::Relaxed);
    let errors = looper.join().unwrap();
    assert!(
        errors.is_empty(),
        "failed requests during the swaps: {errors:?}"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        ok.load(Ordering::Relaxed) > 50,
        "only {} requests ran",
        ok.load(Ordering::Relaxed)
    );

    // The active version is durable: a restart serves v2 from the store.
    daemon.signal("TERM");
    assert_eq!(daemon.wait(WAIT), Some(0));
    let daemon = Daemon::start(&config);
    daemon.wait_for_log("active version: digits v2", WAIT);
    daemon.wait_for_log("inference API serving digits", WAIT);
}

/// One bad push: publish it, expect `rejected` with exactly `reason`.
fn check_rejected(
    daemon: &Daemon,
    sub: &Subscriber,
    device: &str,
    transfer: &Transfer,
    send: impl FnOnce(&Transfer),
    reason: &str,
) {
    send(transfer);
    let event = wait_event(sub, device, &transfer.id, "rejected", WAIT);
    assert_eq!(
        event["reason"],
        reason,
        "{event}\nthe agent's log:\n{}",
        daemon.log()
    );
}

#[test]
fn bad_pushes_are_refused_with_their_reason_and_the_old_model_keeps_serving() {
    let device = "ota-bad";
    let Agent {
        broker,
        dir,
        key,
        sub,
        config: _config,
        daemon,
        addr,
    } = Agent::start(
        device,
        "max_bundle_bytes = 4000000\nchunk_pause_s = 0.5\ntransfer_deadline_s = 3\ncanary_s = 0",
    );
    let stranger = Key::generate(dir.path(), "stranger");
    let port = broker.port;
    let all = |t: &Transfer| t.send_all(port, device);
    let digits = digits_bundle();
    let k = &key.signing;

    check_rejected(
        &daemon,
        &sub,
        device,
        &Transfer::new(&digits, 2, &stranger.signing, "ops-1"),
        all,
        "signature: does not verify with key \"ops-1\"",
    );
    check_rejected(
        &daemon,
        &sub,
        device,
        &Transfer::new(&digits, 2, k, "ops-2"),
        all,
        "signature: unknown key_id \"ops-2\" (this device trusts: \"ops-1\")",
    );
    check_rejected(
        &daemon,
        &sub,
        device,
        &Transfer::with(&digits, 2, k, "ops-1", |m| m.sha256 = [0; 32]),
        all,
        &format!(
            "sha256 mismatch: the received bundle hashes to {}, the manifest says {}",
            sha_hex(&digits),
            "00".repeat(32)
        ),
    );
    check_rejected(
        &daemon,
        &sub,
        device,
        &Transfer::with(&digits, 2, k, "ops-1", |m| {
            m.size += 1;
            m.chunks = m.size.div_ceil(m.chunk_size);
        }),
        all,
        &format!(
        "size mismatch: chunk {} has {} bytes, the manifest (size {}, chunk_size 65536) says {}",
        digits.len() / 65536, digits.len() % 65536, digits.len() + 1, digits.len() % 65536 + 1),
    );
    let t = Transfer::new(&digits, 2, k, "ops-1");
    check_rejected(
        &daemon,
        &sub,
        device,
        &t,
        |t| {
            t.send(port, device, [0]);
            let mut bogus = plaster_agent::ota::wire::decode_push(&t.chunks[0]).unwrap();
            if let plaster_agent::ota::wire::PushMessage::Chunk(c) = &mut bogus {
                c.index = 99;
            }
            plaster_agent_tests::mqtt::publish(
                port,
                &push_topic(device),
                plaster_agent::ota::wire::encode_push(&bogus),
                false,
            );
        },
        &format!(
            "chunk index 99 out of range (the manifest has {0} chunks, 0..={1})",
            t.chunks.len(),
            t.chunks.len() - 1
        ),
    );
    let stray = Transfer::new(&digits, 2, k, "ops-1");
    check_rejected(&daemon, &sub, device, &stray, |t| plaster_agent_tests::mqtt::publish(port, &push_topic(device), t.chunks[0].clone(), false),
        &format!("chunk for unknown transfer {}: send its manifest first (or the transfer already ended)", stray.id_hex()));
    check_rejected(
        &daemon,
        &sub,
        device,
        &Transfer::with(&digits, 2, k, "ops-1", |m| {
            m.size = 5_000_000;
            m.chunks = m.size.div_ceil(m.chunk_size);
        }),
        |t| t.send(port, device, []),
        "size: bundle of 5000000 bytes exceeds ota.max_bundle_bytes 4000000",
    );

    // Hostile archives, each refused before a byte of it lands outside staging.
    let model = model_path("digits/model.onnx");
    let onnx = std::fs::read(&model).unwrap();
    let raw = |name: &str, kind: u8, data: &[u8], link: &str| raw_tar_entry(name, kind, data, link);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (tar(&[raw("model.onnx", b'0', &onnx, ""), raw("../x", b'0', b"x", "")]),
            "bundle: member \"../x\" not allowed (members sit at the root, without directories)"),
        (tar(&[raw("/etc/passwd", b'0', b"x", ""), raw("model.onnx", b'0', &onnx, "")]),
            "bundle: member \"/etc/passwd\" not allowed (members sit at the root, without directories)"),
        (tar(&[raw("model.onnx", b'0', &onnx, ""), raw("labels.txt", b'2', b"", "/etc/passwd")]),
            "bundle: member \"labels.txt\" is a symbolic link; only regular files are allowed"),
        (tar(&[raw("model.onnx", b'0', &onnx, ""), raw("extra.bin", b'0', b"x", "")]),
            "bundle: member \"extra.bin\" not allowed (allowed: model.onnx, dataset.npz, labels.txt, bundle.toml)"),
        (tar(&[raw("labels.txt", b'0', b"a\n", "")]),
            "bundle: no model.onnx (a bundle needs one at its root)"),
    ];
    for (bundle, reason) in cases {
        check_rejected(
            &daemon,
            &sub,
            device,
            &Transfer::new(&bundle, 2, k, "ops-1"),
            all,
            reason,
        );
    }
    let not_onnx =
        plaster_agent::ota::bundle::build(&[("model.onnx", b"this is not a protobuf".to_vec())])
            .unwrap();
    let t = Transfer::new(&not_onnx, 2, k, "ops-1");
    t.send_all(port, device);
    let event = wait_event(&sub, device, &t.id, "rejected", WAIT);
    let reason = event["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("model \"")
            && reason.contains("digits-v2/model.onnx\": not an ONNX model"),
        "{reason}"
    );
    let unsupported = bundle_of(&[(
        "model.onnx",
        model_path("testdata/unsupported_roialign.onnx"),
    )]);
    let t = Transfer::new(&unsupported, 2, k, "ops-1");
    t.send_all(port, device);
    let event = wait_event(&sub, device, &t.id, "rejected", WAIT);
    let reason = event["reason"].as_str().unwrap();
    assert!(
        reason.ends_with("unsupported op \"RoiAlign\" (node \"roi_align\")"),
        "{reason}"
    );
    check_rejected(
        &daemon,
        &sub,
        device,
        &Transfer::with(&digits, 2, k, "ops-1", |m| m.min_accuracy = Some(0.999)),
        all,
        &format!("accuracy {:.4} below min_accuracy 0.999", digits_accuracy()),
    );
    check_rejected(
        &daemon,
        &sub,
        device,
        &Transfer::with(
            &bundle_of(&[("model.onnx", model.clone())]),
            2,
            k,
            "ops-1",
            |m| m.min_accuracy = Some(0.9),
        ),
        all,
        "accuracy: min_accuracy 0.9 is set but the bundle has no dataset.npz to measure it on",
    );

    // A worse model: the same network with a dataset whose labels are shifted by one, so its
    // top-1 there is far below the active model's.
    let worse = bundle_of_bytes(&[
        ("model.onnx", onnx.clone()),
        ("dataset.npz", shifted_labels_dataset()),
    ]);
    let t = Transfer::new(&worse, 2, k, "ops-1");
    t.send_all(port, device);
    let event = wait_event(&sub, device, &t.id, "rejected", WAIT);
    let reason = event["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("accuracy 0.")
            && reason.ends_with(&format!(
                "is more than max_accuracy_drop 0.01 below the active model's {:.4}",
                digits_accuracy()
            )),
        "{reason}"
    );

    // A second push while one is in progress: older or equal is busy, newer supersedes.
    let first = Transfer::new(&digits, 5, k, "ops-1");
    first.send(port, device, [0]);
    wait_event(&sub, device, &first.id, "receiving", WAIT);
    check_rejected(&daemon, &sub, device, &Transfer::new(&digits, 4, k, "ops-1"), |t| t.send(port, device, []),
        &format!("busy: transfer {} (version 5) is in progress; push a newer version or wait until it ends", first.id_hex()));
    let newer = Transfer::new(&digits, 6, k, "ops-1");
    newer.send(port, device, []);
    let event = wait_event(&sub, device, &first.id, "rejected", WAIT);
    assert_eq!(
        event["reason"],
        format!("superseded by transfer {} (version 6)", newer.id_hex())
    );

    // The same bundle pushed again (a re-run `push`, a new transfer id) starts over.
    let again = Transfer::new(&digits, 6, k, "ops-1");
    again.send(port, device, []);
    let event = wait_event(&sub, device, &newer.id, "rejected", WAIT);
    assert_eq!(
        event["reason"],
        format!("superseded by transfer {} (version 6)", again.id_hex())
    );

    // It stalls: the device reports what is missing, then drops it at the deadline.
    let missing = wait_event(&sub, device, &again.id, "receiving", WAIT);
    let last = again.chunks.len() - 1;
    let deadline = wait_event(&sub, device, &again.id, "rejected", WAIT);
    assert_eq!(
        deadline["reason"],
        format!(
            "transfer incomplete after its 3 s deadline: {0} of {0} chunks missing ({1})",
            again.chunks.len(),
            if last == 0 {
                "0".to_string()
            } else {
                format!("0..{last}")
            }
        )
    );
    let _ = missing;

    // Nothing changed: the configured model is active and still answers.
    let state = model_state(&broker, &daemon, device, |v| {
        v["last_result"]["state"] == "rejected"
    });
    assert_eq!(state["active"]["version"], Value::Null);
    assert_eq!(infer_digits(&addr).status, 200);

    // Duplicate and out-of-order chunks are normal: reversed, each twice, it activates.
    let t = Transfer::new(&digits, 7, k, "ops-1");
    let order: Vec<usize> = (0..t.chunks.len()).rev().flat_map(|i| [i, i]).collect();
    t.send(port, device, order);
    wait_event(&sub, device, &t.id, "activated", WAIT);
    assert!(!daemon.log().contains("panicked"));
}

fn bundle_of_bytes(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    plaster_agent::ota::bundle::build(members).unwrap()
}

/// The digits validation set with every label moved to the next class.
fn shifted_labels_dataset() -> Vec<u8> {
    use ndarray_npy::{NpzReader, NpzWriter};
    use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};
    let mut npz =
        NpzReader::new(std::fs::File::open(model_path("digits/dataset.npz")).unwrap()).unwrap();
    let x: ArrayD<f32> = npz
        .by_name::<_, IxDyn>("x.npy")
        .or_else(|_| npz.by_name::<_, IxDyn>("x"))
        .unwrap();
    let y: ArrayD<i64> = npz
        .by_name::<_, IxDyn>("y.npy")
        .or_else(|_| npz.by_name::<_, IxDyn>("y"))
        .unwrap();
    let y = y.mapv(|label| (label + 1) % 10);
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut writer = NpzWriter::new(&mut out);
        writer.add_array("x", &x).unwrap();
        writer.add_array("y", &y).unwrap();
        writer.finish().unwrap();
    }
    out.into_inner()
}

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn digits_accuracy() -> f64 {
    plaster_agent_tests::expected()["digits"]["accuracy"]["top1"]
        .as_f64()
        .unwrap()
}

/// A tar entry with any name and type (`kind` is the typeflag byte), as a hostile sender
/// writes it.
fn raw_tar_entry(name: &str, kind: u8, data: &[u8], link: &str) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = kind;
    header[157..157 + link.len()].copy_from_slice(link.as_bytes());
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn tar(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn a_transfer_resumes_after_the_agent_is_killed() {
    let device = "ota-resume";
    let Agent {
        broker,
        dir: _dir,
        key,
        sub,
        config,
        mut daemon,
        addr: _addr,
    } = Agent::start(device, "chunk_pause_s = 0.5\ncanary_s = 0");
    // SqueezeNet (5 MB) in 64 KiB chunks: send the first half, then kill the agent.
    let bundle = bundle_of(&[("model.onnx", model_path("squeezenet/model.onnx"))]);
    let t = Transfer::with(&bundle, 2, &key.signing, "ops-1", |m| {
        m.name = "squeezenet".into()
    });
    let n = t.chunks.len();
    let half = n / 2;
    t.send(broker.port, device, 0..half);
    let paused = sub.wait_for("a receiving event with missing ranges", WAIT, |m| {
        m.topic == events_topic(device)
            && m.value()["state"] == "receiving"
            && !m.value()["missing"].is_null()
    });
    assert_eq!(paused.value()["missing"], json!([[half, n - 1]]));
    daemon.kill();

    let daemon = Daemon::start(&config);
    daemon.wait_for_log(&format!("resuming transfer {}", t.id_hex()), WAIT);
    let after = sub.wait_for("missing ranges after the restart", WAIT, |m| {
        m.topic == events_topic(device)
            && m.value()["state"] == "receiving"
            && !m.value()["missing"].is_null()
    });
    assert_eq!(after.value()["missing"], json!([[half, n - 1]]));
    // The sender re-sends what is missing; the update completes.
    let push = plaster_agent_tests::ota::push_topic(device);
    for chunk in &t.chunks[half..] {
        plaster_agent_tests::mqtt::publish(broker.port, &push, chunk.clone(), false);
    }
    wait_event(&sub, device, &t.id, "activated", WAIT);
    model_state(&broker, &daemon, device, |v| {
        v["active"]["name"] == "squeezenet" && v["active"]["version"] == 2
    });
}

#[test]
fn a_crash_at_any_step_leaves_the_old_or_the_new_model_active() {
    let broker = Broker::start();
    let sub = Subscriber::connect(
        broker.port,
        "ota-crash-dashboard",
        true,
        &["plaster/v1/lab/#"],
    );
    let digits = digits_bundle();
    for (ix, step) in ["unpacked", "installed", "validated", "activated"]
        .iter()
        .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate(dir.path(), "ops-1");
        let device = format!("ota-crash-{ix}");
        let mut config = DaemonConfig::new(dir.path(), &device, &broker.url());
        config.extra = key.ota_section("canary_s = 0");
        let config = config.write(dir.path());
        let mut daemon = Daemon::start_with_env(&config, &[("AGENT_TEST_CRASH_AT", step)]);
        daemon.wait_for_log("inference API serving", WAIT);
        online(&sub, &device);
        let t = Transfer::new(&digits, 2, &key.signing, "ops-1");
        t.send_all(broker.port, &device);
        daemon.wait_for_log(&format!("crash injected at {step}"), WAIT);
        assert_eq!(daemon.wait(WAIT), None, "aborted by a signal");

        let daemon = Daemon::start(&config);
        if *step == "activated" {
            daemon.wait_for_log("active version: digits v2", WAIT);
        } else {
            let line = daemon.wait_for_log("loading ", WAIT);
            assert!(
                line.contains("models/digits"),
                "after a crash at {step} the old model runs: {line}"
            );
        }
        daemon.wait_for_log("inference API serving digits", WAIT);
        // Either way the transaction completes, exactly once, and nothing half-made is left.
        let activated = wait_event(&sub, &device, &t.id, "activated", WAIT);
        assert_eq!(
            activated["metrics"]["learning"]["updates_ok"], 1,
            "after a crash at {step}"
        );
        model_state(&broker, &daemon, &device, |v| v["active"]["version"] == 2);
        let leftovers: Vec<String> = std::fs::read_dir(dir.path().join("state/models"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(
            leftovers.is_empty(),
            "after a crash at {step}: {leftovers:?}"
        );
    }
}

#[test]
fn the_canary_rolls_back_a_version_that_is_much_slower() {
    let device = "ota-canary";
    let Agent {
        broker,
        dir: _dir,
        key,
        sub,
        config: _config,
        daemon,
        addr: _addr,
    } = Agent::start_with(device, "canary_s = 60", |c| c.workload_rate_per_s = 40.0);
    // A baseline of the current version's windows first.
    for _ in 0..3 {
        sub.wait_for("telemetry", WAIT, |m| m.topic == topic(device, "telemetry"));
    }
    // SqueezeNet passes validation (no dataset, no gate) but is ~1000x slower than digits.
    let squeezenet = model_path("squeezenet/model.onnx");
    let run = push(&broker, "--all", &key, squeezenet.to_str().unwrap(), 2, &[]);
    assert_eq!(run.code, 0, "push: {}\n{}", run.stdout, run.stderr);
    let rolled = sub.wait_for("rolled_back", WAIT, |m| {
        m.topic == events_topic(device) && m.value()["state"] == "rolled_back"
    });
    let event = rolled.value();
    let reason = event["reason"].as_str().unwrap();
    assert!(reason.starts_with("canary: p90 latency "), "{reason}");
    assert!(
        reason.contains("% above the previous version's"),
        "{reason}"
    );
    assert_eq!(event["metrics"]["model"]["name"], "squeezenet");
    let state = model_state(&broker, &daemon, device, |v| {
        v["last_result"]["state"] == "rolled_back"
    });
    assert_eq!(state["active"]["name"], "digits");
    assert_eq!(state["active"]["version"], Value::Null);
    let t = sub.wait_for("telemetry after the rollback", WAIT, |m| {
        m.topic == topic(device, "telemetry") && m.value()["learning"]["rollbacks"] == 1
    });
    assert_eq!(t.value()["model"]["name"], "digits");
}

#[test]
fn a_full_disk_during_staging_rejects_the_push_and_keeps_serving() {
    let device = "ota-disk";
    let tiny = TinyFs::mount("2m");
    let state_dir = tiny.dir.path().join("state");
    let Agent {
        broker,
        dir: _dir,
        key,
        sub,
        config: _config,
        daemon: _daemon,
        addr,
    } = Agent::start_with(device, "canary_s = 0", |c| c.state_dir = state_dir);
    let bundle = bundle_of(&[("model.onnx", model_path("squeezenet/model.onnx"))]);
    let t = Transfer::new(&bundle, 2, &key.signing, "ops-1");
    t.send_all(broker.port, device);
    let event = wait_event(&sub, device, &t.id, "rejected", WAIT);
    assert_eq!(event["reason"], "disk: no space left in state directory");
    assert_eq!(infer_digits(&addr).status, 200);
    // The staging is gone: the space is back for the spool and the next push.
    let staged = std::fs::read_dir(tiny.dir.path().join("state/ota/transfers"))
        .unwrap()
        .count();
    assert_eq!(staged, 0);
}

#[test]
fn the_optional_latency_gate_refuses_a_much_slower_version() {
    let device = "ota-latency";
    let Agent {
        broker,
        dir: _dir,
        key,
        sub,
        config: _config,
        daemon: _daemon,
        addr,
    } = Agent::start(device, "canary_s = 0\nmax_latency_increase = 1.0");
    // SqueezeNet is about a thousand times slower than digits: far past +100 %.
    let bundle = bundle_of(&[("model.onnx", model_path("squeezenet/model.onnx"))]);
    let t = Transfer::new(&bundle, 2, &key.signing, "ops-1");
    t.send_all(broker.port, device);
    let event = wait_event(&sub, device, &t.id, "rejected", WAIT);
    let reason = event["reason"].as_str().unwrap();
    assert!(reason.starts_with("latency: p90 "), "{reason}");
    assert!(
        reason.ends_with(" ms (ota.max_latency_increase)"),
        "{reason}"
    );
    assert!(
        reason.contains("is more than 100 % above the active model's"),
        "{reason}"
    );
    // Refused before the swap: the active model still answers.
    assert_eq!(infer_digits(&addr).status, 200);
}
