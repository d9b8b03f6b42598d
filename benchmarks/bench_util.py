"""Pieces shared by the benchmark scripts; imports neither JAX nor TensorFlow."""

import json
import os
import platform
import subprocess

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


def peer_command(python: str, config, num_classes: int, *, steps: int, warmup: int,
                 windows: int, extra_args=()) -> list:
  """The torch_peer.py command line for the SimCLR step of `config` (an ml_collections config)."""
  m = config.model
  return [python, os.path.join(ROOT, 'benchmarks', 'torch_peer.py'),
          f'--depth={m.depth}', f'--width_multiplier={m.width_multiplier}',
          f'--cifar_stem={int(m.cifar_stem)}', f'--proj_mode={m.proj_mode}',
          f'--proj_num_layers={m.proj_num_layers}', f'--proj_dim={m.proj_dim}',
          f'--num_classes={num_classes}', f'--image_size={config.data.image_size}',
          f'--batch_size={config.batch_size}', f'--dtype={m.dtype}',
          f'--temperature={config.temperature}', f'--weight_decay={config.weight_decay}',
          f'--momentum={config.momentum}', f'--steps={steps}', f'--warmup={warmup}',
          f'--windows={windows}', *extra_args]


def run_peer(python: str, config, num_classes: int, notes: list, *, timeout=None,
             **command_args) -> dict | None:
  """Runs torch_peer.py (peer_command) in a child process; its JSON, or None with a note."""
  command = peer_command(python, config, num_classes, **command_args)
  if config.similarity != 'cosine':
    notes.append(f'PyTorch peer uses cosine similarity; the config has {config.similarity}.')
  try:
    process = subprocess.run(command, capture_output=True, text=True, check=False,
                             timeout=timeout)
  except subprocess.TimeoutExpired:
    notes.append(f'PyTorch peer stopped after its {timeout:.0f} s budget.')
    return None
  if process.returncode:
    notes.append(f'PyTorch peer failed ({process.returncode}): '
                 f'{process.stderr.strip().splitlines()[-1:]}')
    return None
  result = json.loads(process.stdout.strip().splitlines()[-1])
  result['command'] = ' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                               for c in command)
  return result
