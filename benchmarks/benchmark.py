r"""Throughput of SimCLR pretraining: device step, host input, end to end, and a PyTorch peer.

    python benchmarks/benchmark.py --config=configs/default.py [--config.batch_size=256 ...] \
        [--steps=20] [--out=results.json] [--peer_python=benchmarks/.peer-venv/bin/python]

Measures, for the config's model, batch and image size:
  device   the real jitted `pretrain.train_step`, built by `pretrain.build` as `pretrain.run`
           uses it (donated state, replicated state and batch-sharded inputs on
           `mesh.create_mesh()`, under `jax.set_mesh`), on synthetic batches already on device:
           step time (median over --windows windows of the --steps timed steps, blocking only at
           the end of a window),
           images/s, views/s, lower + compile time, the step's convolution and matmul FLOPs
           (`step_timing.matmul_conv_flops`, PyTorch's counting), achieved FLOP/s and MFU,
           peak device memory. The timed window runs under `jax.transfer_guard('disallow')`
           (no host transfer can hide in the step) and checks that the donated state buffers
           were consumed.
  host     the tf.data pretraining pipeline alone (`data.pretrain_batches`), images/s.
  e2e      the training loop: `data.pretrain_batches` -> `mesh.prefetch_to_device` -> the same
           compiled step, metrics fetched every log_every_steps; names the bottleneck.
  profile  with --trace_dir, a jax.profiler trace of a few steps and the op kinds taking the most
           time per step (on CPUs the flag --xla_cpu_enable_xprof_traceme is set for it).
  peer     benchmarks/torch_peer.py in its own venv (benchmarks/setup_peer.sh), the same SimCLR
           step in PyTorch on the same batch and model; parameter counts of both are compared.
When the config's dataset is not prepared here (e.g. cifar10 offline), host and e2e use the
synthetic TFDS dataset of benchmarks/host_input.py with the same image size (32 or 224), with
the config's augmentation and batch size.
Prints a table and one JSON object (also written to --out). See benchmarks/README.md.
"""

import collections
import contextlib
import glob
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import bench_util

_ROOT = bench_util.ROOT
sys.path.insert(0, _ROOT)

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_ROOT, 'configs/default.py'), 'Training configuration file.',
    lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed device steps (after --warmup).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_WINDOWS = flags.DEFINE_integer('windows', 5, 'The timed steps are split into this many windows, '
                                'each closed by one block_until_ready; step time = median.')
_E2E_STEPS = flags.DEFINE_integer('e2e_steps', None, 'Timed end-to-end steps (default --steps).')
_HOST_BATCHES = flags.DEFINE_integer('host_batches', 20,
                                     'Timed host batches (after 3 warm-up ones).')
_PEAK_FLOPS = flags.DEFINE_float('peak_flops', None, 'Peak FLOP/s of one device, for MFU; by '
                                 'default from a table of accelerators (none for CPUs).')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'Online-probe classes (default: the '
                                    "dataset's, 1000 for imagenet2012, else 10).")
_HOST = flags.DEFINE_bool('host', True, 'Measure the host input pipeline.')
_E2E = flags.DEFINE_bool('e2e', True, 'Measure the end-to-end training loop.')
_PEER_PYTHON = flags.DEFINE_string('peer_python', bench_util.PEER_PYTHON,
                                   "Python of the PyTorch peer's venv ('' to skip the peer).")
_PEER_ARGS = flags.DEFINE_string('peer_args', '', 'Extra flags for torch_peer.py, e.g. '
                                 '"--compile --optimizer=sgd".')
_SYNTHETIC_DIR = flags.DEFINE_string('synthetic_data_dir', '/tmp/host_input_tfds',
                                     "host_input.py's synthetic datasets (fallback data).")
_CORES = flags.DEFINE_integer('cores', None, 'Pin this process and the peer to its first N cores '
                              '(CPU runs: a fair, steadier comparison on a shared machine).')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'Rounds of (JAX --steps, peer --steps), alternated '
                               'so both see the same load; ratio = median over rounds.')
_OUT = flags.DEFINE_string('out', None, 'Write the JSON results here.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', None, 'Also profile --trace_steps device steps into '
                                 'this directory (TensorBoard / Perfetto) and print the ops that '
                                 'take the most time.')
_TRACE_STEPS = flags.DEFINE_integer('trace_steps', 2, 'Steps in the --trace_dir profile.')

_DATASET_CLASSES = {'imagenet2012': 1000, 'cifar100': 100}


