#!/usr/bin/env bash
# Build the outpost-infer image FROM scratch with the static binary, tag it locally, and
# (with --verify) prove it runs: start it with a test model mounted, check readiness and one
# inference over a published loopback port, stop it with SIGTERM and check a clean exit.
#
#   scripts/build-infer-image.sh [--verify] [--no-build]
# Env: CARGO_TARGET_DIR (default ./target), TAG (default outpost-infer:0.1.0)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tag="${TAG:-outpost-infer:0.1.0}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
verify=0; build=1
for a in "$@"; do
  case "$a" in
    --verify) verify=1 ;;
    --no-build) build=0 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done

if [[ $build == 1 ]]; then
  (cd "$root" && RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p outpost-module)
fi
bin="$target_dir/x86_64-unknown-linux-gnu/release/outpost-infer"
file "$bin" 2>/dev/null | grep -q "static" || ldd "$bin" 2>&1 | grep -q "not a dynamic\|statically linked" \
  || { echo "$bin is not statically linked" >&2; exit 1; }

ctx="$(mktemp -d)"; trap 'rm -rf "$ctx"' EXIT
# Symbols are no use on the device: strip them (the release profile keeps them for profiling).
strip -o "$ctx/outpost-infer" "$bin"
docker build -q -t "$tag" -f "$root/module/Dockerfile" "$ctx"
echo "built $tag: $(docker image inspect -f '{{.Size}}' "$tag") bytes"
[[ $verify == 1 ]] || exit 0

models="$(mktemp -d)"; trap 'rm -rf "$ctx" "$models"; docker rm -f "${cid:-}" >/dev/null 2>&1 || true' EXIT
cp "$root/module/testdata/models/mlp.onnx" "$models/model.onnx"
chmod 755 "$models"; chmod 644 "$models/model.onnx"
cid="$(docker run -d -p 127.0.0.1::8000 -v "$models:/models:ro" -e OUTPOST_MODEL_NAME=anomaly "$tag")"
port="$(docker port "$cid" 8000/tcp | head -1 | sed 's/.*://')"
[[ "$(docker inspect -f '{{.Config.User}}' "$cid")" == "65532:65532" ]] || { echo "not running as 65532" >&2; exit 1; }
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port/v2/health/ready" || { docker logs "$cid"; echo "image not ready" >&2; exit 1; }
echo
body='{"inputs":[{"name":"sensor","shape":[1,16],"datatype":"FP32","data":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}]}'
curl -sf -X POST -H 'content-type: application/json' -d "$body" "http://127.0.0.1:$port/v2/models/anomaly/infer" \
  | grep -q '"name":"score"' || { docker logs "$cid"; echo "inference failed" >&2; exit 1; }
start=$(date +%s.%N)
docker stop -t 10 "$cid" >/dev/null
code="$(docker inspect -f '{{.State.ExitCode}}' "$cid")"
took="$(python3 -c "print(f'{$(date +%s.%N) - $start:.2f}')")"
[[ "$code" == 0 ]] || { docker logs "$cid"; echo "exit code $code after SIGTERM" >&2; exit 1; }
echo "verified $tag: ready and answering on 127.0.0.1:$port as uid 65532; SIGTERM -> exit 0 in ${took}s"
