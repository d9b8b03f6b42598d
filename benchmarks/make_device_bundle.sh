#!/usr/bin/env bash
# Builds benchmarks/device_bundle/, the extra files benchmarks/device_check.sh needs on a bare
# accelerator host (no network, no TensorFlow, no ml-collections; see benchmarks/README.md):
#   wheels/        ml-collections, pure Python (`pip download --no-deps`; its dependencies
#                  absl-py and PyYAML come with flax on such hosts)
#   fashion-mnist/ the four Fashion-MNIST IDX .gz files (30 MB), from $FASHION_MNIST_DIR
# The folder is git-ignored; it travels as a carried path (at most 64 MiB).
#
#   bash benchmarks/make_device_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bundle="${DEVICE_BUNDLE:-benchmarks/device_bundle}"
source_dir="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
python="${PYTHON:-.venv/bin/python}"

mkdir -p "$bundle/wheels" "$bundle/fashion-mnist"
"$python" -m pip download -q --no-deps --only-binary=:all: --dest "$bundle/wheels" \
    "ml-collections==1.1.0"
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
            t10k-labels-idx1-ubyte; do
  cp "$source_dir/$name.gz" "$bundle/fashion-mnist/"
done
rm -rf "$bundle/site"  # Installed on the host by device_check.sh; never carried.
du -sh "$bundle"
ls -l "$bundle"/wheels "$bundle"/fashion-mnist
