#!/usr/bin/env bash
# Builds benchmarks/.peer-venv, the PyTorch peer's venv (not the project's .venv).
#
#   bash benchmarks/setup_peer.sh          # torch + torchvision + lightly (requirements-peer.txt)
#   bash benchmarks/setup_peer.sh --cpu    # torch 2.13.0 only (CPU build where one is served;
#                                          # the peer then uses its own NT-Xent, no torchvision)
#
# PYTHON=python3.11 picks the interpreter (default python3; the torch wheels need 3.11 here).
# Then: python benchmarks/benchmark.py --peer_python=benchmarks/.peer-venv/bin/python
set -euo pipefail
cd "$(dirname "$0")"
venv=.peer-venv
python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info[:2] >= (3, 10), sys.version' \
  || { echo "need Python >= 3.10 (3.11 recommended); set PYTHON=" >&2; exit 1; }
rm -rf "$venv"
"$python" -m venv "$venv"
echo '*' > "$venv/.gitignore"  # Keep the venv out of git without touching the root .gitignore.
if [[ "${1:-}" == "--cpu" ]]; then
  "$venv/bin/pip" install -q torch==2.13.0 numpy
else
  "$venv/bin/pip" install -q -r requirements-peer.txt
fi
"$venv/bin/python" - <<'PY'
import torch
print('peer venv ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())
try:
  from lightly.loss import NTXentLoss  # noqa: F401
  print('lightly NTXentLoss: available')
except ImportError as e:
  print('lightly NTXentLoss: not available (%s); torch_peer.py uses its own NT-Xent' % e)
PY
