//! `plaster-agent check-config`: the documented example is valid; every problem of a bad
//! configuration is printed at once and the exit status is 64.

use plaster_agent_tests::agent;

#[test]
fn the_example_config_is_valid() {
    let run = agent(&["check-config", "--config", "config/agent.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .starts_with("configuration ok (config/agent.toml)\n  device "),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("in fleet lab\n  broker mqtt://127.0.0.1:1883 (cbor, telemetry every 10 s)"),
        "{}",
        run.stdout
    );
}

#[test]
fn five_problems_exit_64_and_are_all_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "fleet = \"lab\"\n[model]\nprecision = \"f8\"\n[mqtt]\nurl = \"mqtt://broker:99999\"\ntelemetry_interval_s = 0\nkeep_alive_s = \"30\"\n[energy]\nsource = \"solar\"\n",
    )
    .unwrap();
    let run = agent(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!run.stderr.contains("panicked"));
    assert_eq!(run.code, 64, "{}", run.stderr);
    let p = path.display();
    assert_eq!(
        run.stderr,
        format!(
            "error: 5 configuration problems\n  {p}: model.precision: \"f8\" is not one of f32, f16\n  {p}: mqtt.url: \"mqtt://broker:99999\" has an invalid port \"99999\"\n  {p}: mqtt.telemetry_interval_s: 0 is out of range (0.1..=86400)\n  {p}: mqtt.keep_alive_s: \"30\" is not a number\n  {p}: energy.source: \"solar\" is not one of ina3221, ina3221-iio, ina238, nvml, rapl, hwmon-energy, battery\n"
        )
    );
}

#[test]
fn a_missing_config_file_is_a_configuration_error() {
    let run = agent(&["check-config", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(run.code, 64);
    assert_eq!(
        run.stderr,
        "error: 1 configuration problem\n  /nonexistent/agent.toml: file not found\n"
    );
}
