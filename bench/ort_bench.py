#!/usr/bin/env python3
"""onnxruntime single-stream latency, the peer `bench/compare-onnxruntime.sh` measures against.

Same protocol as `plaster-agent bench --scenario single-stream`: batch 1, back to back, each
query timed on the monotonic clock, 10 warm-up queries. Prints one JSON object.
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--npz", help="take inputs from this NPZ")
    p.add_argument("--key", default="x", help="array in --npz holding inputs, batch on axis 0")
    a = p.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if a.npz:
        x = np.load(a.npz)[a.key].astype(np.float32)
        feeds = [{inp.name: x[i:i + 1]} for i in range(min(len(x), 64))]
    else:
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        rng = np.random.default_rng(0)
        feeds = [{inp.name: rng.uniform(0, 1, shape).astype(np.float32)} for _ in range(8)]
    for i in range(10):
        sess.run(None, feeds[i % len(feeds)])
    lat = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < a.duration:
        t0 = time.perf_counter_ns()
        sess.run(None, feeds[i % len(feeds)])
        lat.append(time.perf_counter_ns() - t0)
        i += 1
    lat = np.array(lat) / 1e6
    print(json.dumps({"count": len(lat), "p50": float(np.percentile(lat, 50)),
                      "p90": float(np.percentile(lat, 90)), "mean": float(lat.mean()),
                      "onnxruntime": ort.__version__}))


if __name__ == "__main__":
    main()
