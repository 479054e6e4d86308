#!/usr/bin/env bash
# Build the release aarch64 (Jetson) binary of plaster-agent without Docker: cargo-zigbuild
# links against glibc 2.31, so one binary runs on JetPack 5 (Ubuntu 20.04) and JetPack 6
# (Ubuntu 22.04). Installs what it needs from the ordinary registries (rustup, pip, cargo).
#
#   cross/build.sh                -> target/aarch64-unknown-linux-gnu/release/plaster-agent
#   cross/build.sh --with-tests   the same, and the agent's tests (cross/test.sh runs them) in
#                                 the same cargo run: tests enable dev-dependency features, and
#                                 one run resolves one feature set, so the dependencies compile
#                                 once for both instead of twice (what CI does)
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
GLIBC=2.31

rustup target add "$TARGET"
# cargo-zigbuild's PyPI wheel is prebuilt (and brings ziglang): no compile, unlike cargo install.
command -v cargo-zigbuild >/dev/null || python3 -m pip install -q "cargo-zigbuild>=0.20"
python3 -c 'import ziglang' 2>/dev/null || python3 -m pip install -q ziglang

t0=$(date +%s)
WITH_TESTS=()
if [ "${1:-}" = --with-tests ]; then
    WITH_TESTS=(--lib --tests)
fi
cargo zigbuild --release --locked -p plaster-agent --bin plaster-agent "${WITH_TESTS[@]}" \
    --target "$TARGET.$GLIBC"
echo "aarch64 build took $(($(date +%s) - t0)) s"
ls -l "target/$TARGET/release/plaster-agent"
