#!/usr/bin/env bash
# Check the aarch64 binary cross/build.sh made: an aarch64 ELF, glibc <= 2.31, and under
# qemu-user it runs --version, `sensors` on a Jetson fixture and `bench` on the digits model
# with the accuracy models/make_models.py recorded.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/aarch64-unknown-linux-gnu/release/plaster-agent
MAX_GLIBC=2.31
if ! command -v qemu-aarch64 >/dev/null || [ ! -d /usr/aarch64-linux-gnu/lib ] || ! command -v readelf >/dev/null; then
    apt-get update -q >/dev/null
    apt-get install -y -q qemu-user libc6-arm64-cross binutils >/dev/null
fi
QEMU=(qemu-aarch64 -L /usr/aarch64-linux-gnu)

readelf -h "$BIN" | grep -q 'Machine:.*AArch64' || { echo "FAIL: $BIN is not an aarch64 ELF"; exit 1; }
highest=$(readelf --dyn-syms -W "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
if [ "$(printf '%s\n%s\n' "$highest" "$MAX_GLIBC" | sort -V | tail -1)" != "$MAX_GLIBC" ]; then
    echo "FAIL: needs GLIBC_$highest, more than $MAX_GLIBC"
    exit 1
fi
echo "aarch64 ELF, highest glibc symbol GLIBC_$highest (limit $MAX_GLIBC), $(stat -c %s "$BIN") bytes"

"${QEMU[@]}" "$BIN" --version
selected=$("${QEMU[@]}" "$BIN" sensors --sysfs-root tests/fixtures/orin-nano-jp6 --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["selected"])')
[ "$selected" = "ina3221 1-0040 VDD_IN" ] || { echo "FAIL: sensors selected $selected"; exit 1; }
echo "sensors under qemu: $selected"
report=$("${QEMU[@]}" "$BIN" bench models/digits --device cpu --duration 2 --json)
python3 - "$report" <<'PY'
import json, sys
report = json.loads(sys.argv[1])
want = json.load(open("models/expected.json"))["digits"]["accuracy"]["top1"]
got = report["accuracy"]["value"]
assert report["device"]["arch"] == "aarch64", report["device"]
assert got == want, f"accuracy under qemu {got}, want {want}"
print(f"bench under qemu: aarch64, top-1 {got:.4f} (as recorded), p50 {report['latency_ms']['p50']:.3f} ms (emulated)")
PY
