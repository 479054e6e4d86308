#!/usr/bin/env bash
# Build the release aarch64 (Jetson) binary of plaster-agent without Docker: cargo-zigbuild
# links against glibc 2.31, so one binary runs on JetPack 5 (Ubuntu 20.04) and JetPack 6
# (Ubuntu 22.04). Installs what it needs from the ordinary registries (rustup, pip, cargo).
#
#   cross/build.sh            -> target/aarch64-unknown-linux-gnu/release/plaster-agent
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
GLIBC=2.31

rustup target add "$TARGET"
python3 -c 'import ziglang' 2>/dev/null || python3 -m pip install -q ziglang
command -v cargo-zigbuild >/dev/null || cargo install --locked cargo-zigbuild

t0=$(date +%s)
cargo zigbuild --release --locked -p plaster-agent --bin plaster-agent --target "$TARGET.$GLIBC"
echo "aarch64 build took $(($(date +%s) - t0)) s"
ls -l "target/$TARGET/release/plaster-agent"
