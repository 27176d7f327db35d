#!/usr/bin/env python3
"""Run the ONNX backend node tests shipped in the onnx 1.22.0 wheel through outpost-infer
(tract) and report the pass rate. Not a CI gate: the figure goes into docs/benchmarks.md.

Each case is onnx/backend/test/data/node/<case>/{model.onnx, test_data_set_*/}. Its inputs are
written as .npy, `outpost-infer run` runs the model once per data set, and its outputs are
compared with the expected ones (rtol 1e-3, atol 1e-7: the tolerances of onnx's own backend
test runner). A case passes when every data set passes.

  pip install onnx==1.22.0 numpy
  python3 scripts/onnx-node-conformance.py --bin target/release/outpost-infer [--json out.json]
      [--inputs-as-constants]   # fold the inputs in as initializers, as real models have them
"""
import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import numpy_helper


def load_pb(path):
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def as_constants(model, input_names, in_files, path):
    """The model with its test inputs folded in as initializers: what tract sees in real
    models, where axes, shapes and scales are constants rather than runtime inputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [i for i in m.graph.input if i.name not in input_names]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    for name, f in zip(input_names, in_files):
        m.graph.initializer.append(numpy_helper.from_array(load_pb(f), name))
    onnx.save(m, path)


def run_case(binary, case_dir, work, timeout, constants):
    model_path = os.path.join(case_dir, "model.onnx")
    model = onnx.load(model_path, load_external_data=False)
    init_names = {i.name for i in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in init_names]
    sets = sorted(glob.glob(os.path.join(case_dir, "test_data_set_*")))
    if not sets:
        return "no-data", ""
    for ds in sets:
        in_files = sorted(glob.glob(os.path.join(ds, "input_*.pb")), key=lambda p: int(p.rsplit("_", 1)[1][:-3]))
        out_files = sorted(glob.glob(os.path.join(ds, "output_*.pb")), key=lambda p: int(p.rsplit("_", 1)[1][:-3]))
        if constants:
            if len(in_files) != len(input_names):
                return "unsupported-input", "optional or sequence inputs"
            try:
                model_path = os.path.join(work, "const.onnx")
                as_constants(model, input_names, in_files, model_path)
            except Exception as e:  # sequence / optional inputs are not tensors
                return "unsupported-input", str(e)[:200]
            input_names, in_files = [], []
        args = [binary, "--log-format", "json", "run", "--model", model_path, "--output", os.path.join(work, "out")]
        try:
            for name, f in zip(input_names, in_files):
                a = load_pb(f)
                if a.dtype == object or a.dtype.kind in "USc":
                    return "unsupported-dtype", f"input {name}: {a.dtype}"
                p = os.path.join(work, f"in_{len(args)}.npy")
                np.save(p, a)  # not ascontiguousarray: it turns scalars into 1-d arrays
                args += ["--input", f"{name}={p}"]
        except Exception as e:  # sequence / optional inputs are not tensors
            return "unsupported-input", str(e)[:200]
        if len(in_files) != len(input_names):
            return "unsupported-input", "optional or sequence inputs"
        for old in glob.glob(os.path.join(work, "out", "*.npy")):
            os.remove(old)
        try:
            r = subprocess.run(args, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", ""
        if r.returncode != 0:
            err = r.stderr.decode(errors="replace").strip()
            last = err.splitlines()[-1] if err else ""
            try:  # the binary logs JSON: keep only the error chain
                last = json.loads(last)["fields"]["error"]
            except (ValueError, KeyError, TypeError):
                pass
            kind = "load-failed" if ("not a loadable" in last or "cannot optimize" in last) else "run-failed"
            return kind, last[:400]
        for i, f in enumerate(out_files):
            want = load_pb(f)
            got_path = os.path.join(work, "out", f"{i}.npy")
            if not os.path.exists(got_path):
                return "mismatch", f"output {i} missing"
            got = np.load(got_path)
            if want.dtype == object:
                return "unsupported-dtype", "string output"
            if got.shape != want.shape:
                return "mismatch", f"output {i}: shape {got.shape} != {want.shape}"
            if want.dtype.kind in "fc":
                if not np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-3, atol=1e-7, equal_nan=True):
                    return "mismatch", f"output {i}: values differ"
            elif not np.array_equal(got.astype(want.dtype), want):
                return "mismatch", f"output {i}: values differ"
    return "pass", ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--json", help="write per-case results here")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--filter", default="", help="only cases whose name contains this")
    ap.add_argument("--inputs-as-constants", action="store_true",
                    help="fold each case's inputs into the model as initializers")
    args = ap.parse_args()
    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")
    cases = sorted(d for d in os.listdir(root) if args.filter in d)
    results = {}
    start = time.time()
    with tempfile.TemporaryDirectory() as work:
        for n, case in enumerate(cases):
            try:
                status, detail = run_case(args.bin, os.path.join(root, case), work, args.timeout, args.inputs_as_constants)
            except Exception as e:
                status, detail = "harness-error", str(e)[:200]
            results[case] = {"status": status, "detail": detail}
            if (n + 1) % 100 == 0:
                print(f"{n + 1}/{len(cases)} ...", file=sys.stderr)
    counts = collections.Counter(r["status"] for r in results.values())
    total = len(results)
    mode = "inputs as constants" if args.inputs_as_constants else "inputs at run time"
    print(f"onnx {onnx.__version__} node tests ({mode}): {total} cases in {time.time() - start:.0f} s")
    for k, v in counts.most_common():
        print(f"  {k:18} {v:5}  ({100 * v / total:.1f}%)")
    print(f"pass rate: {counts['pass']}/{total} = {100 * counts['pass'] / total:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"onnx": onnx.__version__, "counts": counts, "cases": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
