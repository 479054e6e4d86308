//! Spool throughput: telemetry records per second written durably (write, fsync, rename,
//! fsync the directory) and drained through a real broker by the daemon's MQTT link (publish at
//! QoS 1, remove on PUBACK).
//!
//!     cargo run --release -p plaster-agent --example spool_throughput -- DIR mqtt://127.0.0.1:PORT
//!
//! DIR should be on the disk the state directory lives on (fsync cost is the disk's).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plaster_agent::config::{BrokerUrl, Encoding, MqttVersion};
use plaster_agent::mqtt::link::{Link, LinkParts, Presence};
use plaster_agent::mqtt::options::Connection;
use plaster_agent::mqtt::session::AnySession;
use plaster_agent::mqtt::topics::Topics;
use plaster_agent::telemetry::counter::PersistentCounter;
use plaster_agent::telemetry::record::{ActiveModel, ModelRef, ModelState};
use plaster_agent::telemetry::spool::{RecordKind, Spool};

const RECORDS: usize = 2000;
/// The size of a daemon telemetry record without energy figures (bench/RESULTS.md).
const RECORD_BYTES: usize = 1020;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: spool_throughput DIR URL"));
    let url = BrokerUrl::parse(&args.next().expect("usage: spool_throughput DIR URL")).unwrap();
    let spool_dir = dir.join("spool-bench");
    let _ = std::fs::remove_dir_all(&spool_dir);
    let mut spool = Spool::open(&spool_dir, 1 << 30).unwrap();
    let topics = Topics::new("bench", "spool-bench");
    let payload = vec![0xa5u8; RECORD_BYTES];
    let start = Instant::now();
    for _ in 0..RECORDS {
        spool
            .push(RecordKind::Telemetry, &topics.telemetry(), &payload)
            .unwrap();
    }
    let write_s = start.elapsed().as_secs_f64();
    println!(
        "spool write: {RECORDS} records of {RECORD_BYTES} B in {write_s:.2} s = {:.0} records/s",
        RECORDS as f64 / write_s
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let drain_s = runtime.block_on(async {
        let AnySession::V311(session) = Connection::default()
            .session(
                &url,
                "spool-bench",
                Duration::from_secs(30),
                true,
                MqttVersion::V311,
            )
            .unwrap()
        else {
            unreachable!("asked for 3.1.1")
        };
        let spool = Arc::new(Mutex::new(spool));
        let model = ModelRef {
            name: "bench".into(),
            version: None,
            sha256: "00".repeat(32),
        };
        let (_tx, presence) = tokio::sync::watch::channel(Presence {
            model: model.clone(),
            state: ModelState {
                active: ActiveModel {
                    name: model.name.clone(),
                    version: None,
                    sha256: model.sha256.clone(),
                    activated_at: "2026-11-27T00:00:00.000Z".into(),
                },
                previous: Vec::new(),
                last_result: None,
            },
            capabilities: vec![],
        });
        let link = Link::new(LinkParts {
            session: *session,
            topics,
            encoding: Encoding::Cbor,
            boot_id: "bench".into(),
            session_seq: PersistentCounter::open(&dir.join("spool-bench.session")).unwrap(),
            spool: spool.clone(),
            spooled: Arc::new(tokio::sync::Notify::new()),
            presence,
            drain_timeout: Duration::from_secs(5),
            broker: url.to_string(),
            // No update task in this benchmark: pushes are not subscribed to here.
            updates: tokio::sync::mpsc::channel(1).0,
        });
        let cancel = tokio_util::sync::CancellationToken::new();
        let start = Instant::now();
        let task = tokio::spawn(link.run(cancel.clone()));
        // Progress is read off the spool: a benchmark may poll, a test may not.
        while !spool.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        cancel.cancel();
        let _ = task.await;
        elapsed
    });
    println!(
        "spool drain over MQTT (QoS 1, 16 in flight, remove on PUBACK): {RECORDS} records in {drain_s:.2} s = {:.0} records/s",
        RECORDS as f64 / drain_s
    );
    let _ = std::fs::remove_dir_all(&spool_dir);
    let _ = std::fs::remove_file(dir.join("spool-bench.session"));
}
