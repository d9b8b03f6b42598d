#!/usr/bin/env bash
# Creates .venv (Python >= 3.12) with requirements.txt, and installs the offline
# Fashion-MNIST files (Debian package dataset-fashion-mnist) when apt-get is available.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 \
      "$HOME/.pyenv/versions/3.12.1/bin/python" /root/.pyenv/versions/3.12.1/bin/python \
      "$(command -v pyenv >/dev/null && pyenv root 2>/dev/null)/versions/3.12.1/bin/python" python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  python=$(find_python) || { echo "setup.sh: needs Python >= 3.12 (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
  echo "setup.sh: creating .venv with $python"
  "$python" -m venv .venv
fi
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt \
    > .venv/pip.log 2>&1; then
  cat .venv/pip.log >&2; exit 1
fi

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) ||
    echo "setup.sh: could not install dataset-fashion-mnist; TFDS will download fashion_mnist instead" >&2
fi
echo "setup.sh: ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
