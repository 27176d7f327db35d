#!/usr/bin/env bash
# outpost-infer against onnxruntime, in the same run on the same machine:
#  1. median latency and load-to-ready per test model: tract and onnxruntime at 1 and at 2
#     threads, run one after the other per model (interleaved), and tract without our own
#     kernels (OUTPOST_TRACT_KERNELS_ONLY) to show what they change;
#  2. HTTP throughput of POST /v2/models/{name}/infer under concurrent load (hey) against
#     scripts/ort_http_server.py on the same model, traffic on 127.0.0.1 only.
#
# Needs: the release binary (static build, as shipped), python3 with onnxruntime and numpy,
# `hey` (apt-get install -y hey), and scripts/fetch-pypi-models.sh run for the PyPI models.
#
#   scripts/bench-infer.sh [path/to/outpost-infer]      # results also in $OUT (default /tmp)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-gnu/release/outpost-infer}"
out="${OUT:-/tmp/outpost-infer-bench}"
iters="${ITERATIONS:-300}"
duration="${HTTP_SECONDS:-10}"
conc="${HTTP_CONCURRENCY:-16}"
mkdir -p "$out"
[[ -x "$bin" ]] || { echo "no binary at $bin (build it first, see docs/benchmarks.md)" >&2; exit 2; }
td="$root/module/testdata"

echo "# machine"; nproc; lscpu | head -20 | grep -E "Model name|^CPU\(s\)|Thread|MHz|Flags" | cut -c1-120 || true
echo "# $("$bin" --version); onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)')"

# name | model path | declared shape (NAME=DIMS, or empty) | run shape (symbolic dims)
models=(
  "mlp|$td/models/mlp.onnx|sensor=1,16|"
  "mlp (symbolic batch)|$td/models/mlp.onnx||"
  "cnn|$td/models/cnn.onnx||"
  "magika (symbolic batch, no flags)|$td/pypi/magika.onnx||bytes=1,2048"
  "magika, batch 4|$td/pypi/magika.onnx||bytes=4,2048"
  "ppocr_cls (symbolic, no flags)|$td/pypi/ppocr_cls.onnx||x=1,3,48,192"
)

echo
echo "## latency (median ms over $iters runs, interleaved per model; ratio = tract / onnxruntime, same threads)"
echo "| model | tract 1 thr | ort 1 thr | ratio 1 thr | tract 2 thr | ort 2 thr | ratio 2 thr | tract, tract's kernels only | tract load ms | ort load ms |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for spec in "${models[@]}"; do
  IFS='|' read -r name path shape run <<<"$spec"
  [[ -f "$path" ]] || { echo "| $name | (missing: run scripts/fetch-pypi-models.sh) |"; continue; }
  sargs=(); pargs=(); rargs=()
  [[ -n "$shape" ]] && sargs=(--input-shape "$shape") && pargs=(--shape "$shape")
  [[ -n "$run" ]] && rargs=(--run-shape "$run") && pargs=(--shape "$run")
  t1="$("$bin" bench --model "$path" "${sargs[@]}" "${rargs[@]}" --threads 1 --iterations "$iters" 2>/dev/null)"
  ort="$(python3 "$root/scripts/bench_ort.py" --model "$path" "${pargs[@]}" --iterations "$iters")"
  t2="$("$bin" bench --model "$path" "${sargs[@]}" "${rargs[@]}" --threads 2 --iterations "$iters" 2>/dev/null)"
  t0="$(OUTPOST_TRACT_KERNELS_ONLY=1 "$bin" bench --model "$path" "${sargs[@]}" "${rargs[@]}" --threads 1 --iterations "$iters" 2>/dev/null)"
  echo "{\"name\": \"$name\", \"tract1\": $t1, \"tract2\": $t2, \"tract_only\": $t0, \"ort\": $ort}" >>"$out/latency.jsonl"
  python3 - "$name" "$t1" "$t2" "$t0" "$ort" <<'PY'
import json, sys
name, t1, t2, t0, o = sys.argv[1], *map(json.loads, sys.argv[2:])
a, b, z = t1["median_ms"], t2["median_ms"], t0["median_ms"]
o1, o2 = o["one_thread"]["median_ms"], o["two_threads"]["median_ms"]
print(f"| {name} | {a:.4f} | {o1:.4f} | **{a / o1:.2f}x** | {b:.4f} | {o2:.4f} | {b / o2:.2f}x | {z:.4f} "
      f"| {t1['load_ms']:.0f} | {o['one_thread']['load_ms']:.0f} |")
PY
done

command -v hey >/dev/null || { echo "hey not installed: skipping HTTP throughput" >&2; exit 0; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 200); do curl -sf "http://127.0.0.1:$1/v2/health/ready" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
body_for() { # model name -> a one-sample OIP request body
  python3 - "$1" "$td" <<'PY'
import json, sys
import numpy as np
name, td = sys.argv[1:]
shapes = {"mlp": ("sensor", [1, 16], "FP32"), "cnn": ("image", [1, 3, 64, 64], "FP32")}
n, shape, dt = shapes[name]
x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
print(json.dumps({"inputs": [{"name": n, "shape": shape, "datatype": dt, "data": x.ravel().tolist()}]}))
PY
}
rps() { hey -z "${duration}s" -c "$conc" -m POST -T application/json -D "$2" "$1" | tee -a "$out/hey.txt" | awk '/Requests\/sec/ {print $2}'; }

echo
echo "## HTTP throughput (POST /v2/models/{name}/infer, hey -z ${duration}s -c $conc, requests/s)"
echo "| model | outpost-infer | onnxruntime + ThreadingHTTPServer | ratio |"
echo "|---|---|---|---|"
for m in mlp cnn; do
  shape=""; [[ $m == mlp ]] && shape="sensor=1,16"
  body="$out/$m.json"; body_for "$m" >"$body"
  p1="$(free_port)"
  "$bin" serve --model "$td/models/$m.onnx" --name "$m" --listen "127.0.0.1:$p1" --reload-interval-ms 0 \
    ${shape:+--input-shape "$shape"} 2>"$out/serve-$m.log" &
  pid1=$!
  wait_ready "$p1"
  ours="$(rps "http://127.0.0.1:$p1/v2/models/$m/infer" "$body")"
  kill "$pid1"; wait "$pid1" || true
  p2="$(free_port)"
  python3 "$root/scripts/ort_http_server.py" --model "$td/models/$m.onnx" --name "$m" --port "$p2" --threads 1 &
  pid2=$!
  wait_ready "$p2"
  theirs="$(rps "http://127.0.0.1:$p2/v2/models/$m/infer" "$body")"
  kill "$pid2"; wait "$pid2" 2>/dev/null || true
  python3 -c "print(f'| $m | {float(\"$ours\"):.0f} | {float(\"$theirs\"):.0f} | {float(\"$ours\")/float(\"$theirs\"):.1f}x |')"
done
