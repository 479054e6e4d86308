#!/usr/bin/env python3
"""onnxruntime's time per node and per op type for one model, to set against
`plaster-agent bench MODEL --profile` on the same machine: which layers lose, and by how much.

Median over the profiled runs of each node's kernel time (onnxruntime's own profiler,
`SessionOptions.enable_profiling`), after warm-up runs. Node names are onnxruntime's (after
its graph optimisations, e.g. `r145_nchwc`), so match layers by shape and order.

    bench/ort_profile.py MODEL [--npz FILE --key input] [--threads N] [--runs N] [--top N]
"""
import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--npz", help="take the input from this NPZ (first sample)")
    p.add_argument("--key", default="input", help="array in --npz holding inputs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--top", type=int, default=15, help="slowest nodes listed")
    a = p.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if a.npz:
        x = np.load(a.npz)[a.key].astype(np.float32)[:1]
    else:
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    for _ in range(a.warmup + a.runs):
        sess.run(None, {inp.name: x})
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)

    per_node = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["name"][: -len("_kernel_time")], e["args"]["op_name"])].append(e["dur"])
    rows = [(np.median(d[-a.runs:]) / 1000, name, op) for (name, op), d in per_node.items()]
    total = sum(ms for ms, _, _ in rows)
    print(f"{a.model}: {total:.3f} ms per inference in nodes, {a.threads} thread(s)")
    by_op = collections.Counter()
    for ms, _, op in rows:
        by_op[op] += ms
    for op, ms in by_op.most_common():
        print(f"  {op:24s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")
    print("slowest nodes:")
    for ms, name, op in sorted(rows, reverse=True)[: a.top]:
        print(f"  {ms:8.3f} ms  {op:16s} {name}")


if __name__ == "__main__":
    main()
