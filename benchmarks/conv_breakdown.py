r"""Where a CPU train step's time goes: every convolution of the encoder, JAX against PyTorch.

    python benchmarks/conv_breakdown.py --config=configs/default.py [--cores=1] \
        [--peer_python=benchmarks/.peer-venv/bin/python]

Traces the config's encoder on a batch of 2 x batch_size views (what one train step feeds it),
collects its convolutions from the jaxpr, and times each distinct one alone, fp32: forward, input
gradient (dx) and kernel gradient (dw), each jitted on its own. The same shapes go to
benchmarks/torch_conv_times.py in the peer venv (channels-last nn.Conv2d). Prints a table per
shape and the totals weighted by how often each shape occurs, in ms per step. The totals say
which framework's convolution kernels, and which of the three passes, make the difference seen
by benchmark.py; the rest of the step (BatchNorm, head, loss, LARS) is the step time minus them.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import bench_util

_ROOT = bench_util.ROOT
sys.path.insert(0, _ROOT)

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_ROOT, 'configs/default.py'), 'Training configuration file.',
    lock_config=True)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per pass (after one warm-up call).')
_CORES = flags.DEFINE_integer('cores', None, 'Pin both frameworks to the first N cores.')
_PEER_PYTHON = flags.DEFINE_string('peer_python', bench_util.PEER_PYTHON,
                                   "Python of the PyTorch peer's venv ('' to skip the peer).")


def encoder_convolutions(config):
  """[(shape dict, count)] of the encoder's convolutions on one step's 2 x batch_size views."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model(config.model)
  size = config.data.image_size
  x = jnp.zeros((2 * config.batch_size, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=['batch_stats'],
                                               method=models.SimCLRModel.encode))(variables)
  counts = {}

  def visit(eqns):
    for eqn in eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        shape = {'batch': lhs[0], 'size': lhs[1], 'cin': lhs[3], 'cout': rhs[3],
                 'kernel': rhs[0], 'stride': eqn.params['window_strides'][0],
                 'padding': [list(p) for p in eqn.params['padding']]}
        key = json.dumps(shape, sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
      for param in eqn.params.values():  # Nested jaxprs: pjit, remat, custom_vjp, cond.
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
            visit(sub.eqns)

  visit(jaxpr.jaxpr.eqns)
  return [(json.loads(k), n) for k, n in counts.items()]


def time_ms(fn, repeats):
  """Median wall ms of fn() (which returns something with block_until_ready) after a warm-up."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - start))
  return bench_util.median(times)


def jax_times(shape, repeats):
  """(forward, dx, dw) ms of one convolution in JAX."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  s, k = shape['size'], shape['kernel']
  x = jax.numpy.asarray(rng.standard_normal((shape['batch'], s, s, shape['cin']), np.float32))
  w = jax.numpy.asarray(rng.standard_normal((k, k, shape['cin'], shape['cout']), np.float32))

  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (shape['stride'],) * 2, [tuple(p) for p in shape['padding']],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  dy = jax.numpy.ones(jax.eval_shape(conv, x, w).shape, np.float32)
  forward = jax.jit(conv)
  dx = jax.jit(lambda x, w: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return tuple(time_ms(lambda f=f: f(x, w), repeats) for f in (forward, dx, dw))


def peer_times(shapes, repeats):
  """(forward, dx, dw) ms per shape from torch_conv_times.py, or None without the peer venv."""
  try:
    python = bench_util.peer_python(_PEER_PYTHON.value)
  except FileNotFoundError as e:
    print(f'PyTorch peer skipped: {e}.')
    return None
  if python is None:
    return None
  command = [python, os.path.join(_ROOT, 'benchmarks', 'torch_conv_times.py'),
             f'--repeats={repeats}', f'--threads={_CORES.value or os.cpu_count()}']
  out = subprocess.run(command, input=json.dumps(shapes), capture_output=True, text=True,
                       check=True).stdout
  return [tuple(t) for t in json.loads(out)]


def main(argv):
  del argv
  if _CORES.value:
    bench_util.pin_to_first_cores(_CORES.value)  # The peer inherits it.
  config = _CONFIG.value
  convs = encoder_convolutions(config)
  shapes = [shape for shape, _ in convs]
  ours = [jax_times(shape, _REPEATS.value) for shape in shapes]
  theirs = peer_times(shapes, _REPEATS.value) or [None] * len(shapes)
  m = config.model
  print(f'ResNet-{m.depth} w={m.width_multiplier} {config.data.image_size}px, '
        f'{2 * config.batch_size} views per step, fp32, ms per call (JAX | PyTorch)')
  print(f'{"conv (in px, k/stride, cin->cout)":36} {"n":>2}  {"forward":>13}  {"dx":>13}  '
        f'{"dw":>13}')
  totals = {'jax': [0.0] * 3, 'torch': [0.0] * 3}
  for (shape, n), mine, peer in zip(convs, ours, theirs):
    name = (f'{shape["size"]}px {shape["kernel"]}x{shape["kernel"]}/{shape["stride"]} '
            f'{shape["cin"]}->{shape["cout"]}')
    cells = [f'{a:6.1f} | {b:4.1f}' if peer else f'{a:6.1f}'
             for a, b in zip(mine, peer or mine)]
    print(f'{name:36} {n:2d}  ' + '  '.join(f'{c:>13}' for c in cells))
    for i in range(3):
      totals['jax'][i] += n * mine[i]
      if peer:
        totals['torch'][i] += n * peer[i]
  for framework, t in totals.items():
    if any(t):
      print(f'{framework:>6} per step: forward {t[0]:.0f} ms, dx {t[1]:.0f} ms, dw {t[2]:.0f} ms, '
            f'all {sum(t):.0f} ms')
  print(json.dumps({'convolutions': [dict(shape, count=n, jax_ms=mine, torch_ms=peer)
                                     for (shape, n), mine, peer in zip(convs, ours, theirs)],
                    'totals_ms': totals}))


if __name__ == '__main__':
  app.run(main)
