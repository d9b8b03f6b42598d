#!/usr/bin/env bash
# One prepared accelerator check (benchmarks/device_check.py; see benchmarks/README.md).
#
#   bash benchmarks/device_check.sh [--dry_run] [device_check.py flags]
#
# Runs with `python3` from PATH, from the repository root. Python packages the host lacks
# (ml-collections) come as wheels in $DEVICE_BUNDLE/wheels (benchmarks/make_device_bundle.sh),
# installed with pip --no-index --target into $DEVICE_BUNDLE/site. Results: $OUT/device_check.json
# and $OUT/device_check.md (OUT defaults to ./device_check_out); Fashion-MNIST's IDX files are
# read from $FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-./device_check_out}"
export FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# JAX takes half the accelerator's memory, so that the PyTorch peer (a child process) fits too.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
bundle="${DEVICE_BUNDLE:-benchmarks/device_bundle}"
mkdir -p "$OUT"

if ! python3 -c 'import ml_collections' 2>/dev/null; then
  if ! compgen -G "$bundle/wheels/*.whl" >/dev/null; then
    echo "device_check: python3 lacks ml_collections and $bundle/wheels has no wheels;" \
         "run bash benchmarks/make_device_bundle.sh first." >&2
    exit 2
  fi
  site="$(cd "$bundle" && pwd)/site"
  if ! python3 -m pip install -q --no-index --no-deps --upgrade --target "$site" \
      "$bundle"/wheels/*.whl; then
    for wheel in "$bundle"/wheels/*.whl; do  # No pip: a pure-Python wheel is a zip of the tree.
      python3 -m zipfile -e "$wheel" "$site"
    done
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

python3 benchmarks/device_check.py "$@" 2>&1 | tee "$OUT/device_check.log"
