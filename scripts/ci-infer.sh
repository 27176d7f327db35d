#!/usr/bin/env bash
# What CI runs for outpost-infer (module/). Needs Debian's and PyPI's networks for the setup.
# With CI=true, tests whose parts are missing (Mosquitto, the PyPI models) fail instead of
# skipping. Share CARGO_TARGET_DIR with the rest of the workspace's CI to build tract once.
#
#   scripts/ci-infer.sh [--no-setup] [--image]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
setup=1; image=0
for a in "$@"; do
  case "$a" in
    --no-setup) setup=0 ;;
    --image) image=1 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
if [[ $setup == 1 ]]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto
  pip install -q onnx==1.22.0 onnxruntime numpy
  scripts/fetch-pypi-models.sh
fi
export CI=true
cargo fmt -p outpost-module --check
cargo clippy --locked -p outpost-module --all-targets -- -D warnings
cargo test --locked -p outpost-module
if [[ $image == 1 ]]; then
  scripts/build-infer-image.sh --verify
fi
