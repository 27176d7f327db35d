#!/usr/bin/env python3
"""onnxruntime's time per operator type, to set beside `outpost-infer bench --profile`
(benchmark tooling only). One intra-op thread, seeded random inputs of the given shapes.

  python3 scripts/ort_profile.py --model M.onnx [--shape NAME=1,3,48,192] [--runs 100]

Prints the share of node time per operator type (onnxruntime's fused kernels under their
fused names), slowest first.
"""
import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort

NP = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--runs", type=int, default=100)
    a = ap.parse_args()
    shapes = {n: [int(x) for x in d.split(",")] for n, d in (s.split("=") for s in a.shape)}
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        feeds = {}
        for i in sess.get_inputs():
            shape = shapes.get(i.name) or [d if isinstance(d, int) else 1 for d in i.shape]
            dt = NP[i.type]
            feeds[i.name] = (rng.uniform(-1, 1, shape) if dt == np.float32
                             else rng.integers(0, 100, shape)).astype(dt)
        for _ in range(a.runs):
            sess.run(None, feeds)
        events = json.load(open(sess.end_profiling()))
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    for op, us in per_op.most_common(10):
        print(f"{100 * us / total:5.1f}% {us / a.runs / 1000:8.3f} ms  {op}")


if __name__ == "__main__":
    main()
