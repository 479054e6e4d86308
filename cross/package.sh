#!/usr/bin/env bash
# Debian packages of plaster-agent: arm64 from the cross-built binary (cross/build.sh) and
# amd64 from a host release build. Installs cargo-deb when missing.
#
#   cross/package.sh                      -> target/debian/plaster-agent_<version>-1_{arm64,amd64}.deb
#   cross/package.sh --host-binary FILE   the amd64 package around FILE instead of a host
#                                         release build. CI passes the binary its test step
#                                         built: the service check (systemd/check.sh) needs
#                                         the package, not a second optimised build of every
#                                         dependency (16 minutes on a 2-core machine), and
#                                         the release profile is built for aarch64 anyway.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST_BINARY=
if [ "${1:-}" = --host-binary ]; then
    HOST_BINARY="${2:?--host-binary needs a file}"
    [ -x "$HOST_BINARY" ] || { echo "--host-binary $HOST_BINARY: not an executable file" >&2; exit 1; }
fi

command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
t0=$(date +%s)
[ -x target/aarch64-unknown-linux-gnu/release/plaster-agent ] || cross/build.sh
# Binaries are stripped by the release profile; the host's strip cannot read arm64 anyway.
cargo deb -p plaster-agent --target aarch64-unknown-linux-gnu --no-build --no-strip
if [ -n "$HOST_BINARY" ]; then
    # cargo-deb takes `target/release/plaster-agent` from the target directory: a staging
    # one holding FILE, so that target/release is left to cargo.
    stage=target/package-host
    mkdir -p "$stage/release" target/debian
    cp "$HOST_BINARY" "$stage/release/plaster-agent"
    CARGO_TARGET_DIR="$stage" cargo deb -p plaster-agent --no-build --no-strip --output target/debian/
else
    cargo build --release --locked -p plaster-agent --bin plaster-agent
    cargo deb -p plaster-agent --no-build --no-strip
fi
echo "packages took $(($(date +%s) - t0)) s"
ls -l target/debian/*.deb
