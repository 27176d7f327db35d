"""Drives a running outpost-infer with Triton's own HTTP client, the way its users do.

    python3 tritonclient_check.py URL MODEL_NAME MODEL.onnx BATCH [BATCH ...]

Uses `tritonclient.http` with its defaults (inputs sent with the binary tensor data extension,
outputs asked for in binary), then JSON inputs and outputs, then a gzip-compressed request, for
each batch size; compares every output with onnxruntime on one thread (the module tests'
tolerance: |got - want| <= 1e-5 + 1e-4 * |want|). Also calls the other endpoints the client
offers. Prints one JSON line with what it checked; exits 1 on the first mismatch.
Test tooling only (onnxruntime gives the references), never part of the product.
"""
import json
import sys

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, name, model_path, *batches = sys.argv[1:]
batches = [int(b) for b in batches]

opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
(inp,) = sess.get_inputs()
outs = [o.name for o in sess.get_outputs()]
rng = np.random.default_rng(20261129)


def sample(batch):
    # Fixed dims from the model, symbolic ones: the batch, then the sizes the tests use.
    fill = {"magika": [2048], "ppocr_cls": [3, 48, 192]}
    rest = [d if isinstance(d, int) and d > 0 else None for d in inp.shape[1:]]
    dims = [batch] + [r if r is not None else f for r, f in zip(rest, fill.get(name, rest))]
    if inp.type == "tensor(int32)":
        return rng.integers(0, 257, dims).astype(np.int32)
    return rng.uniform(-1, 1, dims).astype(np.float32)


def close(what, got, want):
    if got.shape != want.shape:
        sys.exit(f"{what}: shape {got.shape} != onnxruntime's {want.shape}")
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = 1e-5 + 1e-4 * np.abs(want.astype(np.float64))
    if not np.all(err <= bound):
        sys.exit(f"{what}: max error {err.max()} beyond tolerance")
    return float(err.max())


client = httpclient.InferenceServerClient(url)
assert client.is_server_live() and client.is_server_ready(), "server not live and ready"
assert client.is_model_ready(name), "model not ready"
meta = client.get_server_metadata()
assert "binary_tensor_data" in meta["extensions"], meta
model_meta = client.get_model_metadata(name)
assert model_meta["inputs"][0]["shape"][0] == -1, f"batch not symbolic: {model_meta}"
config = client.get_model_config(name)
assert config["input"][0]["data_type"] == "TYPE_" + model_meta["inputs"][0]["datatype"], config
index = client.get_model_repository_index()
assert index[0]["name"] == name and index[0]["state"] == "READY", index
try:
    client.load_model(name)
    sys.exit("load_model was accepted")
except InferenceServerException as e:
    assert "over HTTP" in str(e), e

report = {"model": name, "checks": []}
for batch in batches:
    x = sample(batch)
    want = sess.run(None, {inp.name: x})
    dt = model_meta["inputs"][0]["datatype"]
    # 1. Defaults: binary input, binary outputs (no outputs named).
    i = httpclient.InferInput(inp.name, list(x.shape), dt)
    i.set_data_from_numpy(x)
    r = client.infer(name, [i])
    errs = [close(f"batch {batch} binary {o}", r.as_numpy(o), w) for o, w in zip(outs, want)]
    # 2. JSON input, JSON output named explicitly.
    j = httpclient.InferInput(inp.name, list(x.shape), dt)
    j.set_data_from_numpy(x, binary_data=False)
    r = client.infer(name, [j], outputs=[httpclient.InferRequestedOutput(outs[0], binary_data=False)])
    errs.append(close(f"batch {batch} json", r.as_numpy(outs[0]), want[0]))
    # 3. Binary input, gzip-compressed request.
    r = client.infer(name, [i], request_compression_algorithm="gzip")
    errs.append(close(f"batch {batch} gzip", r.as_numpy(outs[0]), want[0]))
    report["checks"].append({"batch": batch, "max_error": max(errs)})

stats = client.get_inference_statistics(name)["model_stats"][0]
assert int(stats["inference_stats"]["success"]["count"]) >= 3 * len(batches), stats
report["inference_count"] = int(stats["inference_count"])
print(json.dumps(report))
