#!/usr/bin/env bash
# Fetch real small ONNX models that ship inside Apache-2.0 wheels on PyPI, and compute their
# onnxruntime references, into module/testdata/pypi/ (gitignored: the files are several MB).
#
#   magika 1.0.3                standard_v3_3/model.onnx   bytes int32 [1, 2048] -> file type
#   rapidocr-onnxruntime 1.4.4  ch_ppocr_mobile_v2.0_cls_infer.onnx  text-direction classifier
#
# Needs: pip (network to PyPI), python3 with onnxruntime and numpy. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/module/testdata/pypi"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"

fetch() { # package==version, path inside the wheel (glob), output name
  local spec="$1" inner="$2" out="$3"
  if [[ -f "$dest/$out.onnx" ]]; then echo "have $out"; return; fi
  pip download --quiet --no-deps --only-binary=:all: -d "$work/$out" "$spec"
  local wheel; wheel="$(ls "$work/$out"/*.whl)"
  python3 - "$wheel" "$inner" "$dest/$out.onnx" <<'PY'
import fnmatch, sys, zipfile
wheel, pattern, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
    if len(names) != 1:
        sys.exit(f"{pattern}: expected one match in {wheel}, found {names}")
    open(out, "wb").write(z.read(names[0]))
    print(f"{names[0]} -> {out}")
PY
}

fetch "magika==1.0.3" "*standard_v3_3/model.onnx" magika
fetch "rapidocr-onnxruntime==1.4.4" "*ch_ppocr_mobile_v2.0_cls_infer.onnx" ppocr_cls

# References: fixed-seed inputs at fixed shapes, outputs from onnxruntime on one thread.
python3 - "$dest" <<'PY'
import os, sys
import numpy as np, onnxruntime as ort
dest = sys.argv[1]
rng = np.random.default_rng(20261127)
# name -> (model file, input maker); `_b4` cases use the symbolic batch dimension.
cases = {
    "magika": ("magika", lambda: rng.integers(0, 257, (1, 2048)).astype(np.int32)),
    "ppocr_cls": ("ppocr_cls", lambda: rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)),
    "magika_b4": ("magika", lambda: rng.integers(0, 257, (4, 2048)).astype(np.int32)),
    "ppocr_cls_b4": ("ppocr_cls", lambda: rng.uniform(-1, 1, (4, 3, 48, 192)).astype(np.float32)),
}
for case, (name, make) in cases.items():
    ref = os.path.join(dest, "reference", case)
    if os.path.isdir(ref):
        continue
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(dest, f"{name}.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    x = make()
    outs = sess.run(None, {inp.name: x})
    os.makedirs(os.path.join(ref, "inputs")); os.makedirs(os.path.join(ref, "outputs"))
    np.save(os.path.join(ref, "inputs", f"{inp.name}.npy"), x)
    for i, v in enumerate(outs):
        np.save(os.path.join(ref, "outputs", f"{i}.npy"), v)
    print(name, inp.name, inp.shape, inp.type, "->", [(o.name, o.shape) for o in sess.get_outputs()])
PY
