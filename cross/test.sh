#!/usr/bin/env bash
# The agent's unit tests, built for aarch64 with cargo-zigbuild and run under qemu-user through
# cargo's target runner, so the code paths the Jetsons run are tested on their architecture.
# Built with the release profile, as the Jetson binary is: what runs is what ships (and after
# `cross/build.sh --with-tests` nothing is left to compile). The host's tests (cargo test)
# keep debug assertions on.
#
#   cross/test.sh [TEST FILTER]
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
GLIBC=2.31
rustup target add "$TARGET" >/dev/null
# cargo-zigbuild's PyPI wheel is prebuilt (and brings ziglang): no compile, unlike cargo install.
command -v cargo-zigbuild >/dev/null || python3 -m pip install -q "cargo-zigbuild>=0.20"
python3 -c 'import ziglang' 2>/dev/null || python3 -m pip install -q ziglang
if ! command -v qemu-aarch64 >/dev/null || [ ! -d /usr/aarch64-linux-gnu ]; then
    apt-get update -q >/dev/null
    apt-get install -y -q qemu-user libc6-arm64-cross >/dev/null
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
t0=$(date +%s)
cargo-zigbuild test --release --locked -p plaster-agent --lib --target "$TARGET.$GLIBC" -- "$@"
echo "aarch64 unit tests under qemu took $(($(date +%s) - t0)) s"
