//! `plaster-agent keygen`: a key pair for model pushes that the devices' configuration accepts.

use std::os::unix::fs::PermissionsExt;

use plaster_agent_tests::agent;

#[test]
fn keygen_writes_a_private_and_a_trusted_public_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("ops");
    let prefix_arg = prefix.to_str().unwrap();
    let run = agent(&["keygen", "--out", prefix_arg, "--id", "ops-7"]);
    assert_eq!(run.code, 0, "{}", run.stderr);

    let key = dir.path().join("ops.key");
    let public = dir.path().join("ops.pub");
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public_b64 = std::fs::read_to_string(&public).unwrap().trim().to_string();
    assert_eq!(public_b64.len(), 44, "base64 of 32 bytes");
    assert!(
        run.stdout.contains(&format!(
            "[ota.trusted_keys]\n\"ops-7\" = \"{public_b64}\"\n"
        )),
        "{}",
        run.stdout
    );

    // The printed line is what a device's configuration takes.
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("fleet = \"lab\"\n[ota.trusted_keys]\n\"ops-7\" = \"{public_b64}\"\n"),
    )
    .unwrap();
    let check = agent(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(check.code, 0, "{}", check.stderr);

    // A second run with the same prefix changes nothing and says why.
    let again = agent(&["keygen", "--out", prefix_arg]);
    assert_eq!(again.code, 1);
    assert_eq!(
        again.stderr.trim(),
        format!(
            "error: {}: already exists; keygen never overwrites a key (choose another --out)",
            key.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), pem);

    // A prefix in a directory that does not exist names the path.
    let missing = dir.path().join("no/such/dir/ops");
    let run = agent(&["keygen", "--out", missing.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr.trim(),
        format!(
            "error: {}.key: No such file or directory (os error 2)",
            missing.display()
        )
    );
}
