#!/usr/bin/env bash
# The GPU check (issue: CUDA inference): one unattended script for an NVIDIA machine without
# network. It runs a plaster-agent binary built elsewhere over the models in models/, CPU vs
# CUDA in f32 and f16; checks the CUDA outputs against the CPU's (`bench --check-outputs`);
# prints latency, throughput, accuracy and NVML joules per inference as one table; says which
# CUDA libraries were loaded from where; and, where PyTorch with CUDA is installed, runs the same
# architectures in PyTorch eager as the peer. Budget: under 6 minutes.
#
#   scripts/gpu-check.sh [BINARY] [SECONDS_PER_RUN]
#       BINARY           default target/release/plaster-agent (build it on the CPU machine:
#                        cargo build --release -p plaster-agent)
#       SECONDS_PER_RUN  default 8
# Results go to $OUT (the device tool's output folder) or ./gpu-check-out, plus stdout.
# Exit status: 0 when every CUDA run worked and matched the CPU, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/plaster-agent}
seconds=${2:-8}
out=${OUT:-gpu-check-out}
mkdir -p "$out"
start=$(date +%s)
status=0
# Outputs within this of the CPU's in f32 count as matching; f16 rounds at about 1e-3 relative.
TOL_F32=1e-3
TOL_F16=5e-2

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*" | tee -a "$out/gpu.txt"
"$bin" --version | tee -a "$out/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$out/gpu.txt"

echo "== CUDA libraries the agent loads (from the dynamic loader)"
LD_DEBUG=libs timeout 120 "$bin" bench models/digits --device cuda --duration 1 --json \
    2>"$out/ld-debug.txt" >/dev/null
grep -oE "calling init: [^ ]*(libcuda|libcudart|libnvrtc|libcublas|libcublasLt|libcudnn|libnvidia-ml)[^ ]*" \
    "$out/ld-debug.txt" | sed 's/calling init: /  /' | sort -u | tee "$out/libraries.txt"
[ -s "$out/libraries.txt" ] || echo "  (none: CUDA did not start; the bench runs below say why)"

echo "== bench: CPU vs CUDA, f32 and f16, ${seconds} s each, single-stream, outputs checked"
run() { # label model device precision
    local name=$1-$3-$4
    shift
    timeout 150 "$bin" bench "$1" --device "$2" --precision "$3" --duration "$seconds" \
        --threads "$(nproc)" --check-outputs --json >"$out/$name.json" 2>"$out/$name.log"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "  $name failed (exit $rc): $(grep -m1 '^error' "$out/$name.log")"
        [ "$2" = cuda ] && status=1
        rm -f "$out/$name.json"
    fi
}
for model in digits:models/digits squeezenet:models/squeezenet/model.onnx; do
    run "${model%%:*}" "${model#*:}" cpu f32
    run "${model%%:*}" "${model#*:}" cuda f32
    run "${model%%:*}" "${model#*:}" cuda f16
done

if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "== peer: PyTorch eager on the GPU, batch 1"
    timeout 150 python3 scripts/torch_peer.py "$seconds" >"$out/torch.jsonl" 2>"$out/torch.log" ||
        echo "  torch peer failed: $(tail -1 "$out/torch.log")"
else
    echo "== peer: PyTorch with CUDA is not installed here; no peer figures"
fi

echo "== results"
python3 - "$out" "$TOL_F32" "$TOL_F16" <<'PY' || status=1
import glob, json, os, sys
out, tol32, tol16 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows, bad = [], []
for path in sorted(glob.glob(os.path.join(out, "*-*-f*.json"))):
    r = json.load(open(path))
    lat, e, chk = r["latency_ms"], r["energy"], r.get("outputs_vs_cpu") or {}
    acc = r["accuracy"]["value"] if r.get("accuracy") else None
    tol = tol16 if path.endswith("-f16.json") else tol32
    ok = chk and chk["max_abs_diff"] <= tol and chk["integer_mismatches"] == 0
    if not ok: bad.append(os.path.basename(path))
    rows.append([r["model"]["name"], r["device"]["runtime"], os.path.basename(path).rsplit("-", 1)[1][:-5],
                 f'{lat["p50"]:.4g}', f'{lat["p90"]:.4g}', f'{r["throughput"]["inferences_per_s"]:.1f}',
                 "-" if acc is None else f"{acc:.4f}",
                 "-" if e["joules_per_inference"] is None else f'{e["joules_per_inference"]:.4g}',
                 (e["source"] or e["status"])[:28],
                 f'{chk.get("max_abs_diff", float("nan")):.2e}' + ("" if ok else " FAIL"),
                 f'{r["programmability"]["nodes_on_accelerator"]}/{r["programmability"]["nodes_total"]}'])
torch_path = os.path.join(out, "torch.jsonl")
if os.path.exists(torch_path):
    for line in open(torch_path):
        t = json.loads(line)
        rows.append([t["model"], "torch eager", t["precision"], f'{t["p50_ms"]:.4g}', f'{t["p90_ms"]:.4g}',
                     f'{t["inferences_per_s"]:.1f}', "-", "-", f'torch {t["torch"]}', "-", "-"])
head = ["model", "runtime", "prec", "p50 ms", "p90 ms", "inf/s", "top-1", "J/inf", "energy source",
        "max|d| vs cpu", "on GPU"]
widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
fmt = "  ".join("{:<%d}" % w for w in widths)
print(fmt.format(*head))
for row in rows:
    print(fmt.format(*row))
by = {(r[0], r[1], r[2]): r for r in rows}
for model in sorted({r[0] for r in rows}):
    cpu, cuda = by.get((model, "cpu", "f32")), by.get((model, "cuda", "f32"))
    torch_row = by.get((model, "torch eager", "f32"))
    if cpu and cuda:
        print(f"{model}: CUDA f32 speed-up over CPU at p50: {float(cpu[3]) / float(cuda[3]):.2f}x")
    if cuda and torch_row:
        print(f"{model}: CUDA f32 p50 / PyTorch eager f32 p50: {float(cuda[3]) / float(torch_row[3]):.2f}")
if bad:
    print("outputs off the CPU's beyond tolerance (or not checked):", ", ".join(bad))
    sys.exit(1)
PY
echo "== took $(($(date +%s) - start)) s; files in $out"
exit $status