def _host_input_dataset(image_size):
  """Builds (once) benchmarks/host_input.py's synthetic dataset of this size; returns its spec.

  Runs in a child interpreter: host_input.py defines absl flags of its own.
  """
  path = os.path.join(_ROOT, 'benchmarks', 'host_input.py')
  case = {32: '32', 224: '224'}.get(image_size)
  if case is None or not os.path.exists(path):
    return None
  code = ('import json, sys; sys.path.insert(0, sys.argv[1]); import host_input; '
          'spec = dict(host_input.CASES[sys.argv[2]]); host_input.build_dataset(sys.argv[2], '
          'sys.argv[3]); print(json.dumps(spec, default=str))')
  process = subprocess.run([sys.executable, '-c', code, os.path.dirname(path), case,
                            _SYNTHETIC_DIR.value], capture_output=True, text=True, check=False)
  if process.returncode:
    logging.warning('host_input.py failed: %s', process.stderr[-2000:])
    return None
  return json.loads(process.stdout.strip().splitlines()[-1])


def resolve_data(config, notes):
  """Points config.data at a prepared dataset: its own, or host_input.py's synthetic one of its
  size. Returns (short description of the data used, its data.Split), or (None, None)."""
  from simclr_jax import data  # pylint: disable=g-import-not-at-top
  from simclr_jax import prepare_data  # pylint: disable=g-import-not-at-top
  try:  # Prepared, or preparable from local files; never a download from here.
    if prepare_data.can_prepare_offline(config.data.dataset):
      data.prepare(config.data)
    split = data.open_split(config.data, config.data.train_split)
    return f'{config.data.dataset} (prepared)', split
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0][:200]
  spec = _host_input_dataset(config.data.image_size)
  if spec is None:
    notes.append(f'{config.data.dataset} unavailable ({reason}); no synthetic stand-in at '
                 f'{config.data.image_size}px: host and e2e skipped.')
    return None, None
  synthetic = spec['dataset']
  notes.append(f'{config.data.dataset} unavailable ({reason}); host and e2e read the synthetic '
               f'{synthetic} of benchmarks/host_input.py instead (same size, the config\'s '
               'augmentation and batch).')
  config.data.dataset, config.data.data_dir = synthetic, _SYNTHETIC_DIR.value
  config.data.shuffle_buffer = min(config.data.shuffle_buffer, spec['num_examples'] // 4)
  return (f'{synthetic} (synthetic, benchmarks/host_input.py)',
          data.open_split(config.data, config.data.train_split))


def _num_classes(config, split):
  if not config.online_probe:
    return 0
  if _NUM_CLASSES.value is not None:
    return _NUM_CLASSES.value
  if split is not None and split.num_classes:
    return split.num_classes
  return _DATASET_CLASSES.get(config.data.dataset, 10)


def trace_op_times(trace_dir, num_steps, top=15):
  """[(op kind, ms per step, calls per step)] from the newest Perfetto trace in trace_dir.

  An op kind is an XLA op's name without its numeric suffix (`ynn_fusion.92` -> `ynn_fusion`);
  Python frames (`$...`) and the executor's enclosing spans are left out.
  """
  paths = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  total_ms, calls = collections.Counter(), collections.Counter()
  for event in events:
    name = event.get('name', '')
    if event.get('ph') != 'X' or name.startswith(('$', 'ThunkExecutor', 'PjitFunction')):
      continue
    kind = re.sub(r'[.\d]+$', '', name)
    total_ms[kind] += event['dur'] / 1e3 / num_steps
    calls[kind] += 1 / num_steps
  return [(kind, ms, round(calls[kind])) for kind, ms in total_ms.most_common(top)]


def bench_host(config, split, num_batches):
  """Images/s of the host pipeline alone (its first batches fill the shuffle buffer)."""
  from simclr_jax import tfds_data  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  batches = tfds_data.pretrain_batches(split, seed=config.seed, batch_size=config.batch_size)
  for _ in range(3):
    next(batches)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  seconds = time.perf_counter() - start
  return {'images_per_s': num_batches * config.batch_size / seconds, 'batches': num_batches,
          'first_3_batches_s': first_s}


def bench_e2e(config, split, mesh, compiled, state, num_steps):
  """The training loop: data.pretrain_batches -> the compiled step, metrics every log step."""
  import jax  # pylint: disable=g-import-not-at-top
  from simclr_jax import data  # pylint: disable=g-import-not-at-top
  from simclr_jax import train_loop  # pylint: disable=g-import-not-at-top
  batches = data.pretrain_batches(split, mesh, seed=config.seed, batch_size=config.batch_size)
  warmup = max(_WARMUP.value, config.data.prefetch_batches + 1)
  start = time.perf_counter()
  result = train_loop.run(state, compiled, batches, first_step=1, last_step=warmup,
                          log_every_steps=warmup, on_log=lambda step, record: None,
                          non_finite_message=lambda step, loss: f'loss {loss} at step {step}')
  jax.block_until_ready(result.state)
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  result = train_loop.run(result.state, compiled, batches, first_step=1, last_step=num_steps,
                          log_every_steps=config.log_every_steps,
                          on_log=lambda step, record: None,
                          non_finite_message=lambda step, loss: f'loss {loss} at step {step}')
  jax.block_until_ready(result.state)
  seconds = time.perf_counter() - start
  return {'images_per_s': num_steps * config.batch_size / seconds,
          'step_s': seconds / num_steps, 'steps': num_steps, 'warmup_s': warmup_s}


def bench_peer(config, num_classes, notes):
  """Runs torch_peer.py with the peer venv's python; returns its JSON, or None."""
  try:
    python = bench_util.peer_python(_PEER_PYTHON.value)
  except FileNotFoundError as e:
    notes.append(f'PyTorch peer skipped: {e}.')
    return None
  if python is None:
    return None
  return bench_util.run_peer(python, config, num_classes, notes, steps=_STEPS.value,
                             warmup=_WARMUP.value, windows=_WINDOWS.value,
                             extra_args=_PEER_ARGS.value.split())


def _fmt(x, unit='', scale=1.0, digits=1):
  return 'n/a' if x is None else f'{x / scale:,.{digits}f}{unit}'


def print_table(r):
  d, cfg = r['device'], r['config']
  m = cfg['model']
  print(f"\nSimCLR ResNet-{m['depth']} w={m['width_multiplier']} "
        f"{'CIFAR' if m['cifar_stem'] else 'ImageNet'} stem, {cfg['image_size']}px, global batch "
        f"{cfg['batch_size']}, {m['dtype']}, {d['devices']} x {d['device_kind']} "
        f"({r['machine']['cpu']}, {r['machine']['cores']} cores, load {r['machine']['load']})")
  rows = [
      ('device step (median)', _fmt(d['step_s_median'], ' ms', 1e-3, 1)),
      ('device images/s', _fmt(d['images_per_s'])),
      ('device views/s', _fmt(d['views_per_s'])),
      ('lower + compile', f"{d['lower_s']:.1f} s + {d['compile_s']:.1f} s"),
      ('step GFLOP (conv + matmul, per device)', _fmt(d['step_flops_per_device'], '', 1e9, 1)),
      ('achieved GFLOP/s per device', _fmt(d['achieved_flops_per_device'], '', 1e9, 1)),
      ('MFU', 'n/a (no peak for this device; --peak_flops)' if d['mfu'] is None
       else f"{100 * d['mfu']:.1f}% of {d['peak_flops_per_device'] / 1e12:g} TFLOP/s "
            f"({d['peak_source']})"),
      ('peak device memory', _fmt(d['peak_device_bytes'], ' GiB', 2**30, 2) if
       d['peak_device_bytes'] else 'n/a (' + d['platform'] + ')'),
      ('XLA temp buffers', _fmt((d['xla_buffer_bytes'] or {}).get('temp'), ' MiB', 2**20, 1)),
      ('params (JAX)', f"{d['params']['total']:,}"),
  ]
  host, e2e, peer = r.get('host'), r.get('e2e'), r.get('peer')
  rows.append(('host pipeline images/s', _fmt(host and host['images_per_s'])))
  rows.append(('end-to-end images/s', _fmt(e2e and e2e['images_per_s'])))
  if r.get('bottleneck'):
    rows.append(('bottleneck', r['bottleneck']))
  if peer:
    rows.append(('PyTorch peer', f"{peer['framework']} ({peer['device_name']}, "
                 f"{peer['threads'] or ''} threads), {peer['loss']}, {peer['optimizer']}"))
    rows.append(('PyTorch peer step (median)', _fmt(peer['step_s_median'], ' ms', 1e-3, 1)))
    rows.append(('PyTorch peer images/s', _fmt(peer['images_per_s'])))
    rows.append(('params (PyTorch)', f"{peer['params']['total']:,}"))
    rows.append(('JAX / PyTorch images/s', f"{r['jax_over_peer']:.2f}x (median of "
                 + ', '.join(f'{x:.2f}' for x in r['jax_over_peer_per_round']) + ')'))
    if d['platform'] == 'cpu':
      rows.append(('CPU-s per step JAX / PyTorch',
                   f"{d['cpu_s_per_step_median']:.2f} / {peer['cpu_s_per_step_median']:.2f}"))
  for kind, ms, calls in r.get('trace', {}).get('ms_per_step_by_op', []):
    rows.append((f'  profile: {kind} (x{calls})', _fmt(ms, ' ms/step')))
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f'  {k:<{width}}  {v}')
  for note in r['notes']:
    print(f'  note: {note}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _TRACE_DIR.value:  # XLA:CPU records each op in the profile only with this flag.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_cpu_enable_xprof_traceme=true')
  if _CORES.value:  # Before TensorFlow and XLA size their thread pools; the peer inherits it.
    bench_util.pin_to_first_cores(_CORES.value)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # tf.data must not take the accelerators.
  import jax  # pylint: disable=g-import-not-at-top
  from simclr_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  import step_timing  # pylint: disable=g-import-not-at-top  # Imports JAX: after TensorFlow.

  config = _CONFIG.value
  notes = []
  mesh = mesh_lib.create_mesh()
  mesh_lib.check_global_batch_size(config.batch_size, mesh)
  results = {
      'date': time.strftime('%Y-%m-%d %H:%M'),
      'machine': {'cpu': bench_util.cpu_model(), 'cores': len(os.sched_getaffinity(0)),
                  'load': ' '.join(f'{x:.1f}' for x in os.getloadavg()),
                  'jax': jax.__version__, 'backend': jax.default_backend()},
      'command': ' '.join(['python'] + [os.path.relpath(sys.argv[0], _ROOT)] + sys.argv[1:]),
      'config': {'dataset': config.data.dataset, 'image_size': config.data.image_size,
                 'batch_size': config.batch_size, 'model': config.model.to_dict(),
                 'temperature': config.temperature, 'similarity': config.similarity,
                 'online_probe': config.online_probe},
      'notes': notes,
  }
  data_used, split = (resolve_data(config, notes) if (_HOST.value or _E2E.value)
                      else (None, None))
  num_classes = _num_classes(config, split)
  results['config']['num_classes'] = num_classes
  results['data'] = data_used

  rounds = []
  with jax.set_mesh(mesh):
    results['device'], runner = step_timing.bench_device(
        config, mesh, num_classes, notes, warmup=_WARMUP.value, peak_override=_PEAK_FLOPS.value)
    compiled = runner.compiled
    # Rounds alternate JAX windows and a peer run, so that both see the same machine load.
    for _ in range(max(1, _ROUNDS.value)):
      jax_windows = runner.time(_STEPS.value, _WINDOWS.value)
      peer = bench_peer(config, num_classes, notes)
      rounds.append({'jax_images_per_s': config.batch_size / bench_util.median(jax_windows),
                     'peer_images_per_s': peer and peer['images_per_s'], 'peer': peer})
      if peer is None:
        break
    results['device'].update(runner.summary())
    if _TRACE_DIR.value:
      runner.trace(_TRACE_STEPS.value, _TRACE_DIR.value)
      results['trace'] = {'dir': _TRACE_DIR.value,
                          'ms_per_step_by_op': trace_op_times(_TRACE_DIR.value,
                                                              _TRACE_STEPS.value)}
    if _HOST.value and data_used:
      results['host'] = bench_host(config, split, _HOST_BATCHES.value or _STEPS.value)
    if _E2E.value and data_used:
      results['e2e'] = bench_e2e(config, split, mesh, compiled, runner.state,
                                 _E2E_STEPS.value or _STEPS.value)
    del compiled, runner
  if results.get('host'):
    device_ips, host_ips = results['device']['images_per_s'], results['host']['images_per_s']
    which = 'host input pipeline' if host_ips < device_ips else 'device step'
    results['bottleneck'] = (f'{which} (host {host_ips:,.0f} vs device {device_ips:,.0f} img/s'
                             + (f', e2e {results["e2e"]["images_per_s"]:,.0f}' if
                                results.get('e2e') else '') + ')')
    if results['device']['platform'] == 'cpu':
      notes.append('CPU backend: the pipeline and the step share the same cores, so e2e is not '
                   'min(host, device).')

  peers = [r.pop('peer') for r in rounds if r['peer']]
  if peers:
    peer = dict(peers[-1])
    windows = [w for p in peers for w in p['window_step_s']]
    peer.update(window_step_s=windows, step_s_median=bench_util.median(windows),
                cpu_s_per_step_median=bench_util.median([p['cpu_s_per_step'] for p in peers]),
                images_per_s=config.batch_size / bench_util.median(windows),
                views_per_s=2 * config.batch_size / bench_util.median(windows))
    peer.pop('cpu_s_per_step', None)
    results['peer'] = peer
    results['rounds'] = rounds
    ratios = [r['jax_images_per_s'] / r['peer_images_per_s'] for r in rounds]
    results['jax_over_peer'] = bench_util.median(ratios)
    results['jax_over_peer_per_round'] = ratios
    jax_params, torch_params = results['device']['params'], peer['params']
    if jax_params != torch_params:
      notes.append(f'PARAMETER COUNTS DIFFER: JAX {jax_params} vs PyTorch {torch_params}.')
  results['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

  print_table(results)
  text = json.dumps(results, indent=1, default=str)
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  with contextlib.suppress(KeyboardInterrupt):
    app.run(main)
