#!/usr/bin/env python3
"""Generate the small test models of outpost-infer and their onnxruntime references.

Writes, under module/testdata/:
  models/<name>.onnx                      the model (random but fixed weights, seed 20261127)
  reference/<name>/inputs/<input>.npy     one reference input per model input
  reference/<name>/outputs/<i>.npy        onnxruntime's i-th output for those inputs

Models:
  mlp     sensor-anomaly MLP: sensor float32 [N, 16] -> score float32 [N, 1] (symbolic batch)
  cnn     small CNN: image float32 [1, 3, 64, 64] -> probs float32 [1, 10] (fixed shape)
  dtypes  one input and one output per OIP datatype (FP32, FP16, INT64, INT32, UINT8, BOOL)
  mlp_v2  mlp with other weights (the hot-reload test swaps the two)

Test tooling only (pip install onnx==1.22.0 onnxruntime numpy); never part of the product.
Run from the repository root: python3 scripts/make-test-models.py
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SEED = 20261127
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "module", "testdata")
OPSET = 17


def init(rng, name, shape, scale):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def mlp(rng):
    nodes, inits = [], []
    dims = [16, 32, 16, 1]
    x = "sensor"
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        inits += [init(rng, f"w{i}", (a, b), 1 / np.sqrt(a)), init(rng, f"b{i}", (b,), 0.1)]
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"]))
        last = i == len(dims) - 2
        out = f"z{i}" if not last else "logit"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            x = f"h{i}"
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["score"]))
    graph = helper.make_graph(
        nodes, "sensor_anomaly_mlp",
        [helper.make_tensor_value_info("sensor", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        inits)
    inputs = {"sensor": rng.standard_normal((4, 16)).astype(np.float32)}
    return graph, inputs


def cnn(rng):
    nodes, inits = [], []
    chans = [3, 16, 32, 64]
    x = "image"
    for i, (a, b) in enumerate(zip(chans, chans[1:])):
        inits += [init(rng, f"k{i}", (b, a, 3, 3), 1 / np.sqrt(a * 9)), init(rng, f"c{i}", (b,), 0.1)]
        nodes.append(helper.make_node("Conv", [x, f"k{i}", f"c{i}"], [f"conv{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        nodes.append(helper.make_node("MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]))
        x = f"pool{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits += [init(rng, "fw", (10, 64), 1 / 8), init(rng, "fb", (10,), 0.1)]
    nodes.append(helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])],
        inits)
    inputs = {"image": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)}
    return graph, inputs


def dtypes(rng):
    kinds = [
        ("fp32", TensorProto.FLOAT, np.float32, "Add"),
        ("fp16", TensorProto.FLOAT16, np.float16, "Add"),
        ("int64", TensorProto.INT64, np.int64, "Add"),
        ("int32", TensorProto.INT32, np.int32, "Add"),
        ("uint8", TensorProto.UINT8, np.uint8, "Add"),
        ("bool", TensorProto.BOOL, np.bool_, "Not"),
    ]
    nodes, ins, outs, inputs = [], [], [], {}
    for name, proto, npt, op in kinds:
        i, o = f"in_{name}", f"out_{name}"
        nodes.append(helper.make_node(op, [i, i] if op == "Add" else [i], [o]))
        ins.append(helper.make_tensor_value_info(i, proto, [2, 3]))
        outs.append(helper.make_tensor_value_info(o, proto, [2, 3]))
        if npt == np.bool_:
            inputs[i] = rng.integers(0, 2, (2, 3)).astype(np.bool_)
        elif np.issubdtype(npt, np.integer):
            inputs[i] = rng.integers(0, 100, (2, 3)).astype(npt)
        else:
            inputs[i] = rng.standard_normal((2, 3)).astype(npt)
    graph = helper.make_graph(nodes, "dtypes", ins, outs)
    return graph, inputs


def save(name, graph, inputs):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="outpost make-test-models.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(ROOT, "models", f"{name}.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(model, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    outputs = sess.run(None, inputs)
    ref = os.path.join(ROOT, "reference", name)
    for sub in ("inputs", "outputs"):
        os.makedirs(os.path.join(ref, sub), exist_ok=True)
    for k, v in inputs.items():
        np.save(os.path.join(ref, "inputs", f"{k}.npy"), v)
    for i, v in enumerate(outputs):  # by position: output names may hold '/'
        np.save(os.path.join(ref, "outputs", f"{i}.npy"), v)
    print(f"{name}: {os.path.getsize(path)} bytes, outputs {[o.name for o in sess.get_outputs()]}")


def main():
    rng = np.random.default_rng(SEED)
    for name, make in (("mlp", mlp), ("cnn", cnn), ("dtypes", dtypes)):
        graph, inputs = make(rng)
        save(name, graph, inputs)
    # Same interface as mlp, other weights, same input: the hot-reload test tells them apart.
    graph, _ = mlp(rng)
    save("mlp_v2", graph, {"sensor": np.load(os.path.join(ROOT, "reference", "mlp", "inputs", "sensor.npy"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
