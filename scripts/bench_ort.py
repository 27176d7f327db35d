#!/usr/bin/env python3
"""onnxruntime's side of the latency benchmark: load-to-ready time and median latency of one
model, at one and at two intra-op threads, on seeded random inputs of the
given shapes (the same values as `outpost-infer bench` does not matter: latency does not
depend on values for these models). Prints one JSON line.

  python3 scripts/bench_ort.py --model M.onnx [--shape NAME=1,3,48,192] [--iterations 200]
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort

NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
      "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
      "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def measure(model, shapes, threads, iterations, warmup):
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(1)
    feeds = {}
    for i in sess.get_inputs():
        shape = shapes.get(i.name) or [d if isinstance(d, int) else 1 for d in i.shape]
        dt = NP[i.type]
        if np.issubdtype(dt, np.floating):
            feeds[i.name] = rng.uniform(-1, 1, shape).astype(dt)
        elif dt == np.bool_:
            feeds[i.name] = rng.integers(0, 2, shape).astype(dt)
        else:
            feeds[i.name] = rng.integers(0, 100, shape).astype(dt)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return {"threads": threads or "default", "load_ms": load_ms, "median_ms": statistics.median(times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    a = ap.parse_args()
    shapes = {}
    for s in a.shape:
        n, d = s.split("=")
        shapes[n] = [int(x) for x in d.split(",")]
    print(json.dumps({"model": a.model, "ort": ort.__version__,
                      "one_thread": measure(a.model, shapes, 1, a.iterations, a.warmup),
                      "two_threads": measure(a.model, shapes, 2, a.iterations, a.warmup)}))


if __name__ == "__main__":
    main()
