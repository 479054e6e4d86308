#!/usr/bin/env bash
# The daemon's footprint (issue goals: idle RSS under 40 MiB plus the model, idle CPU under 1%):
# runs `plaster-agent run` with the digits model, no workload and the default 10 s telemetry
# interval against a local mosquitto for DURATION seconds, then reads VmRSS, VmHWM and the CPU
# time the process used from /proc. Then the spool's write and drain throughput.
#
#   bench/daemon-idle.sh [DURATION_S]        (needs target/release/plaster-agent and mosquitto)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-60}
bin=target/release/plaster-agent
[ -x "$bin" ] || cargo build --release -p plaster-agent
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
broker=$!
cat > "$work/agent.toml" <<TOML
device_id = "idle-bench"
fleet = "bench"
state_dir = "$work/state"
[model]
path = "$PWD/models/digits"
device = "cpu"
threads = 1
[mqtt]
url = "mqtt://127.0.0.1:$port"
[energy]
sysfs_root = "$work/no-sysfs"
TOML
RUST_LOG=warn "$bin" run --config "$work/agent.toml" &
agent=$!
trap 'kill $agent $broker 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 5   # load and warm-up; the measured window starts after it
ticks=$(getconf CLK_TCK)
cpu0=$(awk '{print $14 + $15}' "/proc/$agent/stat")
sleep "$duration"
cpu1=$(awk '{print $14 + $15}' "/proc/$agent/stat")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$agent/status")
threads=$(awk '/Threads/ {print $2}' "/proc/$agent/status")
model=$(stat -c %s models/digits/model.onnx)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "idle daemon (digits model, $model B file, telemetry every 10 s, no workload) over ${duration} s:"
echo "  VmRSS $((rss / 1024)) MiB ($rss KiB), VmHWM $((hwm / 1024)) MiB, $threads threads"
awk -v c0="$cpu0" -v c1="$cpu1" -v t="$ticks" -v d="$duration" \
    'BEGIN { printf "  CPU %.3f s in %d s = %.2f%% of one core\n", (c1 - c0) / t, d, 100 * (c1 - c0) / t / d }'
kill -TERM "$agent"
wait "$agent" || true
ex=target/release/examples/spool_throughput
[ -x "$ex" ] || cargo build --release -q -p plaster-agent --example spool_throughput
"$ex" "$work" "mqtt://127.0.0.1:$port"
