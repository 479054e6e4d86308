#!/usr/bin/env bash
# Side-by-side single-stream latency of plaster-agent (tract, with and without our graph
# rewrites) and onnxruntime on the same models, inputs and thread counts, in one run: the
# bundled models plus four model-zoo CNNs (bench/zoo.py materialises them under target/zoo).
# Then load time from ONNX vs from the NNEF cache, and what bench's instrumentation costs
# against a bare tract loop on the bundled models (agent/examples/overhead.rs), and GemmConv's
# matrix multiply alone on ResNet-50's layer shapes (agent/examples/gemm_shapes.rs). Prints
# Markdown tables for bench/RESULTS.md.
#
#   bench/compare-onnxruntime.sh [SECONDS_PER_RUN]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CORES="$(nproc)"

python3 -c 'import onnxruntime, numpy, onnx' 2>/dev/null || pip install -q -r models/requirements.txt
cargo build --release -q -p plaster-agent --bin plaster-agent --example overhead --example load_time \
    --example gemm_shapes
AGENT=target/release/plaster-agent
OVERHEAD=target/release/examples/overhead
LOAD_TIME=target/release/examples/load_time
GEMM_SHAPES=target/release/examples/gemm_shapes
ZOO=target/zoo
for name in resnet50 shufflenet densenet121 inception_v1; do
    [ -f "$ZOO/$name.onnx" ] || { python3 bench/zoo.py "$ZOO"; break; }
done

field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
# name|agent model|onnx file|ort_bench.py input arguments
MODELS=(
    "digits|models/digits|models/digits/model.onnx|--npz models/digits/dataset.npz"
    "squeezenet|models/squeezenet/model.onnx|models/squeezenet/model.onnx|--npz models/reference/squeezenet.npz --key input"
)
for name in resnet50 shufflenet densenet121 inception_v1; do
    MODELS+=("$name|$ZOO/$name.onnx|$ZOO/$name.onnx|--npz $ZOO/$name.npz --key input")
done

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ${CORES} cores; $(date -u +%F)"
echo "onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)'), ${DURATION} s per run"
echo
echo "| model | threads | agent p50 ms | agent --no-rewrites p50 ms | onnxruntime p50 ms | ratio (agent/ort) | ratio without rewrites | rewrites | max abs diff vs tract |"
echo "|---|---:|---:|---:|---:|---:|---:|---|---:|"
RATIOS=()
for spec in "${MODELS[@]}"; do
    IFS='|' read -r name agent_model ort_model ort_args <<<"$spec"
    for threads in $(printf '%s\n' 1 "$CORES" | sort -un); do
        agent_json="$($AGENT bench "$agent_model" --device cpu --threads "$threads" --duration "$DURATION" --check-outputs --json 2>/dev/null)"
        plain_json="$($AGENT bench "$agent_model" --device cpu --threads "$threads" --duration "$DURATION" --no-rewrites --json 2>/dev/null)"
        # shellcheck disable=SC2086
        ort_json="$(python3 bench/ort_bench.py "$ort_model" --threads "$threads" --duration "$DURATION" $ort_args)"
        row="$(python3 - "$name" "$threads" "$agent_json" "$plain_json" "$ort_json" <<'PY'
import json, sys
name, threads, agent, plain, ort = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
a, p, o = agent["latency_ms"]["p50"], plain["latency_ms"]["p50"], ort["p50"]
rw = agent["programmability"].get("rewrites", {})
applied = ", ".join(f"{k} {v}" for k, v in rw.items() if v) or "none"
diff = agent["outputs_vs_cpu"]["max_abs_diff"]
print(f"| {name} | {threads} | {a:.4f} | {p:.4f} | {o:.4f} | {a / o:.2f} | {p / o:.2f} | {applied} | {diff:.1e} |")
print(f"RATIO {a / o}")
PY
)"
        grep -v '^RATIO' <<<"$row"
        RATIOS+=("$(grep '^RATIO' <<<"$row" | cut -d' ' -f2)")
    done
done
python3 - "${RATIOS[@]}" <<'PY'
import statistics, sys
r = sorted(map(float, sys.argv[1:]))
print(f"\nratio agent/onnxruntime over {len(r)} runs: median {statistics.median(r):.2f}, "
      f"best {r[0]:.2f}, worst {r[-1]:.2f}; within 1.2x: {sum(x <= 1.2 for x in r)}/{len(r)}")
PY

echo
echo "Load time, ONNX vs the NNEF cache (median of 3 alternating rounds; prepare = batch fixed,"
echo "declutter or cache read, rewrites, tract's codegen):"
echo
echo "| model | ONNX load ms | prepare from ONNX ms | prepare from cache ms | total ONNX ms | total cached ms | cached/ONNX |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for spec in "${MODELS[@]}"; do
    IFS='|' read -r name agent_model _ _ <<<"$spec"
    load_json="$($LOAD_TIME "$agent_model" 3)"
    python3 - "$name" "$load_json" <<'PY'
import json, sys
name, d = sys.argv[1], json.loads(sys.argv[2])
o, c = d["onnx"], d["cached"]
print(f"| {name} | {o['load_ms']:.1f} | {o['prepare_ms']:.1f} | {c['prepare_ms']:.1f} | "
      f"{o['total_ms']:.1f} | {c['total_ms']:.1f} | {c['total_ms'] / o['total_ms']:.2f} |")
PY
done

echo
echo "What bench's instrumentation costs (five alternating rounds of a bare tract loop and the"
echo "instrumented single-stream loop, a fifth of a run each):"
echo
echo "| model | threads | bare tract mean ms | instrumented mean ms (A/B) | instrumentation ns/query | overhead |"
echo "|---|---:|---:|---:|---:|---:|"
for spec in "${MODELS[@]:0:2}"; do
    IFS='|' read -r name _ ort_model _ <<<"$spec"
    for threads in $(printf '%s\n' 1 "$CORES" | sort -un); do
        overhead_json="$($OVERHEAD "$ort_model" "$threads" 5 "$(python3 -c "print($DURATION / 5)")")"
        bare="$(field "['bare_mean_ms']" <<<"$overhead_json")"
        instrumented="$(field "['instrumented_mean_ms']" <<<"$overhead_json")"
        per_query="$(field "['instrumentation_ns_per_query']" <<<"$overhead_json")"
        python3 - "$name" "$threads" "$bare" "$instrumented" "$per_query" <<'PY'
import sys
name, threads, b, i, ns = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f"| {name} | {threads} | {b:.4f} | {i:.4f} ({100 * (i / b - 1):+.1f}%) | {ns:.0f} | {100 * ns / (b * 1e6):.2f}% |")
PY
    done
done

echo
echo "Our convolution matrix multiply alone (agent/examples/gemm_shapes.rs) on SqueezeNet's,"
echo "ResNet-50's and DenseNet-121's layer shapes, B laid out as in the model, best of 20:"
echo
$GEMM_SHAPES
