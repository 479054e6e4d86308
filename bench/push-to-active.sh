#!/usr/bin/env bash
# Push-to-active time over loopback (issue 6's goal: under 3 s for a 25 MB bundle) with the
# model serving throughout: `plaster-agent push` to a running agent through a real mosquitto,
# a 5 MB bundle (SqueezeNet alone) and a 25 MB one (SqueezeNet plus a 33-sample dataset.npz),
# while the agent's workload runs 20 inferences/s and a client sends API requests in a loop.
# Prints a Markdown table for bench/RESULTS.md.
#
#   bench/push-to-active.sh [ROUNDS]      (default 3 pushes of each size)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"

command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { apt-get update -qq && apt-get install -y -qq mosquitto; }
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
python3 -c 'import numpy' 2>/dev/null || pip install -q numpy
if [ -z "${AGENT:-}" ]; then
    cargo build --release -q -p plaster-agent --bin plaster-agent
    AGENT="$PWD/target/release/plaster-agent"
fi
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The broker, our own, on a free port.
MQTT_PORT="$(free_port)"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$MQTT_PORT" >"$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >/dev/null 2>&1 &
PIDS+=($!)

# The bundles: 5 MB (the model) and 25 MB (the model and a dataset of random images).
mkdir -p "$WORK/small" "$WORK/large"
cp models/squeezenet/model.onnx "$WORK/small/model.onnx"
cp models/squeezenet/model.onnx "$WORK/large/model.onnx"
python3 - "$WORK/large/dataset.npz" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0)
x = rng.random((33, 3, 224, 224), dtype=np.float32)
y = rng.integers(0, 1000, size=33).astype(np.int64)
np.savez(sys.argv[1], x=x, y=y)
PY

"$AGENT" keygen --out "$WORK/ops-1" --id ops-1 >/dev/null
API_PORT="$(free_port)"
cat >"$WORK/agent.toml" <<TOML
device_id = "bench-ota"
fleet = "bench"
state_dir = "$WORK/state"
[model]
path = "$PWD/models/squeezenet/model.onnx"
device = "cpu"
threads = 1
[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
telemetry_interval_s = 1
[api]
listen = "127.0.0.1:$API_PORT"
[energy]
sysfs_root = "$WORK/no-sysfs"
[workload]
rate_per_s = 20
[ota]
trusted_keys = { "ops-1" = "$(cat "$WORK/ops-1.pub")" }
canary_s = 0
keep_versions = 2
TOML
RUST_LOG=info "$AGENT" run --config "$WORK/agent.toml" >/dev/null 2>"$WORK/agent.log" &
PIDS+=($!)
for _ in $(seq 1 600); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$API_PORT/v2/health/ready', timeout=1)" 2>/dev/null && break
    sleep 0.1
done

# A client that infers in a loop through every swap, counting answers that are not 200.
python3 - "$API_PORT" "$WORK/client.out" <<'PY' &
import json, sys, urllib.request, urllib.error, time
port, out = sys.argv[1], sys.argv[2]
meta = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/squeezenet"))
body = json.dumps({"inputs": [{"name": meta["inputs"][0]["name"], "shape": [1, 3, 224, 224], "datatype": "FP32",
                               "data": [0.5] * (3 * 224 * 224)}]}).encode()
ok = failed = 0
deadline = time.time() + 3600
while time.time() < deadline:
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/squeezenet/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()
        ok += 1
    except urllib.error.HTTPError as e:
        failed += 1
    except Exception:
        failed += 1
    with open(out, "w") as f:
        f.write(f"{ok} {failed}\n")
PY
PIDS+=($!)

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
echo "mosquitto $("$MOSQUITTO" -h 2>/dev/null | head -1 | awk '{print $3}'), loopback; chunk 256 KiB; agent workload 20 inferences/s plus an API client in a loop"
echo
echo "| bundle | bytes | push-to-active (device) | push command wall time | failed inferences during the pushes |"
echo "|---|---:|---:|---:|---:|"
version=1
for size in small large; do
    bytes=$(python3 -c "import os,sys; print(sum(os.path.getsize(os.path.join(sys.argv[1], f)) for f in os.listdir(sys.argv[1])))" "$WORK/$size")
    for _ in $(seq 1 "$ROUNDS"); do
        version=$((version + 1))
        before="$(python3 -c "import urllib.request,re; t=urllib.request.urlopen('http://127.0.0.1:$API_PORT/metrics').read().decode(); print(sum(float(v) for v in re.findall(r'^plaster_inference_failures_total\{[^}]*\} (\S+)', t, re.M)))")"
        t0=$(date +%s.%N)
        out="$("$AGENT" push "$WORK/$size" --name squeezenet --broker "mqtt://127.0.0.1:$MQTT_PORT" --fleet bench --device bench-ota --key "$WORK/ops-1.key" --version "$version" 2>/dev/null)"
        t1=$(date +%s.%N)
        after="$(python3 -c "import urllib.request,re; t=urllib.request.urlopen('http://127.0.0.1:$API_PORT/metrics').read().decode(); print(sum(float(v) for v in re.findall(r'^plaster_inference_failures_total\{[^}]*\} (\S+)', t, re.M)))")"
        device_s="$(grep -o 'push-to-active [0-9.]* s' <<<"$out" | awk '{print $2}')"
        printf '| %s v%s | %s | %s s | %.2f s | %.0f (agent) |\n' "$size" "$version" "$bytes" "${device_s:--}" "$(echo "$t1 - $t0" | bc)" "$(echo "$after - $before" | bc)"
    done
done
read -r ok failed <"$WORK/client.out"
echo
echo "API client during all pushes: $ok answered 200, $failed failed."
