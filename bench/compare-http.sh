#!/usr/bin/env bash
# The served path, side by side in one run on this machine: plaster-agent's inference API
# (batching on, batching off) and the peer a user would write instead, a Python onnxruntime
# HTTP server (bench/ort_server.py), all measured by the same client (`bench --target`,
# binary tensors), plus in-process `bench` for the HTTP overhead. Prints Markdown tables for
# bench/RESULTS.md.
#
#   bench/compare-http.sh [SECONDS_PER_RUN]      (default 10)
#
# p99 bounds for the server scenario: 5 ms for digits (a 4 us model: the bound is all HTTP and
# queueing), 100 ms for SqueezeNet (15 ms per inference here; MLPerf's server bounds for
# image classifiers are 15-100 ms).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
THREADS=1
# As many agent inference threads as the onnxruntime server runs requests at once (one per core).
INSTANCES="$(nproc)"

python3 -c 'import onnxruntime, numpy' 2>/dev/null || pip install -q -r models/requirements.txt
# AGENT=path/to/plaster-agent measures a prebuilt binary instead of building one.
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
field() { python3 -c "import json,sys; v=json.load(sys.stdin)$1; print('-' if v is None else v)"; }
wait_ready() {
    for _ in $(seq 1 600); do
        python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$1/v2/health/ready', timeout=1)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "server on port $1 never became ready" >&2
    return 1
}

# An agent serving MODEL with max_batch; no broker (its telemetry spools), no workload.
# Sets PORT (run in this shell, not in $(...), so PIDS keeps the process for cleanup).
start_agent() {
    local model="$1" max_batch="$2" port dir
    port="$(free_port)"
    dir="$WORK/agent-$port"
    mkdir -p "$dir"
    cat >"$dir/agent.toml" <<TOML
device_id = "bench"
fleet = "bench"
state_dir = "$dir/state"
[model]
path = "$PWD/$model"
device = "cpu"
threads = $THREADS
[mqtt]
url = "mqtt://127.0.0.1:9"
[api]
listen = "127.0.0.1:$port"
max_batch = $max_batch
max_queue_delay_us = 0
max_queue = 1024
instances = $INSTANCES
[energy]
sysfs_root = "$dir/no-sysfs"
TOML
    RUST_LOG=error "$AGENT" run --config "$dir/agent.toml" >/dev/null 2>"$dir/log" &
    PIDS+=($!)
    wait_ready "$port"
    PORT="$port"
}

start_ort() {
    local onnx="$1" name="$2" port
    port="$(free_port)"
    python3 bench/ort_server.py "$onnx" "$name" "$port" "$THREADS" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_ready "$port"
    PORT="$port"
}

stop_last() { kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }

run() { "$AGENT" bench "$@" --duration "$DURATION" --json 2>/dev/null; }

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
echo "onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)'), ${THREADS} intra-op thread(s) everywhere, agent api.instances = ${INSTANCES}, ${DURATION} s per run; client and servers share the machine"
echo
echo "Single stream, p50 ms (one request in flight; binary tensors):"
echo
echo "| model | in-process | agent API | HTTP overhead | onnxruntime server | agent API / ort server |"
echo "|---|---:|---:|---:|---:|---:|"
for spec in "digits|models/digits|models/digits/model.onnx" "squeezenet|models/squeezenet|models/squeezenet/model.onnx"; do
    IFS='|' read -r name bundle onnx <<<"$spec"
    local_p50="$(run "$bundle" --device cpu --threads "$THREADS" | field "['latency_ms']['p50']")"
    start_agent "$bundle" 8
    api_p50="$(run "$bundle" --target "http://127.0.0.1:$PORT" | field "['latency_ms']['p50']")"
    stop_last
    start_ort "$onnx" "$name"
    ort_p50="$(run "$bundle" --target "http://127.0.0.1:$PORT" | field "['latency_ms']['p50']")"
    stop_last
    python3 - "$name" "$local_p50" "$api_p50" "$ort_p50" <<'PY'
import sys
name, local, api, ort = sys.argv[1], *map(float, sys.argv[2:])
print(f"| {name} | {local:.3f} | {api:.3f} | {api - local:+.3f} | {ort:.3f} | {api / ort:.2f} |")
PY
done

echo
echo "Server scenario: the highest Poisson rate whose p99 stays within the bound (--find-peak):"
echo
echo "| model | p99 bound | agent, batching on (max 8) | agent, batching off | onnxruntime server | agent best / ort |"
echo "|---|---:|---:|---:|---:|---:|"
for spec in "digits|models/digits|models/digits/model.onnx|5" "squeezenet|models/squeezenet|models/squeezenet/model.onnx|100"; do
    IFS='|' read -r name bundle onnx bound <<<"$spec"
    peak() {
        run "$bundle" --target "http://127.0.0.1:$1" --scenario server --find-peak \
            --latency-bound-ms "$bound" | python3 -c "
import json,sys; r=json.load(sys.stdin)
print(f\"{r['target_qps'] if r['bound_met'] else 0:.0f} {r['latency_ms']['p99'] or 0:.2f}\")"
    }
    start_agent "$bundle" 8; on="$(peak "$PORT")"; stop_last
    start_agent "$bundle" 1; off="$(peak "$PORT")"; stop_last
    start_ort "$onnx" "$name"; ort="$(peak "$PORT")"; stop_last
    python3 - "$name" "$bound" $on $off $ort <<'PY'
import sys
name, bound = sys.argv[1], sys.argv[2]
on, on99, off, off99, ort, ort99 = map(float, sys.argv[3:])
best = max(on, off)
ratio = f"{best / ort:.2f}" if ort > 0 else "-"
print(f"| {name} | {bound} ms | {on:.0f}/s (p99 {on99:.2f} ms) | {off:.0f}/s (p99 {off99:.2f} ms) | {ort:.0f}/s (p99 {ort99:.2f} ms) | {ratio} |")
PY
done
echo
echo "SqueezeNet's input has a fixed batch of 1: the agent runs its requests one by one either way."
