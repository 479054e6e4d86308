//! `plaster-agent run` against a real broker: birth, telemetry and model state on the wire,
//! a broker outage, a crash, a clean stop, TLS, and bad input on the command topic.

use std::time::Duration;

use plaster_agent_tests::broker::{free_port, Broker};
use plaster_agent_tests::daemon::{Daemon, DaemonConfig};
use plaster_agent_tests::mqtt::{publish, Message, Subscriber};
use plaster_agent_tests::TinyFs;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// Seven PLASTER sections, under the report's keys (PRODUCT.md).
const SECTIONS: [&str; 7] = [
    "programmability",
    "latency_ms",
    "accuracy",
    "size",
    "throughput",
    "energy",
    "learning",
];

fn topic(device: &str, leaf: &str) -> String {
    format!("plaster/v1/lab/{device}/{leaf}")
}

fn telemetry(sub: &Subscriber, device: &str) -> Value {
    let t = topic(device, "telemetry");
    sub.wait_for("telemetry", WAIT, |m| m.topic == t).value()
}

fn status(sub: &Subscriber, device: &str, online: bool) -> Value {
    let t = topic(device, "status");
    sub.wait_for(
        if online { "birth" } else { "offline status" },
        WAIT,
        |m: &Message| m.topic == t && m.value()["online"] == Value::Bool(online),
    )
    .value()
}

