//! Energy, battery and thermal sources on recorded sysfs trees of real boards, driven over
//! time by a fixture writer with known power profiles.

use std::time::{Duration, Instant};

use plaster_agent::sensors::sampler::{window_report, Sampler};
use plaster_agent::sensors::{discover, DiscoveryOptions, SourceKind};
use plaster_agent_tests::sysfs::{integral, Tree, Writer};
use plaster_agent_tests::{agent, agent_bin, repo_root};
use serde_json::Value;

fn sensors_json(root: &std::path::Path) -> Value {
    agent(&["sensors", "--sysfs-root", root.to_str().unwrap(), "--json"]).json()
}

/// Every recorded tree gives the right source, total rail, units and power.
#[test]
fn each_board_gives_its_source_rail_and_power() {
    let check = |board: &str, selected: &str, kind: &str, watts: f64, rails: &[&str]| {
        let report = sensors_json(&repo_root().join("tests/fixtures").join(board));
        assert_eq!(report["selected"], selected, "{board}: {report}");
        let source = &report["sources"][0];
        assert_eq!(source["kind"], kind, "{board}");
        let power = source["power_w"].as_f64().unwrap();
        assert!(
            (power - watts).abs() < 1e-9,
            "{board}: {power} W, want {watts} W"
        );
        let names: Vec<&str> = source["rails"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, rails, "{board}");
        assert_eq!(report["unusable"], serde_json::json!([]), "{board}");
    };
    check(
        "orin-nano-jp6",
        "ina3221 1-0040 VDD_IN",
        "ina3221",
        5.064 * 1.352,
        &["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"],
    );
    check(
        "nano-jp4",
        "ina3221 6-0040 POM_5V_IN",
        "ina3221-iio",
        2.432,
        &["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"],
    );
    check(
        "thor-ina238",
        "ina238 2-0044 VIN",
        "ina238",
        44.13,
        &["VIN"],
    );
    check(
        "laptop-battery-energy",
        "battery BAT0",
        "battery",
        9.85,
        &["BAT0"],
    );
    check(
        "battery-charge-only",
        "battery BAT1",
        "battery",
        1.25 * 7.8,
        &["BAT1"],
    );
}

#[test]
fn batteries_thermal_and_update_intervals() {
    let laptop = sensors_json(&repo_root().join("tests/fixtures/laptop-battery-energy"));
    // The AC adapter and the mouse's battery (scope Device) are not system batteries.
    assert_eq!(laptop["batteries"].as_array().unwrap().len(), 1);
    assert_eq!(laptop["batteries"][0]["percent"], 76.0);
    assert_eq!(laptop["batteries"][0]["status"], "Discharging");
    let charge_only = sensors_json(&repo_root().join("tests/fixtures/battery-charge-only"));
    assert!((charge_only["batteries"][0]["percent"].as_f64().unwrap() - 70.0).abs() < 1e-9);

    let orin = sensors_json(&repo_root().join("tests/fixtures/orin-nano-jp6"));
    assert_eq!(orin["sources"][0]["update_interval_ms"], 13.0);
    let zones = orin["thermal"].as_array().unwrap();
    assert_eq!(zones.len(), 4);
    assert_eq!(zones[0]["zone"], "cpu-thermal");
    assert_eq!(zones[0]["temp_c"], 47.312);
    assert_eq!(zones[0]["throttle_c"], 99.0);
    assert_eq!(zones[0]["throttled"], false);
    let nano = sensors_json(&repo_root().join("tests/fixtures/nano-jp4"));
    assert_eq!(nano["thermal"][1]["zone"], "GPU-therm");
    assert_eq!(nano["thermal"][1]["throttled"], true);
}

#[test]
fn total_rail_can_be_named() {
    let root = repo_root().join("tests/fixtures/orin-nano-jp6");
    let r = agent(&[
        "sensors",
        "--sysfs-root",
        root.to_str().unwrap(),
        "--total-rail",
        "VDD_SOC",
        "--json",
    ])
    .json();
    assert_eq!(r["selected"], "ina3221 1-0040 VDD_SOC");
    let r = agent(&[
        "sensors",
        "--sysfs-root",
        root.to_str().unwrap(),
        "--total-rail",
        "VDD_GPU",
        "--json",
    ])
    .json();
    assert_eq!(r["selected"], Value::Null);
    assert_eq!(
        r["unusable"][0]["reason"],
        "energy.total_rail \"VDD_GPU\" is not one of its rails (VDD_IN, VDD_CPU_GPU_CV, VDD_SOC)"
    );
}

