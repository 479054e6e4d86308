//! The binary answers `--version` with its name and the crate's version. (Being an integration
//! test of this package, it also makes `cargo test --workspace` build the `plaster-agent`
//! binary that the `tests/` crate runs, with the same features, in the same pass.)

#[test]
fn version() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_plaster-agent"))
        .arg("--version")
        .output()
        .expect("run plaster-agent --version");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("plaster-agent {}\n", env!("CARGO_PKG_VERSION"))
    );
}