#[test]
fn publishes_birth_telemetry_and_state_then_stops_cleanly_on_sigterm() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let device = "e2e-1";
    let sub = Subscriber::connect(broker.port, "dashboard", true, &["plaster/v1/lab/#"]);
    let config = DaemonConfig::new(dir.path(), device, &broker.url()).write(dir.path());
    let mut agent = Daemon::start(&config);

    let birth = status(&sub, device, true);
    assert_eq!(birth["session_seq"], 1);
    assert_eq!(birth["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(birth["model"]["name"], "digits");
    assert_eq!(birth["boot_id"].as_str().unwrap().len(), 32);
    let state_topic = topic(device, "model/state");
    let state = sub
        .wait_for("model state", WAIT, |m| m.topic == state_topic)
        .value();
    assert_eq!(state["active"]["name"], "digits");
    assert_eq!(state["active"]["sha256"], birth["model"]["sha256"]);

    let mut last_seq = 0;
    for _ in 0..3 {
        let t = telemetry(&sub, device);
        for section in SECTIONS {
            assert!(t.get(section).is_some(), "no {section} in {t}");
        }
        assert_eq!(t["schema"], "plaster/v1");
        assert_eq!(t["device"]["id"], device);
        let seq = t["seq"].as_u64().unwrap();
        assert!(
            last_seq == 0 || seq == last_seq + 1,
            "seq {seq} after {last_seq}"
        );
        last_seq = seq;
        assert_eq!(t["throughput"]["scenario"], "live");
        assert!(t["window_s"].as_f64().unwrap() > 0.0);
        assert!(t["temperatures_c"].is_object() && t["throttled"].is_boolean());
        assert_eq!(t["spool_dropped"], 0);
        assert!(t["energy"]["status"]
            .as_str()
            .unwrap()
            .starts_with("unavailable: "));
    }
    // The workload replays the bundle's labelled dataset: accuracy is live, latency measured.
    let t = telemetry(&sub, device);
    assert!(t["latency_ms"]["count"].as_u64().unwrap() > 0, "{t}");
    assert!(t["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert_eq!(t["accuracy"]["metric"], "top1");
    assert!(t["accuracy"]["samples"].as_u64().unwrap() > 0);
    assert_eq!(t["learning"]["status"], "measured");

    // A dashboard that connects later sees the retained status and state at once.
    let late = Subscriber::connect(
        broker.port,
        "late-dashboard",
        true,
        &[&topic(device, "status"), &state_topic],
    );
    let retained = late.wait_for("retained status", WAIT, |m| {
        m.topic == topic(device, "status")
    });
    assert!(retained.retain);
    assert_eq!(retained.value()["online"], true);

    agent.signal("TERM");
    assert_eq!(agent.wait(WAIT), Some(0), "{}", agent.log());
    let offline = status(&sub, device, false);
    assert_eq!(offline["session_seq"], 1);
    assert_eq!(offline["boot_id"], birth["boot_id"]);
    assert!(agent.log().contains("offline status delivered"));
}

/// Seq numbers of the telemetry received until `until` is among them (or the wait fails).
fn collect_seqs(sub: &Subscriber, device: &str, until: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    while !seqs.contains(&until) {
        seqs.push(telemetry(sub, device)["seq"].as_u64().unwrap());
    }
    seqs
}

/// Every seq from the first to the last, once each, in order (QoS 1 may repeat a record whose
/// PUBACK was lost in the outage; a repeat is allowed, a gap or a reordering is not).
fn assert_contiguous(seqs: &[u64]) {
    let mut unique: Vec<u64> = Vec::new();
    for &s in seqs {
        if unique.last() == Some(&s) {
            continue;
        }
        if let Some(&last) = unique.last() {
            assert_eq!(s, last + 1, "seq {s} after {last}: {seqs:?}");
        }
        unique.push(s);
    }
}

#[test]
fn broker_outage_of_15_s_loses_no_telemetry_and_keeps_order() {
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let device = "outage-1";
    // A persistent session: the broker keeps this dashboard's subscription (and queues its
    // messages) across its own restart, as a production broker with persistence does.
    let sub = Subscriber::connect(
        broker.port,
        "outage-dashboard",
        false,
        &["plaster/v1/lab/+/telemetry"],
    );
    let config = DaemonConfig::new(dir.path(), device, &broker.url()).write(dir.path());
    let agent = Daemon::start(&config);
    let before = telemetry(&sub, device)["seq"].as_u64().unwrap();
    let mut seqs = vec![before];

    broker.stop();
    agent.wait_for_log("connection lost", WAIT);
    let down_at = std::time::Instant::now();
    // 15 s down at two records a second: wait for the agent to spool 30 records meanwhile.
    let mut spooled_while_down = 0;
    while spooled_while_down < 30 {
        agent.wait_for_log("spooled", WAIT);
        spooled_while_down += 1;
    }
    assert!(down_at.elapsed() >= Duration::from_secs(14));
    broker.restart();
    agent.wait_for_log("connected again", Duration::from_secs(90));
    let target = before + 35;
    seqs.extend(collect_seqs(&sub, device, target));
    assert_contiguous(&seqs);
    assert!(seqs.iter().any(|&s| s >= target));
}

#[test]
fn sigkill_leaves_a_last_will_and_the_spool_survives_a_restart() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let device = "crash-1";
    let sub = Subscriber::connect(broker.port, "crash-dashboard", true, &["plaster/v1/lab/#"]);
    let mut config = DaemonConfig::new(dir.path(), device, &broker.url());
    let path = config.write(dir.path());

    // 1. Connected, then killed: the broker publishes the Last Will.
    let mut agent = Daemon::start(&path);
    let birth = status(&sub, device, true);
    let first = telemetry(&sub, device)["seq"].as_u64().unwrap();
    let mut seqs = collect_seqs(&sub, device, first + 1);
    seqs.insert(0, first);
    agent.kill();
    let will = status(&sub, device, false);
    assert_eq!(will["session_seq"], birth["session_seq"]);
    assert_eq!(will["boot_id"], birth["boot_id"]);

    // 2. Restarted with the broker unreachable: it runs, spools, and is killed again.
    config.broker_url = format!("mqtt://127.0.0.1:{}", free_port());
    let path = config.write(dir.path());
    let mut agent = Daemon::start(&path);
    agent.wait_for_log("cannot connect", WAIT);
    for _ in 0..3 {
        agent.wait_for_log("spooled", WAIT);
    }
    agent.kill();

    // 3. Restarted with the broker: the records spooled before the kill arrive, in order,
    //    and seq continues from where the first run stopped.
    config.broker_url = broker.url();
    let path = config.write(dir.path());
    let _agent = Daemon::start(&path);
    let rebirth = status(&sub, device, true);
    assert_ne!(rebirth["boot_id"], birth["boot_id"]);
    assert!(rebirth["session_seq"].as_u64() > birth["session_seq"].as_u64());
    let last = *seqs.last().unwrap();
    seqs.extend(collect_seqs(&sub, device, last + 6));
    assert_contiguous(&seqs);
}

#[test]
fn bad_commands_are_refused_with_the_reason_and_rebirth_republishes() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let device = "cmd-1";
    let sub = Subscriber::connect(broker.port, "cmd-dashboard", true, &["plaster/v1/lab/#"]);
    let config = DaemonConfig::new(dir.path(), device, &broker.url()).write(dir.path());
    let agent = Daemon::start(&config);
    let birth = status(&sub, device, true);
    let cmd = topic(device, "cmd");
    let check = |payload: Vec<u8>, expected: &str| {
        publish(broker.port, &cmd, payload, false);
        let line = agent.wait_for_log(&format!("cmd on {cmd}: "), WAIT);
        assert!(line.ends_with(expected), "{line}\nwanted: {expected}");
    };
    check(
        b"\xa1\x64type".to_vec(),
        "command: the payload ends early; ignored",
    );
    check(
        br#"{"type": "rebirth""#.to_vec(),
        "command: not a JSON object: EOF while parsing an object at line 1 column 18; ignored",
    );
    check(
        br#"{"type": "self-destruct"}"#.to_vec(),
        "command: unknown type \"self-destruct\" (this agent knows \"rebirth\" and \"rollback\"); ignored",
    );
    check(
        vec![b'{'; 200 * 1024],
        "message of 204800 bytes exceeds the 65536-byte limit; ignored",
    );
    // Still serving: telemetry keeps coming after the bad input.
    telemetry(&sub, device);

    // rebirth on the fleet topic: status and state again, same session.
    publish(
        broker.port,
        "plaster/v1/lab/_all/cmd",
        br#"{"type":"rebirth"}"#.to_vec(),
        false,
    );
    agent.wait_for_log("rebirth", WAIT);
    let again = status(&sub, device, true);
    assert_eq!(again["session_seq"], birth["session_seq"]);
    assert_eq!(again["boot_id"], birth["boot_id"]);
    sub.wait_for("model state after rebirth", WAIT, |m| {
        m.topic == topic(device, "model/state")
    });
}

#[test]
fn json_encoding_when_configured() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let device = "json-1";
    let sub = Subscriber::connect(broker.port, "json-dashboard", true, &["plaster/v1/lab/#"]);
    let mut config = DaemonConfig::new(dir.path(), device, &broker.url());
    config.mqtt_extra = "encoding = \"json\"".into();
    let path = config.write(dir.path());
    let _agent = Daemon::start(&path);
    let t = topic(device, "telemetry");
    let message = sub.wait_for("telemetry", WAIT, |m| m.topic == t);
    let value: Value = serde_json::from_slice(&message.payload).expect("a JSON payload");
    assert_eq!(value["schema"], "plaster/v1");
}

