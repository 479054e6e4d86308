#!/usr/bin/env python3
"""Materialise more model-zoo CNNs for the CPU comparison (`bench/compare-onnxruntime.sh`).

The `onnx` package ships these graphs in its backend test data ("light" models) with their
weights replaced by ConstantOfShape nodes; they are materialised here exactly as
models/make_models.py does for SqueezeNet (seeded, so every run writes the same files). They
are tens of megabytes, so they are generated, never committed:

    python3 bench/zoo.py [OUT_DIR]        (default target/zoo)

writes OUT_DIR/<name>.onnx and OUT_DIR/<name>.npz (`input`: a seeded uniform input,
`output`: onnxruntime's first output for it) and prints one line per model.
"""
import hashlib
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
from make_models import SEED, materialise_light  # noqa: E402

# The four the design notes profile, with the op each one stresses.
MODELS = {
    "resnet50": "ResNet-50: 3x3/1x1 convolutions (matmul-bound), batch norm folded",
    "shufflenet": "ShuffleNet: grouped and depthwise convolutions, channel shuffles",
    "densenet121": "DenseNet-121: batch norm + scale + ReLU chains on concatenations",
    "inception_v1": "GoogLeNet: LRN, 9 inception blocks",
}


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "zoo")
    os.makedirs(out_dir, exist_ok=True)
    for ix, name in enumerate(MODELS):
        model_path = os.path.join(out_dir, f"{name}.onnx")
        rng = np.random.default_rng(SEED + ix + 1)
        model, _ = materialise_light(name, rng, name)
        onnx.save(model, model_path)
        sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = rng.uniform(0.0, 1.0, [d if isinstance(d, int) else 1 for d in inp.shape])
        x = x.astype(np.float32)
        y = sess.run(None, {inp.name: x})[0]
        np.savez(os.path.join(out_dir, f"{name}.npz"), input=x, output=y)
        with open(model_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        print(f"{model_path} {os.path.getsize(model_path):>10} sha256 {digest}... {MODELS[name]}")


if __name__ == "__main__":
    main()
