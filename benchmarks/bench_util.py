"""Pieces shared by the benchmark scripts; imports neither JAX nor TensorFlow."""

import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = 'benchmarks/.peer-venv/bin/python'  # Made by benchmarks/setup_peer.sh.


def pin_to_first_cores(num_cores: int) -> None:
  """Restricts this process, and the children it starts, to its first num_cores cores.

  Call it before TensorFlow or XLA start: their thread pools size to the visible cores.
  """
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:num_cores])


def cpu_model() -> str:
  with open('/proc/cpuinfo') as f:
    return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                platform.processor() or 'unknown')


def median(xs):
  xs = sorted(xs)
  mid = len(xs) // 2
  return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def peer_python(path: str) -> str | None:
  """The PyTorch peer venv's python as an absolute path; None for '' (peer not wanted).

  Raises FileNotFoundError, saying how to make the venv, when it is absent.
  """
  if not path:
    return None
  path = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is absent (run bash benchmarks/setup_peer.sh)')
  return path