#[test]
fn watch_shows_the_fleet() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let device = "watched-1";
    let sub = Subscriber::connect(
        broker.port,
        "watch-sync",
        true,
        &["plaster/v1/lab/+/telemetry"],
    );
    let config = DaemonConfig::new(dir.path(), device, &broker.url()).write(dir.path());
    let _agent = Daemon::start(&config);
    telemetry(&sub, device);
    // The retained status plus two telemetry records.
    let run = plaster_agent_tests::agent(&[
        "watch",
        "--broker",
        &broker.url(),
        "--fleet",
        "lab",
        "--updates",
        "3",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let last_table = run.stdout.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last_table.contains(device), "{last_table}");
    assert!(last_table.contains("online"), "{last_table}");
    assert!(last_table.contains("digits"), "{last_table}");
    assert!(last_table.contains('%'), "top-1 shown: {last_table}");
}

#[test]
fn run_with_a_bad_config_exits_64_before_touching_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "fleet = \"a/b\"\n[model]\ndevice = \"tpu\"\nthreads = 0\n[mqtt]\nurl = \"http://broker\"\ntelemetry_intervl_s = 5\n",
    )
    .unwrap();
    let run = plaster_agent_tests::agent(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    let p = path.display();
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "error: 5 configuration problems\n  {p}: fleet: \"a/b\" cannot be a fleet name (no / + #, not _all)\n  {p}: model.device: \"tpu\" is not one of cpu, cuda, auto\n  {p}: model.threads: 0 is out of range (1..=1024)\n  {p}: mqtt.url: \"http://broker\" is not an MQTT URL (use mqtt://HOST:PORT or mqtts://HOST:PORT)\n  {p}: mqtt.telemetry_intervl_s: unknown key"
        )
    );
}