#[test]
fn no_sensor_means_unavailable_not_a_number() {
    let tree = Tree::empty();
    let report = sensors_json(tree.root());
    assert_eq!(report["selected"], Value::Null);
    assert_eq!(report["sources"], serde_json::json!([]));
    let bench = agent(&[
        "bench",
        "models/digits",
        "--device",
        "cpu",
        "--duration",
        "0.2",
        "--json",
        "--sysfs-root",
        tree.root().to_str().unwrap(),
    ])
    .json();
    assert_eq!(
        bench["energy"]["status"],
        "unavailable: no energy source found"
    );
    assert_eq!(bench["energy"]["joules_per_inference"], Value::Null);
}

// ---- bad input: each gives a clear reason, no panic, no NaN ----

fn unusable_reason(tree: &Tree) -> String {
    let report = sensors_json(tree.root());
    assert_eq!(report["selected"], Value::Null, "{report}");
    report["unusable"][0]["reason"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn garbage_empty_and_absurd_values_are_refused() {
    let rail = "sys/bus/i2c/devices/1-0040/hwmon/hwmon1/curr1_input";
    let tree = Tree::copy("orin-nano-jp6");
    tree.write(rail, "12ab");
    assert_eq!(
        unusable_reason(&tree),
        format!("{}: not a number: \"12ab\"", tree.path(rail).display())
    );
    tree.write(rail, "");
    assert_eq!(
        unusable_reason(&tree),
        format!("{}: empty", tree.path(rail).display())
    );
    tree.write(rail, "NaN");
    assert_eq!(
        unusable_reason(&tree),
        format!("{}: not a number: \"NaN\"", tree.path(rail).display())
    );
    // 5064 mV x 987654 mA: a 5 kW Jetson rail is a broken sensor, not a measurement.
    tree.write(rail, "987654");
    assert_eq!(
        unusable_reason(&tree),
        format!(
            "power from {} of 5001.5 W is not plausible (limit 100 W)",
            tree.path(rail).display()
        )
    );
    let battery = Tree::copy("laptop-battery-energy");
    battery.write("sys/class/power_supply/BAT0/capacity", "250");
    assert_eq!(
        unusable_reason(&battery),
        "charge of battery BAT0 of 250% is not plausible (limit 0..100%)"
    );
    let charging = Tree::copy("laptop-battery-energy");
    charging.write("sys/class/power_supply/BAT0/status", "Charging");
    assert_eq!(
        unusable_reason(&charging),
        "battery BAT0 is Charging: only a discharging battery measures the system's power"
    );
    let rapl = Tree::copy("rapl-wrap");
    rapl.write("sys/class/powercap/intel-rapl:0/energy_uj", "-5");
    assert_eq!(
        unusable_reason(&rapl),
        format!(
            "energy counter {} of -5 is not plausible (limit 0 or more)",
            rapl.path("sys/class/powercap/intel-rapl:0/energy_uj")
                .display()
        )
    );
}

#[test]
fn unreadable_rapl_counter_says_how_to_grant_access() {
    use std::os::unix::fs::PermissionsExt;
    let tree = Tree::copy("rapl-wrap");
    tree.open_to_all();
    let counter = tree.path("sys/class/powercap/intel-rapl:0/energy_uj");
    // As Linux 5.10+ ships it (CVE-2020-8694): readable by root only.
    std::fs::set_permissions(&counter, std::fs::Permissions::from_mode(0o400)).unwrap();
    // Root reads anything: drop to an unprivileged user the way a service runs.
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let mut command = if is_root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(agent_bin());
        c
    } else {
        std::process::Command::new(agent_bin())
    };
    let output = command
        .args([
            "sensors",
            "--sysfs-root",
            tree.root().to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["unusable"][0]["reason"],
        format!(
            "{}: permission denied: grant the service user read access, see docs/energy.md",
            counter.display()
        )
    );
}

// ---- driven over time ----

/// The best source of a tree, as the agent would choose it.
fn sampler_for(tree: &Tree) -> Sampler {
    let mut discovery = discover(&DiscoveryOptions::new(tree.root()));
    Sampler::start(discovery.take_best().expect("a usable source"))
}

/// A real sensor's last digit never sits still: 10 mW on every other update.
fn flicker(n: u64) -> f64 {
    if n.is_multiple_of(2) {
        0.0
    } else {
        0.01
    }
}

const ORIN_RAIL: &str = "sys/bus/i2c/devices/1-0040/hwmon/hwmon1/curr1_input";
const ORIN_MV: f64 = 5064.0;

/// The text of `curr1_input` for `watts` on VDD_IN, and the power that text really means
/// (the sensor's resolution is 1 mA).
fn orin_current(watts: f64) -> (String, f64) {
    let ma = (watts / ORIN_MV * 1e6).round();
    (format!("{ma}"), ORIN_MV * ma / 1e6)
}

#[test]
fn integrated_joules_match_a_driven_profile_within_one_percent() {
    let tree = Tree::copy("orin-nano-jp6");
    tree.write(
        "sys/bus/i2c/devices/1-0040/hwmon/hwmon1/update_interval",
        "10",
    );
    let (hold_text, hold) = orin_current(5.0);
    tree.write(ORIN_RAIL, &hold_text);
    let sampler = sampler_for(&tree);
    assert_eq!(sampler.period, Duration::from_millis(10));
    let start = sampler.wait_for_reads(3, Duration::from_secs(5));

    // 0.3 s at 5 W, a step to 12 W for 0.3 s, a ramp down to 3 W over 0.6 s, 0.3 s at 8 W.
    let profile = |n: u64| -> Option<(String, f64)> {
        let watts = match n {
            0..30 => 5.0 + flicker(n),
            30..60 => 12.0 + flicker(n),
            60..120 => 12.0 - 9.0 * (n - 60) as f64 / 60.0,
            120..150 => 8.0 + flicker(n),
            _ => return None,
        };
        Some(orin_current(watts))
    };
    let writer = Writer::start(tree.path(ORIN_RAIL), Duration::from_millis(10), profile);
    let log = writer.join();
    let reads = sampler.snapshot().reads;
    let end = sampler.wait_for_reads(reads + 3, Duration::from_secs(5));

    let measured = end.energy.0 - start.energy.0;
    let exact = integral(&log, hold, start.at.unwrap(), end.at.unwrap());
    let error = (measured - exact).abs() / exact;
    assert!(
        error < 0.01,
        "measured {measured:.4} J, profile {exact:.4} J ({:.3}% off)",
        error * 100.0
    );
    let report = window_report(&start, &end, 1000, None, &sampler.source_name);
    assert_eq!(report.status, "measured");
    assert!(report.samples >= 100, "{}", report.samples);
}

#[test]
fn a_stalled_sensor_adds_no_fresh_samples() {
    let tree = Tree::copy("orin-nano-jp6");
    tree.write(
        "sys/bus/i2c/devices/1-0040/hwmon/hwmon1/update_interval",
        "5",
    );
    let sampler = sampler_for(&tree);
    let first = sampler.wait_for_reads(1, Duration::from_secs(5));
    let s = sampler.wait_for_reads(40, Duration::from_secs(10));
    assert!(s.reads >= 40);
    assert_eq!(
        s.fresh, 1,
        "only the first read of an unchanging value is fresh"
    );
    let report = window_report(&first, &s, 100, None, &sampler.source_name);
    assert!(
        report.status.starts_with(
            "unavailable: window too short for a confident figure (0 fresh sensor samples"
        ),
        "{}",
        report.status
    );
    assert_eq!(report.joules_per_inference, None);
}

#[test]
fn a_wrapping_rapl_counter_integrates_exactly() {
    let tree = Tree::copy("rapl-wrap");
    let counter = "sys/class/powercap/intel-rapl:0/energy_uj";
    const MAX_UJ: u64 = 262_143_328_850;
    const START_UJ: u64 = 262_143_000_000;
    let sampler = sampler_for(&tree);
    let start = sampler.wait_for_reads(3, Duration::from_secs(5));
    // 15 W for 0.5 s in 10 ms steps: 150 mJ a step, crossing the wrap point after 3 steps.
    let step_uj = 150_000u64;
    let profile = move |n: u64| {
        (n < 50).then(|| {
            let total = START_UJ + step_uj * (n + 1);
            // The counter restarts from 0 after max_energy_range_uj.
            let value = if total > MAX_UJ {
                total - MAX_UJ
            } else {
                total
            };
            (value.to_string(), value as f64)
        })
    };
    let log = Writer::start(tree.path(counter), Duration::from_millis(10), profile).join();
    assert!(
        log.iter().any(|w| w.value < START_UJ as f64),
        "the counter wrapped"
    );
    let reads = sampler.snapshot().reads;
    let end = sampler.wait_for_reads(reads + 3, Duration::from_secs(5));
    // 50 steps of energy, whatever the wrap did to the counter's value.
    let expected = (50 * step_uj) as f64 * 1e-6;
    let measured = end.energy.0 - start.energy.0;
    assert!(
        (measured - expected).abs() < 1e-6,
        "measured {measured} J, want {expected} J"
    );
}

#[test]
fn a_battery_unplugged_mid_run_is_reported_not_fatal() {
    let tree = Tree::copy("laptop-battery-energy");
    let mut discovery = discover(&DiscoveryOptions::new(tree.root()));
    let source = discovery.take_best().unwrap();
    assert_eq!(source.kind(), SourceKind::Battery);
    let sampler = Sampler::start(source);
    let start = sampler.wait_for_reads(1, Duration::from_secs(5));
    std::fs::remove_dir_all(tree.path("sys/class/power_supply/BAT0")).unwrap();
    let reads = sampler.snapshot().reads;
    let end = sampler.wait_for_reads(reads + 2, Duration::from_secs(10));
    assert!(end.errors >= 1);
    assert_eq!(
        end.last_error.as_deref(),
        Some(
            format!(
                "{}: missing (the device went away)",
                tree.path("sys/class/power_supply/BAT0/status").display()
            )
            .as_str()
        )
    );
    let report = window_report(&start, &end, 10, None, &sampler.source_name);
    assert!(
        report.status.starts_with("unavailable: "),
        "{}",
        report.status
    );
    for v in [
        report.joules_per_inference,
        report.mean_power_w,
        report.marginal_joules_per_inference,
    ] {
        assert!(v.is_none_or(f64::is_finite));
    }
}

#[test]
fn bench_reports_the_joules_of_a_driven_board() {
    let tree = Tree::copy("orin-nano-jp6");
    tree.write(
        "sys/bus/i2c/devices/1-0040/hwmon/hwmon1/update_interval",
        "10",
    );
    // A board drawing 7.5 W, the sensor's last digit flickering as real ones do.
    let target = 7.5;
    let writer = Writer::start(tree.path(ORIN_RAIL), Duration::from_millis(10), move |n| {
        Some(orin_current(target + 6.0 * flicker(n) / 10.0))
    });
    let started = Instant::now();
    let report = agent(&[
        "bench",
        "models/digits",
        "--device",
        "cpu",
        "--duration",
        "1.5",
        "--json",
        "--sysfs-root",
        tree.root().to_str().unwrap(),
    ])
    .json();
    let log = writer.stop();
    assert!(
        log.len() as u128 >= started.elapsed().as_millis() / 20,
        "the writer kept up"
    );
    let e = &report["energy"];
    assert_eq!(e["status"], "measured", "{e}");
    assert_eq!(e["source"], "ina3221 1-0040 VDD_IN (ina3221)");
    let mean = e["mean_power_w"].as_f64().unwrap();
    let written_mean = orin_current(target).1 / 2.0 + orin_current(target + 0.006).1 / 2.0;
    assert!(
        (mean - written_mean).abs() / written_mean < 0.01,
        "mean {mean} W, driven {written_mean} W"
    );
    let idle = e["idle_power_w"].as_f64().unwrap();
    assert!(
        (idle - written_mean).abs() / written_mean < 0.01,
        "idle {idle} W"
    );
    let inferences = report["latency_ms"]["count"].as_f64().unwrap();
    let window = report["throughput"]["duration_s"].as_f64().unwrap();
    let jpi = e["joules_per_inference"].as_f64().unwrap();
    assert!(
        (jpi * inferences / (mean * window) - 1.0).abs() < 0.02,
        "{e}"
    );
    assert!((e["inferences_per_joule"].as_f64().unwrap() * jpi - 1.0).abs() < 1e-9);
    // Constant power: almost nothing above idle.
    assert!(
        e["marginal_joules_per_inference"].as_f64().unwrap().abs() < 0.02 * jpi,
        "{e}"
    );
    assert!(e["samples"].as_u64().unwrap() >= 10);
}
