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


def materialise_light(name, rng, graph_name):
    """The `onnx` package's "light" backend-test model `name` with every ConstantOfShape weight
    materialised as a seeded initialiser (He-normal; 1-D ones, biases and batch-norm
    statistics, uniform in [0, 0.05]) and its IR version raised to 7."""
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                         f"light_{name}.onnx")
    model = onnx.load(light)
    graph = model.graph
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
    new_graph = helper.make_graph(kept_nodes, graph_name, inputs, list(graph.output),
                                  new_inits)
    out = helper.make_model(new_graph, opset_imports=list(model.opset_import),
                            producer_name="plaster-agent models/make_models.py")
    out.ir_version = 7
    onnx.checker.check_model(out)
    return out, new_inits


def make_squeezenet():
    rng = np.random.default_rng(SEED)
    out, new_inits = materialise_light("squeezenet", rng, "squeezenet1.1")
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


def make_rewrite_graphs():
    """Small graphs that exercise each of the agent's graph rewrites and their edge cases (odd
    channel counts, strides, padding, broadcast shapes), and patterns they must leave alone.
    tests/tests/rewrites.rs runs each with and without the rewrites."""
    rng = np.random.default_rng(SEED + 100)
    F = onnx.TensorProto.FLOAT

    def const(name, shape, low=-1.5, high=1.5):
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    def save(name, nodes, inputs, outputs, inits):
        graph = helper.make_graph(nodes, name, inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  producer_name="plaster-agent models/make_models.py")
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, path("testdata", "rewrites", f"{name}.onnx"))
        return f"testdata/rewrites/{name}.onnx"

    def vi(name, shape):
        return helper.make_tensor_value_info(name, F, shape)

    n = helper.make_node
    files = []
    # Batch norm, a scale and bias, a subtraction and ReLU on 5 channels: one pass.
    files.append(save("affine_chain", [
        n("BatchNormalization", ["x", "g", "b", "m", "v"], ["bn"], epsilon=1e-5),
        n("Mul", ["bn", "s1"], ["t1"]), n("Add", ["t1", "b1"], ["t2"]),
        n("Sub", ["t2", "c"], ["t3"]), n("Mul", ["t3", "half"], ["t4"]),
        n("Relu", ["t4"], ["y"]),
    ], [vi("x", [2, 5, 7, 9])], [vi("y", [2, 5, 7, 9])], [
        const("g", [5], 0.5, 1.5), const("b", [5]), const("m", [5]), const("v", [5], 0.1, 2.0),
        const("s1", [1, 5, 1, 1]), const("b1", [5, 1, 1]), const("c", [1, 5, 1, 1]),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
    ]))
    # Constant first (c - x, b + x) on a rank-3 tensor with 3 channels.
    files.append(save("affine_const_first", [
        n("Sub", ["c", "x"], ["t1"]), n("Add", ["b", "t1"], ["t2"]), n("Mul", ["s", "t2"], ["y"]),
    ], [vi("x", [1, 3, 10])], [vi("y", [1, 3, 10])],
        [const("c", [3, 1]), const("b", [1, 3, 1]), const("s", [3, 1])]))
    # The scaled tensor is also a graph output: the Mul must stay; Add + ReLU may merge.
    files.append(save("affine_intermediate_output", [
        n("Mul", ["x", "s"], ["scaled"]), n("Add", ["scaled", "b"], ["t"]), n("Relu", ["t"], ["y"]),
    ], [vi("x", [1, 4, 6, 6])], [vi("scaled", [1, 4, 6, 6]), vi("y", [1, 4, 6, 6])],
        [const("s", [1, 4, 1, 1]), const("b", [1, 4, 1, 1])]))
    # Constants that vary along height, not channels, are not per-channel: left alone.
    files.append(save("affine_not_per_channel", [
        n("Mul", ["x", "s"], ["t"]), n("Add", ["t", "b"], ["y"]),
    ], [vi("x", [1, 4, 6, 5])], [vi("y", [1, 4, 6, 5])],
        [const("s", [1, 1, 6, 1]), const("b", [1, 1, 6, 1])]))
    # A depthwise (stride 2, padded) and a grouped 1x1 convolution, each with a batch norm.
    files.append(save("grouped_conv_bn", [
        n("Conv", ["x", "dw", "dwb"], ["c1"], group=6, kernel_shape=[3, 3], strides=[2, 2],
          pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"], epsilon=1e-5),
        n("Conv", ["n1", "gw"], ["c2"], group=3, kernel_shape=[1, 1]),
        n("Mul", ["c2", "s2"], ["t2"]), n("Add", ["t2", "b2"], ["u2"]), n("Relu", ["u2"], ["y"]),
    ], [vi("x", [1, 6, 9, 11])], [vi("y", [1, 9, 5, 6])], [
        const("dw", [6, 1, 3, 3]), const("dwb", [6]), const("g1", [6], 0.5, 1.5),
        const("b1", [6]), const("m1", [6]), const("v1", [6], 0.1, 2.0),
        const("gw", [9, 2, 1, 1]), const("s2", [1, 9, 1, 1]), const("b2", [1, 9, 1, 1]),
    ]))
    # Depthwise convolutions: a 5x3 window with asymmetric padding and no bias, and a 3x3
    # window with strides 2x3, on 5 channels and a batch of 2.
    files.append(save("depthwise_conv", [
        n("Conv", ["x", "w1"], ["y1"], group=5, kernel_shape=[5, 3], pads=[2, 0, 1, 2]),
        n("Conv", ["x", "w2", "b2"], ["y2"], group=5, kernel_shape=[3, 3], strides=[2, 3],
          pads=[0, 1, 1, 0]),
    ], [vi("x", [2, 5, 8, 9])], [vi("y1", [2, 5, 7, 9]), vi("y2", [2, 5, 4, 3])],
        [const("w1", [5, 1, 5, 3]), const("w2", [5, 1, 3, 3]), const("b2", [5])]))
    # Convolutions for our matrix multiply: a 3x3 one with strides 2x3, asymmetric padding and a
    # ReLU on 13 channels; a 1x1 one (an EinSum once decluttered) to 70 channels (not a multiple
    # of the kernel's 8 rows) with a scale and bias; a 5x5 one (525-long dot products, several
    # blocks) whose output is a graph output and also feeds a ReLU, so nothing is folded into
    # it. A batch of 2.
    files.append(save("gemm_conv", [
        n("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 3],
          pads=[1, 0, 2, 1]),
        n("Relu", ["c1"], ["r1"]),
        n("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[1, 1]),
        n("Mul", ["c2", "s2"], ["t2"]), n("Add", ["t2", "a2"], ["y2"]),
        n("Conv", ["r1", "w3"], ["y3"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
        n("Relu", ["y3"], ["y4"]),
    ], [vi("x", [2, 13, 17, 19])], [
        vi("y2", [2, 70, 9, 6]), vi("y3", [2, 9, 9, 6]), vi("y4", [2, 9, 9, 6]),
    ], [
        const("w1", [21, 13, 3, 3]), const("b1", [21]), const("w2", [70, 21, 1, 1]),
        const("b2", [70]), const("s2", [1, 70, 1, 1]), const("a2", [70, 1, 1]),
        const("w3", [9, 21, 5, 5]),
    ]))
    # Residual blocks for GemmConv's epilogue and strided 1x1 convolutions (tract's Downsample
    # ops before an EinSum), on 12 and 20 channels, a batch of 2: a 3x3 convolution + batch
    # norm + the block's input + ReLU; two 1x1/2 convolutions on an odd 9x10 input (a scaled
    # projection, and one followed by a 3x3) summed without a ReLU; a 1x1 convolution padded
    # after (its output larger than its input: not read directly); a 1x1 with strides 3x2
    # added to itself (x + x: no second input to take, left alone); a grouped 1x1 added to
    # the block's input (the residual first) + ReLU.
    files.append(save("residual_conv", [
        n("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "g1", "o1", "m1", "v1"], ["n1"], epsilon=1e-5),
        n("Add", ["n1", "x"], ["s1"]), n("Relu", ["s1"], ["r1"]),
        n("Conv", ["r1", "wp"], ["p"], kernel_shape=[1, 1], strides=[2, 2]),
        n("Mul", ["p", "sp"], ["p2"]),
        n("Conv", ["r1", "wm", "bm"], ["m"], kernel_shape=[1, 1], strides=[2, 2]),
        n("Conv", ["m", "wm2"], ["m2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("Add", ["p2", "m2"], ["y1"]),
        n("Conv", ["y1", "wq", "bq"], ["y2"], kernel_shape=[1, 1], pads=[0, 0, 1, 1]),
        n("Conv", ["r1", "wz"], ["z"], kernel_shape=[1, 1], strides=[3, 2]),
        n("Add", ["z", "z"], ["y3"]),
        n("Conv", ["r1", "wg", "bg"], ["g"], kernel_shape=[1, 1], group=4),
        n("Add", ["x", "g"], ["s4"]), n("Relu", ["s4"], ["y4"]),
    ], [vi("x", [2, 12, 9, 10])], [
        vi("y1", [2, 20, 5, 5]), vi("y2", [2, 7, 6, 6]), vi("y3", [2, 6, 3, 5]),
        vi("y4", [2, 12, 9, 10]),
    ], [
        const("w1", [12, 12, 3, 3], -0.3, 0.3), const("b1", [12]), const("g1", [12], 0.5, 1.5),
        const("o1", [12]), const("m1", [12]), const("v1", [12], 0.1, 2.0),
        const("wp", [20, 12, 1, 1]), const("sp", [1, 20, 1, 1]),
        const("wm", [20, 12, 1, 1]), const("bm", [20]), const("wm2", [20, 20, 3, 3], -0.3, 0.3),
        const("wq", [7, 20, 1, 1]), const("bq", [7]), const("wz", [6, 12, 1, 1]),
        const("wg", [12, 3, 1, 1]), const("bg", [12]),
    ]))
    # GoogLeNet's LRN and one with another size, exponent and bias, on 7 channels.
    files.append(save("lrn", [
        n("LRN", ["x"], ["l1"], size=5, alpha=1e-4, beta=0.75, bias=1.0),
        n("LRN", ["l1"], ["y"], size=4, alpha=0.05, beta=0.6, bias=2.0),
    ], [vi("x", [2, 7, 5, 6])], [vi("y", [2, 7, 5, 6])], []))
    # Max pools: 3x3/2 padded, 2x2/2 with ceil mode, asymmetric padding, a 2x3 window, stride 3.
    files.append(save("max_pool", [
        n("MaxPool", ["x"], ["y1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        n("MaxPool", ["x"], ["y2"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        n("MaxPool", ["x"], ["y3"], kernel_shape=[3, 3], pads=[1, 0, 1, 2]),
        n("MaxPool", ["x"], ["y4"], kernel_shape=[2, 3], strides=[1, 2]),
        n("MaxPool", ["x"], ["y5"], kernel_shape=[2, 4], strides=[3, 3], pads=[0, 1, 0, 2]),
    ], [vi("x", [1, 3, 11, 10])], [
        vi("y1", [1, 3, 6, 5]), vi("y2", [1, 3, 6, 5]), vi("y3", [1, 3, 11, 10]),
        vi("y4", [1, 3, 10, 4]), vi("y5", [1, 3, 4, 4]),
    ], []))
    # Depthwise convolutions on wider planes than depthwise_conv's: 3x3 padded on 20x37 and
    # 5x5 with stride 2 (10x19 outputs), on 4 channels.
    files.append(save("depthwise_wide", [
        n("Conv", ["x", "w1", "b1"], ["y1"], group=4, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("Conv", ["x", "w2"], ["y2"], group=4, kernel_shape=[5, 5], strides=[2, 2],
          pads=[2, 2, 2, 2]),
    ], [vi("x", [1, 4, 20, 37])], [vi("y1", [1, 4, 20, 37]), vi("y2", [1, 4, 10, 19])],
        [const("w1", [4, 1, 3, 3]), const("b1", [4]), const("w2", [4, 1, 5, 5])]))
    # Average pools that do not count padding (ONNX's default): ShuffleNet's 3x3/2 padded,
    # DenseNet's 2x2/2, one in ceil mode; GoogLeNet's 7x7 with stride 1 padded after and one
    # that counts padding, both left to tract. On 5 channels, a batch of 2.
    files.append(save("avg_pool", [
        n("AveragePool", ["x"], ["y1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        n("AveragePool", ["x"], ["y2"], kernel_shape=[2, 2], strides=[2, 2]),
        n("AveragePool", ["x"], ["y3"], kernel_shape=[7, 7], pads=[0, 0, 1, 1]),
        n("AveragePool", ["x"], ["y4"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        n("AveragePool", ["x"], ["y5"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
          count_include_pad=1),
    ], [vi("x", [2, 5, 11, 10])], [
        vi("y1", [2, 5, 6, 5]), vi("y2", [2, 5, 5, 5]), vi("y3", [2, 5, 6, 5]),
        vi("y4", [2, 5, 6, 5]), vi("y5", [2, 5, 6, 5]),
    ], []))
    # A classifier head for GemmConv's fully connected path: a global average pool, Flatten
    # and a Gemm (weights [O, I], transB) + ReLU, then a MatMul (weights [I, O]) and a small
    # Gemm (under the size GemmConv takes: left to tract). 256 features, a batch of 1.
    files.append(save("classifier", [
        n("GlobalAveragePool", ["x"], ["p"]), n("Flatten", ["p"], ["f"]),
        n("Gemm", ["f", "w1", "b1"], ["g"], transB=1), n("Relu", ["g"], ["h"]),
        n("MatMul", ["h", "w2"], ["y1"]),
        n("Gemm", ["h", "w3", "b3"], ["y2"], transB=1),
    ], [vi("x", [1, 256, 3, 2])], [vi("y1", [1, 253]), vi("y2", [1, 10])], [
        const("w1", [260, 256], -0.1, 0.1), const("b1", [260]),
        const("w2", [260, 253], -0.1, 0.1), const("w3", [10, 260]), const("b3", [10]),
    ]))
    for rel in files:
        onnx.checker.check_model(os.path.join(HERE, rel))
    return files


def sha256(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    digits = make_digits()
    squeezenet = make_squeezenet()
    make_testdata()
    rewrite_graphs = make_rewrite_graphs()
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
                "testdata/unsupported_roialign.onnx", *rewrite_graphs, "expected.json"]:
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