/// A CA, and certificates it signs, written as PEM files under `dir`.
struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(dir: &std::path::Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { ca, dir }
    }

    fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf certificate for `names` (DNS names or IP addresses): (cert file, key file).
    fn issue(&self, file: &str, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, file.to_string());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_file, key_file) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

#[test]
fn mutual_tls_with_a_verified_broker_and_a_refused_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "fleet");
    let (server_cert, server_key) = pki.issue("broker", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = pki.issue("tls-1", &["tls-1"]);
    let rogue = Pki::new(dir.path(), "rogue");
    let (rogue_cert, rogue_key) = rogue.issue("tls-2", &["tls-2"]);
    let broker = Broker::start_with(Some(plaster_agent_tests::broker::TlsListener {
        ca_file: pki.ca_file(),
        cert_file: server_cert,
        key_file: server_key,
        require_client_certificate: true,
    }));
    let tls_url = format!("mqtts://127.0.0.1:{}", broker.tls_port.unwrap());
    let sub = Subscriber::connect(broker.port, "tls-dashboard", true, &["plaster/v1/lab/#"]);
    let tls_files = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            pki.ca_file().display(),
            cert.display(),
            key.display()
        )
    };

    // The fleet's own certificate: connected, verified both ways, publishing.
    let good_dir = dir.path().join("good");
    std::fs::create_dir_all(&good_dir).unwrap();
    let mut config = DaemonConfig::new(&good_dir, "tls-1", &tls_url);
    config.mqtt_extra = tls_files(&client_cert, &client_key);
    let _agent = Daemon::start(&config.write(&good_dir));
    status(&sub, "tls-1", true);
    telemetry(&sub, "tls-1");

    // A certificate from another CA: the broker refuses it, and the agent says so and keeps
    // running (spooling) rather than exiting.
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let mut config = DaemonConfig::new(&bad_dir, "tls-2", &tls_url);
    config.mqtt_extra = tls_files(&rogue_cert, &rogue_key);
    let agent = Daemon::start(&config.write(&bad_dir));
    let line = agent.wait_for_log("cannot connect", WAIT);
    assert!(
        line.contains(&format!("mqtt {tls_url}: cannot connect: ")),
        "{line}"
    );
    agent.wait_for_log("spooled", WAIT);

    // A broker whose certificate the agent's CA did not sign: the agent refuses the broker.
    let wrong_ca_dir = dir.path().join("wrong-ca");
    std::fs::create_dir_all(&wrong_ca_dir).unwrap();
    let mut config = DaemonConfig::new(&wrong_ca_dir, "tls-3", &tls_url);
    config.mqtt_extra = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        rogue.ca_file().display(),
        client_cert.display(),
        client_key.display()
    );
    let agent = Daemon::start(&config.write(&wrong_ca_dir));
    let line = agent.wait_for_log("cannot connect", WAIT);
    assert!(line.contains("UnknownIssuer"), "{line}");
}

#[test]
fn tells_systemd_ready_feeds_the_watchdog_and_says_stopping() {
    use std::os::unix::net::UnixDatagram;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let config = DaemonConfig::new(dir.path(), "notify-1", &broker.url()).write(dir.path());
    let mut agent = Daemon::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            // A 400 ms watchdog: systemd would expect a ping every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let next = || {
        let mut buf = [0u8; 256];
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no sd_notify message: {e}"));
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    };
    assert_eq!(next(), "READY=1");
    for _ in 0..3 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    agent.signal("TERM");
    let mut after_term = next();
    while after_term == "WATCHDOG=1" {
        after_term = next();
    }
    assert_eq!(after_term, "STOPPING=1");
    assert_eq!(agent.wait(WAIT), Some(0));
}

