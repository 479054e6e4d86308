#!/usr/bin/env bash
# Side-by-side single-stream latency of plaster-agent (tract) and onnxruntime on the same
# models, inputs and thread counts, in one run; plus what bench's instrumentation costs
# against a bare tract loop on the same session (agent/examples/overhead.rs, alternating
# rounds). Prints a Markdown table for bench/RESULTS.md.
#
#   bench/compare-onnxruntime.sh [SECONDS_PER_RUN]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CORES="$(nproc)"

python3 -c 'import onnxruntime, numpy' 2>/dev/null || pip install -q -r models/requirements.txt
cargo build --release -q -p plaster-agent --bin plaster-agent --example overhead
AGENT=target/release/plaster-agent
OVERHEAD=target/release/examples/overhead

field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ${CORES} cores; $(date -u +%F)"
echo "onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)'), ${DURATION} s per run"
echo
echo "| model | threads | agent p50 ms | onnxruntime p50 ms | ratio (agent/ort) | bare tract mean ms | instrumented mean ms (A/B) | instrumentation ns/query | overhead |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for spec in "digits|models/digits|models/digits/model.onnx|--npz models/digits/dataset.npz" \
            "squeezenet|models/squeezenet/model.onnx|models/squeezenet/model.onnx|--npz models/reference/squeezenet.npz --key input"; do
    IFS='|' read -r name agent_model ort_model ort_args <<<"$spec"
    for threads in $(printf '%s\n' 1 "$CORES" | sort -un); do
        agent_json="$($AGENT bench "$agent_model" --device cpu --threads "$threads" --duration "$DURATION" --json 2>/dev/null)"
        # shellcheck disable=SC2086
        ort_json="$(python3 bench/ort_bench.py "$ort_model" --threads "$threads" --duration "$DURATION" $ort_args)"
        # Five alternating rounds of bare and instrumented loops, a fifth of a run each.
        overhead_json="$($OVERHEAD "$ort_model" "$threads" 5 "$(python3 -c "print($DURATION / 5)")")"
        agent_p50="$(field "['latency_ms']['p50']" <<<"$agent_json")"
        ort_p50="$(field "['p50']" <<<"$ort_json")"
        bare="$(field "['bare_mean_ms']" <<<"$overhead_json")"
        instrumented="$(field "['instrumented_mean_ms']" <<<"$overhead_json")"
        per_query="$(field "['instrumentation_ns_per_query']" <<<"$overhead_json")"
        python3 - "$name" "$threads" "$agent_p50" "$ort_p50" "$bare" "$instrumented" "$per_query" <<'PY'
import sys
name, threads, a, o, b, i, ns = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f"| {name} | {threads} | {a:.4f} | {o:.4f} | {a / o:.2f} | {b:.4f} | {i:.4f} ({100 * (i / b - 1):+.1f}%) | {ns:.0f} | {100 * ns / (b * 1e6):.2f}% |")
PY
    done
done
