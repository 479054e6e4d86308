#!/usr/bin/env python3
"""Regenerate every model, dataset and reference output in models/.

Run from anywhere: `python3 models/make_models.py` (requirements pinned in requirements.txt).

* digits/      a real trained classifier: scikit-learn's MLPClassifier on the digits data set
               that ships inside scikit-learn (no download), exported with skl2onnx; its
               held-out validation split is digits/dataset.npz (`x` float32 [N, 64] pixel
               intensities scaled to [0, 1], `y` int64 [N] labels). A bundle directory.
* squeezenet/  the SqueezeNet 1.1 graph that the `onnx` package ships in its backend test data
               ("light" model), with every ConstantOfShape weight materialised as a seeded
               He-normal initialiser, so throughput and latency run a real model-zoo CNN.
* reference/   onnxruntime outputs for cross-checking the agent: digits.npz (every validation
               sample: `label`, `probabilities`) and squeezenet.npz (`input`, `output`).
* testdata/     tiny graphs for error-path tests (an op tract cannot run).
* expected.json  accuracy of the digits model on its validation set, computed here with
               onnxruntime, which `bench` must reproduce to the last sample.
"""
import hashlib
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261127


def path(*parts):
    full = os.path.join(HERE, *parts)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    return full


def make_digits():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.3, random_state=SEED % (2**32), stratify=y
    )
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0)
    clf.fit(x_train, y_train)
    onx = to_onnx(
        clf,
        x_train[:1],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.graph.name = "digits-mlp"
    onx.doc_string = "scikit-learn MLPClassifier(64) on sklearn digits, exported by skl2onnx"
    onnx.save(onx, path("digits", "model.onnx"))
    np.savez(path("digits", "dataset.npz"), x=x_val, y=y_val)
    with open(path("digits", "labels.txt"), "w") as f:
        f.write("".join(f"{d}\n" for d in range(10)))

    sess = ort.InferenceSession(path("digits", "model.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = sess.run(None, {sess.get_inputs()[0].name: x_val})
    np.savez(path("reference", "digits.npz"), x=x_val, label=label, probabilities=probabilities)
    correct = int((label == y_val).sum())
    sklearn_correct = int((clf.predict(x_val) == y_val).sum())
    if correct != sklearn_correct:
        sys.exit(f"onnxruntime ({correct}) and scikit-learn ({sklearn_correct}) disagree")
    return {"samples": int(len(y_val)), "correct": correct, "top1": correct / len(y_val)}


def he_normal(rng, shape):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def make_squeezenet():
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                         "light_squeezenet.onnx")
    model = onnx.load(light)
    graph = model.graph
    rng = np.random.default_rng(SEED)
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    new_inits, kept_nodes = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            kept_nodes.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        name = node.output[0]
        # Biases small and positive keep ReLU activations alive through 26 convolutions.
        values = (rng.uniform(0.0, 0.05, shape).astype(np.float32) if len(shape) == 1
                  else he_normal(rng, shape))
        new_inits.append(numpy_helper.from_array(values, name))
    # Initialisers that are not shapes (a few small biases) are real values: keep them.
    kept_inits = [t for t in graph.initializer if not t.name.endswith("__SHAPE")]
    new_inits = kept_inits + new_inits
    weights = {t.name for t in new_inits} | set(shapes)
    inputs = [i for i in graph.input if i.name not in weights]
    new_graph = helper.make_graph(kept_nodes, "squeezenet1.1", inputs, list(graph.output),
                                  new_inits)
    out = helper.make_model(new_graph, opset_imports=list(model.opset_import),
                            producer_name="plaster-agent models/make_models.py")
    out.ir_version = 7
    onnx.checker.check_model(out)
    onnx.save(out, path("squeezenet", "model.onnx"))

    x = rng.uniform(0.0, 1.0, (1, 3, 224, 224)).astype(np.float32)
    sess = ort.InferenceSession(path("squeezenet", "model.onnx"),
                                providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
    np.savez(path("reference", "squeezenet.npz"), input=x, output=y)
    params = sum(int(np.prod(t.dims)) for t in new_inits)
    return {"parameters": params}


def make_testdata():
    """Tiny graphs for error-path tests: a model with an op tract cannot run (RoiAlign)."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    rois = helper.make_tensor_value_info("rois", onnx.TensorProto.FLOAT, [1, 4])
    idx = helper.make_tensor_value_info("batch_indices", onnx.TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 2, 2])
    relu = helper.make_node("Relu", ["x"], ["x_relu"], name="relu")
    roi = helper.make_node("RoiAlign", ["x_relu", "rois", "batch_indices"], ["y"],
                           name="roi_align", output_height=2, output_width=2)
    graph = helper.make_graph([relu, roi], "unsupported-op", [x, rois, idx], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="plaster-agent models/make_models.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path("testdata", "unsupported_roialign.onnx"))


def sha256(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    digits = make_digits()
    squeezenet = make_squeezenet()
    make_testdata()
    expected = {
        "generated_with": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "digits": {"accuracy": digits},
        "squeezenet": squeezenet,
    }
    with open(path("expected.json"), "w") as f:
        json.dump(expected, f, indent=2, sort_keys=True)
        f.write("\n")
    rows = []
    for rel in ["digits/model.onnx", "digits/dataset.npz", "digits/labels.txt",
                "squeezenet/model.onnx", "reference/digits.npz", "reference/squeezenet.npz",
                "testdata/unsupported_roialign.onnx", "expected.json"]:
        full = os.path.join(HERE, rel)
        print(f"{rel:36} {os.path.getsize(full):>9} {sha256(full)}")
        rows.append(f"| `{rel}` | {os.path.getsize(full):,} | `{sha256(full)}` |")
    write_file_table(rows)


def write_file_table(rows):
    """Keep the size and sha256 table in models/README.md in step with the files."""
    readme = os.path.join(HERE, "README.md")
    with open(readme) as f:
        text = f.read()
    begin = text.index("<!-- files:begin")
    begin = text.index("\n", begin) + 1
    end = text.index("<!-- files:end -->")
    table = "| file | bytes | sha256 |\n|---|---:|---|\n" + "\n".join(rows) + "\n"
    with open(readme, "w") as f:
        f.write(text[:begin] + table + text[end:])


if __name__ == "__main__":
    main()
