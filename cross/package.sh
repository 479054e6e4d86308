#!/usr/bin/env bash
# Debian packages of plaster-agent: arm64 from the cross-built binary (cross/build.sh) and
# amd64 from a host release build. Installs cargo-deb when missing.
#
#   cross/package.sh          -> target/debian/plaster-agent_<version>-1_{arm64,amd64}.deb
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
t0=$(date +%s)
[ -x target/aarch64-unknown-linux-gnu/release/plaster-agent ] || cross/build.sh
# Binaries are stripped by the release profile; the host's strip cannot read arm64 anyway.
cargo deb -p plaster-agent --target aarch64-unknown-linux-gnu --no-build --no-strip
cargo build --release --locked -p plaster-agent --bin plaster-agent
cargo deb -p plaster-agent --no-build --no-strip
echo "packages took $(($(date +%s) - t0)) s"
ls -l target/debian/*.deb