#[test]
fn a_full_disk_drops_telemetry_with_a_count_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let state = TinyFs::mount("256k");
    let device = "full-1";
    let port = free_port();
    let mut config = DaemonConfig::new(dir.path(), device, &format!("mqtt://127.0.0.1:{port}"));
    config.state_dir = state.dir.path().join("state");
    config.telemetry_interval_s = 0.1;
    // The spool's own bound is far above the disk: the disk fills first.
    config.mqtt_extra = "spool_max_bytes = 1000000000".into();
    let agent = Daemon::start(&config.write(dir.path()));
    agent.wait_for_log(
        "telemetry dropped: the spool is full",
        Duration::from_secs(60),
    );

    // The broker comes back: the spool drains, and the records say how many were dropped.
    let _broker = Broker::start_on(port);
    let sub = Subscriber::connect(
        port,
        "full-dashboard",
        true,
        &["plaster/v1/lab/+/telemetry"],
    );
    let t = topic(device, "telemetry");
    let message = sub.wait_for(
        "telemetry counting dropped records",
        Duration::from_secs(90),
        |m| m.topic == t && m.value()["spool_dropped"].as_u64() > Some(0),
    );
    assert!(message.value()["latency_ms"]["count"].as_u64() > Some(0));
}

#[test]
fn mqtt_5_when_configured_with_birth_will_and_telemetry() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let device = "v5-1";
    let sub = Subscriber::connect(broker.port, "v5-dashboard", true, &["plaster/v1/lab/#"]);
    let mut config = DaemonConfig::new(dir.path(), device, &broker.v5_url());
    config.mqtt_extra = "protocol = \"5\"".into();
    let mut agent = Daemon::start(&config.write(dir.path()));
    let birth = status(&sub, device, true);
    let first = telemetry(&sub, device)["seq"].as_u64().unwrap();
    let seqs = collect_seqs(&sub, device, first + 2);
    assert_contiguous(&seqs);
    agent.kill();
    let will = status(&sub, device, false);
    assert_eq!(will["session_seq"], birth["session_seq"]);
}

#[test]
fn username_and_password_from_a_file_and_a_refused_password() {
    let broker = Broker::start_with_password(plaster_agent_tests::broker::PasswordListener {
        username: "pw-1".into(),
        password: "s3cret".into(),
    });
    let auth_url = format!("mqtt://127.0.0.1:{}", broker.auth_port.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::connect(broker.port, "pw-dashboard", true, &["plaster/v1/lab/#"]);
    let with_password = |name: &str, password: Option<&str>| {
        let device_dir = dir.path().join(name);
        std::fs::create_dir_all(&device_dir).unwrap();
        let password_file = device_dir.join("mqtt-password");
        if let Some(password) = password {
            std::fs::write(&password_file, format!("{password}\n")).unwrap();
        }
        let mut config = DaemonConfig::new(&device_dir, name, &auth_url);
        config.mqtt_extra = format!(
            "username = \"pw-1\"\npassword_file = \"{}\"",
            password_file.display()
        );
        (config.write(&device_dir), password_file)
    };

    // The right password, read from its file (trailing newline trimmed): connected.
    let (config, _) = with_password("pw-1", Some("s3cret"));
    let _agent = Daemon::start(&config);
    status(&sub, "pw-1", true);

    // A wrong one: the broker refuses, the agent says so and keeps spooling.
    let (config, _) = with_password("pw-2", Some("guess"));
    let agent = Daemon::start(&config);
    let line = agent.wait_for_log("cannot connect", WAIT);
    assert!(
        line.contains(&format!("mqtt {auth_url}: cannot connect: ")) && line.contains("retrying"),
        "{line}"
    );
    agent.wait_for_log("spooled", WAIT);

    // A password file that is not there: a configuration problem, before any connection.
    let (config, password_file) = with_password("pw-3", None);
    let run = plaster_agent_tests::agent(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "error: 1 configuration problem\n  {}: mqtt.password_file: {} does not exist or is not a file",
            config.display(),
            password_file.display()
        )
    );
}
