#!/usr/bin/env bash
# GPU check in one command (issue #20): jaxlm on the device machine's own CUDA JAX, then
# tools/bench_gpu.py (bf16 training MFU of gpu-150m and olmo-1b, decode tokens/s with and
# without ITI, peak memory), all inside DEVICE_CHECK_BUDGET_S (default 460 s, under 8 minutes).
#
#   bash tools/device_check.sh --fetch-wheels [DIR]   # here (PyPI): the wheels the device lacks, into
#                                                     # DIR (default .device_wheels, git-ignored locally)
#   bash tools/device_check.sh [BENCH_GPU_OPTIONS]    # on the device machine, from the repo root
#   bash tools/device_check.sh --dry-run [OPTIONS]    # here, on CPU: tiny preset, small shapes, .venv
#
# The device tool call (the wheel folder must be named in carry: it is ignored, so it travels
# only that way):
#   run(command="bash tools/device_check.sh", carry=[".device_wheels"], timeout_s=540)
# Results: $OUT/device_check.md (tables), $OUT/device_check.json (everything), $OUT/device_check.log.
#
# What happens on the device: print nvidia-smi, python and the image's jax/flax/optax/orbax;
# install the carried wheels with --no-deps into /tmp/site (PYTHONPATH; the image's jax and its
# CUDA plugin are never touched: no wheel of jax is carried) and jaxlm itself with
# `pip install --no-deps --no-build-isolation -e .` (and the tree on PYTHONPATH, should that
# fail offline); then tools/bench_gpu.py, whose first job imports every jaxlm module the
# benchmarks and `jaxlm train` need, prints the versions against pyproject.toml's pins, runs a
# tiny forward against the CPU, and whose second trains the tiny preset with `jaxlm train`
# (grain, ArrayRecord, orbax, tensorboardX) and resumes it; finally, with the time left,
# tests/test_model.py and tests/test_decode.py on the image's jax (CPU backend, as CI runs them).
# Options after the mode go to tools/bench_gpu.py (e.g. --presets gpu-150m --remat olmo-1b=block);
# a bad one is one line and exit 2 before anything is installed.
#
# Environment: PYTHON (default python3 there; .venv/bin/python for --dry-run), OUT (default
# runs/device_check), DEVICE_CHECK_WHEELS (default .device_wheels), DEVICE_CHECK_BUDGET_S (460),
# DEVICE_CHECK_TESTS=0 skips the tests (=1 runs them in a dry run too, ~2.5 min on 2 cores),
# DEVICE_CHECK_DRY_RUN=1 is --dry-run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO="$PWD"
say() { printf '[device_check %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { echo "device_check.sh: error: $*" >&2; exit 2; }

# The wheels the device image lacks (its image, as last listed, has: jax, flax, optax, orbax-checkpoint,
# numpy, scipy, scikit-learn, tokenizers, safetensors, pyyaml, tqdm, matplotlib, etils, absl-py,
# cloudpickle, protobuf, psutil, joblib, pybind11 ...). Versions: pyproject.toml's pins; portpicker
# is grain's (unpinned) import. Not carried: tensorflow-datasets (imported only for TFDS sources;
# its dependency tree is large) and the test/harness extras.
WHEELS_PINNED=(grain array-record tensorboardX datasketch fasttext-numpy2 alt-profanity-check)
WHEELS_EXTRA=(portpicker==1.6.0)
WHEEL_LIMIT_MIB=48

pin_of() {  # pin_of NAME -> NAME==VERSION from pyproject.toml
  local spec
  spec=$(grep -oiE "\"$1==[^\";]+\"" pyproject.toml | head -1 | tr -d '"')
  [ -n "$spec" ] || die "pyproject.toml pins no version of $1"
  echo "$spec"
}

fetch_wheels() {
  local dir="$1" py="${PYTHON:-}"
  [ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python || py=python3; }
  local inside=1
  case "$dir" in /*|../*) inside=0;; esac
  local specs=() name
  for name in "${WHEELS_PINNED[@]}"; do specs+=("$(pin_of "$name")"); done
  specs+=("${WHEELS_EXTRA[@]}")
  mkdir -p "$dir" || die "cannot create $dir"
  say "downloading ${specs[*]} for CPython 3.12 x86-64 into $dir"
  # The device's python is 3.12 on x86-64; --no-deps: every needed dependency is named.
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dir" "${specs[@]}" || die "pip download failed"
  # One version of each package (two stop the install there).
  local dupes
  dupes=$(ls "$dir"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_' 'a-z-' | sort | uniq -d)
  [ -z "$dupes" ] || die "$dir holds several versions of: $dupes (empty it and fetch again)"
  local kib
  kib=$(du -sk "$dir" | cut -f1)
  ls -l "$dir"/*.whl | awk '{printf "  %7.1f MiB  %s\n", $5 / 1048576, $NF}'
  say "total $((kib / 1024)) MiB ($kib KiB) in $(ls "$dir"/*.whl | wc -l) wheels; the device carries at most 64 MiB of tree"
  [ "$kib" -le $((WHEEL_LIMIT_MIB * 1024)) ] || die "$dir is over $WHEEL_LIMIT_MIB MiB"
  if [ $inside = 0 ]; then
    say "note: $dir is outside the repository: only a folder inside it can be carried (e.g. .device_wheels)"
    return 0
  fi
  # Ignored here (so it is never committed and travels only through carry).
  if ! git check-ignore -q "$dir/x.whl" 2>/dev/null; then
    local exclude
    exclude=$(git rev-parse --git-path info/exclude) || die "not a git checkout: ignore $dir yourself"
    mkdir -p "$(dirname "$exclude")" && echo "/${dir%/}/" >>"$exclude"
    say "added /${dir%/}/ to $exclude"
  fi
  say "carry it: run(command=\"bash tools/device_check.sh\", carry=[\"${dir%/}\"], timeout_s=540)"
}

mode=device
case "${1:-}" in
  --fetch-wheels) fetch_wheels "${2:-.device_wheels}"; exit $? ;;
  --dry-run) mode=dry; shift ;;
  -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
[ "${DEVICE_CHECK_DRY_RUN:-0}" != 0 ] && mode=dry

START=$SECONDS
BUDGET="${DEVICE_CHECK_BUDGET_S:-460}"
[[ "$BUDGET" =~ ^[0-9]+$ ]] && [ "$BUDGET" -ge 120 ] || die "DEVICE_CHECK_BUDGET_S: expected whole seconds >= 120, got $BUDGET"
WHEEL_DIR="${DEVICE_CHECK_WHEELS:-.device_wheels}"
OUT="${OUT:-$REPO/runs/device_check}"
if [ "$mode" = dry ]; then PY="${PYTHON:-$REPO/.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
command -v "$PY" >/dev/null || die "no python at $PY (set PYTHON)"
left() { echo $((BUDGET - (SECONDS - START))); }

# Arguments first: a bad one costs nothing (jaxlm.config needs only pyyaml, which the image has).
bench_args=("$@")
[ "$mode" = dry ] && bench_args=(--dry-run "${bench_args[@]}")
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" tools/bench_gpu.py --validate --out "$OUT" "${bench_args[@]}" >/dev/null || exit 2

mkdir -p "$OUT" || die "cannot create OUT=$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # the log is whole when the command returns
say "mode $mode; budget ${BUDGET} s; out $OUT; python $PY"
if [ "$mode" = device ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || say "nvidia-smi failed"
fi
"$PY" - <<'EOF' || say "the image's jax stack did not import"
import importlib.metadata as md, sys
def v(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print("python", sys.version.split()[0], sys.executable)
print(" ".join(f"{n} {v(n)}" for n in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
                                         "orbax-checkpoint", "numpy", "grain", "array-record")))
EOF

if [ "$mode" = device ]; then
  if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    say "installing $(ls "$WHEEL_DIR"/*.whl | wc -l) carried wheels into /tmp/site (--no-deps)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
      || say "wheel install FAILED: grain/array-record imports will fail"
  else
    say "no wheels in $WHEEL_DIR (fetch them here with --fetch-wheels and name the folder in carry): the data stack will not import"
  fi
  if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/jaxlm-install.log 2>&1; then
    say "jaxlm installed (editable, --no-deps)"
  else
    say "pip install -e . failed ($(tail -1 /tmp/jaxlm-install.log)); using the tree on PYTHONPATH"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# The benchmarks get the budget less what the tests keep back (they take what the benchmarks leave).
if [ "$mode" = device ]; then RUN_TESTS="${DEVICE_CHECK_TESTS:-1}"; else RUN_TESTS="${DEVICE_CHECK_TESTS:-0}"; fi
tests_reserve=0
[ "$RUN_TESTS" != 0 ] && tests_reserve=45
bench_budget=$(( $(left) - tests_reserve - 10 ))
say "tools/bench_gpu.py with a ${bench_budget} s budget"
timeout -k 5 $((bench_budget + 30)) "$PY" tools/bench_gpu.py --out "$OUT" --budget-s "$bench_budget" "${bench_args[@]}"
bench_rc=$?
[ $bench_rc -eq 124 ] && say "tools/bench_gpu.py overran its budget and was stopped"

tests_rc=skipped
if [ "$RUN_TESTS" != 0 ]; then
  t=$(( $(left) - 5 ))
  if [ "$t" -ge 45 ]; then
    say "tests/test_model.py tests/test_decode.py on this jax (CPU backend), ${t} s at most"
    xdist=(); "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 8)  # pytest-xdist is in the image
    JAX_PLATFORMS=cpu timeout -k 5 "$t" "$PY" -m pytest -q -x -p no:cacheprovider "${xdist[@]}" tests/test_model.py tests/test_decode.py 2>&1 | tail -15
    tests_rc=${PIPESTATUS[0]}
    [ "$tests_rc" = 124 ] && say "tests stopped at the time budget (not a failure of their own)"
  else
    say "tests skipped: ${t} s left"
  fi
fi
say "done in $((SECONDS - START)) s: bench_gpu exit $bench_rc, tests $tests_rc; results in $OUT (device_check.md, device_check.json, device_check.log)"
exit $bench_rc
