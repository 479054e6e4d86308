#!/usr/bin/env bash
# Side-by-side single-stream latency of plaster-agent (tract) and onnxruntime on the same
# models, inputs and thread counts, in one run; plus what bench's instrumentation costs
# against a bare tract loop. Prints a Markdown table for bench/RESULTS.md.
#
#   bench/compare-onnxruntime.sh [SECONDS_PER_RUN]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CORES="$(nproc)"

python3 -c 'import onnxruntime, numpy' 2>/dev/null || pip install -q -r models/requirements.txt
cargo build --release -q -p plaster-agent --bin plaster-agent --example bare_loop
AGENT=target/release/plaster-agent
BARE=target/release/examples/bare_loop

field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ${CORES} cores; $(date -u +%F)"
echo "onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)'), ${DURATION} s per run"
echo
echo "| model | threads | agent p50 ms | onnxruntime p50 ms | ratio (agent/ort) | agent mean ms | bare tract mean ms | instrumentation overhead |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for spec in "digits|models/digits|models/digits/model.onnx|--npz models/digits/dataset.npz" \
            "squeezenet|models/squeezenet/model.onnx|models/squeezenet/model.onnx|--npz models/reference/squeezenet.npz --key input"; do
    IFS='|' read -r name agent_model ort_model ort_args <<<"$spec"
    for threads in $(printf '%s\n' 1 "$CORES" | sort -un); do
        agent_json="$($AGENT bench "$agent_model" --device cpu --threads "$threads" --duration "$DURATION" --json 2>/dev/null)"
        # shellcheck disable=SC2086
        ort_json="$(python3 bench/ort_bench.py "$ort_model" --threads "$threads" --duration "$DURATION" $ort_args)"
        bare_json="$($BARE "$ort_model" "$threads" "$DURATION")"
        agent_p50="$(field "['latency_ms']['p50']" <<<"$agent_json")"
        agent_mean="$(field "['latency_ms']['mean']" <<<"$agent_json")"
        ort_p50="$(field "['p50']" <<<"$ort_json")"
        bare_mean="$(field "['mean_ms']" <<<"$bare_json")"
        python3 - "$name" "$threads" "$agent_p50" "$ort_p50" "$agent_mean" "$bare_mean" <<'PY'
import sys
name, threads, a, o, am, bm = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f"| {name} | {threads} | {a:.4f} | {o:.4f} | {a / o:.2f} | {am:.4f} | {bm:.4f} | {100 * (am / bm - 1):+.1f}% |")
PY
    done
done
