#!/usr/bin/env bash
# One-command accelerator check (issue #20): jaxlm on the device machine's own CUDA JAX.
#
#   bash tools/device_check.sh --fetch-wheels .device_wheels   # here (online): wheels the device lacks
#   bash tools/device_check.sh                                 # there: install check + tools/bench_gpu.py
#   bash tools/device_check.sh --dry-run                       # here, on CPU: tiny preset, local .venv
#
# On the device (the `device` tool): run(command="bash tools/device_check.sh", carry=[".device_wheels"]);
# results land in $OUT (device_check.json, device_check.md, device_check.log). The device has no
# registry: jax/flax/optax/orbax come from its image (not reinstalled); the wheels carried in
# .device_wheels (ignore it in .git/info/exclude) add what jaxlm needs beyond them.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(grain==0.2.18 array-record==0.8.6 tensorboardX==2.6.5 dm-tree more-itertools datasketch==2.0.0)
OUT="${OUT:-runs/device_check}"
mode="${1:-}"

case "$mode" in
  --fetch-wheels)
    dir="${2:?--fetch-wheels DIR}"
    # The device's python is 3.12 on x86-64 (KINDS.md); no dependencies: the image has them.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$dir" "${WHEELS[@]}"
    du -sh "$dir"
    exit 0 ;;
  --dry-run)
    mkdir -p "$OUT"
    JAX_PLATFORMS=cpu .venv/bin/python tools/bench_gpu.py --dry-run --out "$OUT" --steps 3 --repeats 2 2>&1 | tee "$OUT/device_check.log"
    exit 0 ;;
  "") ;;
  *) echo "device_check.sh: error: unknown option $mode (expected --fetch-wheels DIR, --dry-run or nothing)" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c 'import sys, jax, flax, optax; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
if [ -d .device_wheels ]; then
  "$PY" -m pip install --quiet --no-index --no-deps .device_wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # jaxlm from this tree; no build step offline
"$PY" -c 'import grain, array_record, jaxlm.data.pipeline; print("jaxlm data stack imports")' || echo "data stack not importable (carry .device_wheels)"
# jaxlm against this jax version: the model and decode tests (on the CPU backend, as in CI).
JAX_PLATFORMS=cpu timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_model.py tests/test_decode.py 2>&1 | tail -3 || echo "tests failed or timed out"
timeout 330 "$PY" tools/bench_gpu.py --out "$OUT" --budget-s 270
