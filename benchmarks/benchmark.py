r"""Throughput of SimCLR pretraining: device step, host input, end to end, and a PyTorch peer.

    python benchmarks/benchmark.py --config=configs/default.py [--config.batch_size=256 ...] \
        [--steps=20] [--out=results.json] [--peer_python=benchmarks/.peer-venv/bin/python]

Measures, for the config's model, batch and image size:
  device   the real jitted `pretrain.train_step`, built by `pretrain.build` as `pretrain.run`
           uses it (donated state, replicated state and batch-sharded inputs on
           `mesh.create_mesh()`, under `jax.set_mesh`), on synthetic batches already on device:
           step time (median over --windows windows of the --steps timed steps, blocking only at
           the end of a window),
           images/s, views/s, lower + compile time, XLA's FLOPs of the compiled step, achieved
           FLOP/s and MFU, peak device memory. The timed window runs under
           `jax.transfer_guard('disallow')` (no host transfer can hide in the step) and checks
           that the donated state buffers were consumed.
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
import warnings

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

# Dense peak FLOP/s of one JAX device, from vendor spec sheets: (substring of device_kind, name,
# {dtype: peak}). fp32 on GPUs is the TF32 tensor-core peak (XLA and cuDNN run fp32 convolutions
# in TF32 by default); on TPUs fp32 matmuls with default precision are one bf16 MXU pass.
# TPU v2/v3 devices are single TensorCores (half a chip); v4, v5p are megacore chips.
PEAK_FLOPS = (
    ('TPU v6', 'TPU v6e (Trillium) chip', {'bfloat16': 918e12, 'float32': 918e12}),
    ('TPU v5 lite', 'TPU v5e chip', {'bfloat16': 197e12, 'float32': 197e12}),
    ('TPU v5e', 'TPU v5e chip', {'bfloat16': 197e12, 'float32': 197e12}),
    ('TPU v5', 'TPU v5p chip', {'bfloat16': 459e12, 'float32': 459e12}),
    ('TPU v4', 'TPU v4 chip', {'bfloat16': 275e12, 'float32': 275e12}),
    ('TPU v3', 'TPU v3 core (half chip)', {'bfloat16': 61.5e12, 'float32': 61.5e12}),
    ('H200', 'NVIDIA H200 SXM', {'bfloat16': 989e12, 'float32': 494.5e12}),
    ('H100 PCIe', 'NVIDIA H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    ('H100 NVL', 'NVIDIA H100 NVL', {'bfloat16': 835e12, 'float32': 417.5e12}),
    ('H100', 'NVIDIA H100 SXM', {'bfloat16': 989e12, 'float32': 494.5e12}),
    ('A100', 'NVIDIA A100', {'bfloat16': 312e12, 'float32': 156e12}),
)
_DATASET_CLASSES = {'imagenet2012': 1000, 'cifar100': 100}


def peak_flops(device_kind: str, dtype: str):
  """(name, peak FLOP/s) of the first PEAK_FLOPS row whose key is in device_kind, else None."""
  for key, name, peaks in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return name, peaks[dtype]
  return None


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


def _synthetic_batch(config, num_classes, mesh):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from simclr_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = {'views': rng.random((config.batch_size, 2, size, size, 3), np.float32),
           'label': rng.integers(0, max(num_classes, 1), config.batch_size).astype(np.int32)}
  return jax.device_put(batch, mesh_lib.batch_sharded(mesh))


def _param_counts(params) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  counts = {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in params.items()}
  counts['total'] = sum(counts.values())
  return counts


def _frames_from(hlo: str, filename: str) -> set:
  """Ids of the HLO stack frames whose call chain passes through a file ending in filename."""
  tables, section = {}, None
  for line in hlo.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = tables.setdefault(line, {})
    elif section is not None and (m := re.match(r'(\d+) (.*)', line)):
      section[int(m.group(1))] = m.group(2)
    else:
      section = None
  files = {i for i, name in tables.get('FileNames', {}).items()
           if name.strip('"').endswith(filename)}
  locations = {i for i, text in tables.get('FileLocations', {}).items()
               if int(re.search(r'file_name_id=(\d+)', text).group(1)) in files}
  frames = {i: tuple(int(x) for x in re.findall(r'=(\d+)', text))
            for i, text in tables.get('StackFrames', {}).items()}
  found = set()
  for frame in frames:
    seen, current = set(), frame
    while current in frames and current not in seen:
      seen.add(current)
      location, parent = frames[current]
      if location in locations:
        found.add(frame)
        break
      current = parent
  return found


def hlo_checks(hlo: str, global_batch: int, num_devices: int, proj_dim: int) -> dict:
  """What the optimized HLO of the step holds: host callbacks, collectives, logits shapes.

  The contrastive logits (and their gradient) are the [rows, 2N] float arrays made by
  simclr_jax/losses.py (found through the HLO's stack frames); with the loss sharded over the
  mesh, rows = 2N / devices: no device materialises the global [2N, 2N] logits.
  """
  cols = 2 * global_batch
  loss_frames = _frames_from(hlo, 'simclr_jax/losses.py')
  shape = re.compile(r'= (?:f32|bf16)\[(\d+),' + str(cols) + r'\]')
  logits_rows = set()
  for line in hlo.splitlines():
    frame = re.search(r'stack_frame_id=(\d+)', line)
    if frame and int(frame.group(1)) in loss_frames:
      logits_rows.update(int(m.group(1)) for m in shape.finditer(line))
  host = re.findall(r'custom_call_target="([^"]*(?:callback|host)[^"]*)"', hlo)
  return {
      'host_callbacks': sorted(set(host)),
      'infeed_outfeed_send_recv': len(re.findall(r' (?:infeed|outfeed|send|recv)\(', hlo)),
      'all_gather': len(re.findall(r' all-gather(?:-start)?\(', hlo)),
      'all_reduce': len(re.findall(r' all-reduce(?:-start)?\(', hlo)),
      'reduce_scatter': len(re.findall(r' reduce-scatter\(', hlo)),
      'loss_logits_rows': sorted(logits_rows),
      'logits_shape_expected_per_device': [cols // num_devices, cols],
      # With proj_dim == 2N the gathered [2N, d] embeddings look like logits: no verdict.
      'logits_rows_ok': (None if proj_dim == cols else
                         bool(logits_rows) and max(logits_rows) <= cols // num_devices),
  }


def _timed_windows(run_steps, num_steps, num_windows):
  """Runs num_steps steps in num_windows windows; returns per-step seconds of each window."""
  num_windows = max(1, min(num_windows, num_steps))
  sizes = [num_steps // num_windows + (i < num_steps % num_windows) for i in range(num_windows)]
  return [run_steps(n) / n for n in sizes]


def _cpu_seconds():
  """User + system CPU seconds of this process (all threads)."""
  t = os.times()
  return t.user + t.system


def bench_device(config, mesh, num_classes, notes):
  """Compiles the real train step and times it on a device-resident synthetic batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from simclr_jax import data  # pylint: disable=g-import-not-at-top
  from simclr_jax import pretrain  # pylint: disable=g-import-not-at-top

  # The schedule's length does not change the step's cost: a stand-in split of 1000 batches.
  split = data.stand_in_split(config.data, 1000 * config.batch_size, num_classes or None)
  setup = pretrain.build(config, split, mesh)
  step_fn = setup.step_fn
  state = setup.create_state(jax.random.key(config.seed))
  batch = _synthetic_batch(config, num_classes, mesh)
  params = _param_counts(state.params)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    old_leaves = jax.tree.leaves(state)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
  donation_warnings = [str(w.message)[:200] for w in caught if 'donat' in str(w.message).lower()]
  donated = all(leaf.is_deleted() for leaf in old_leaves)
  if donation_warnings or not donated:
    notes.append(f'Donation: {donation_warnings or "state buffers not consumed"}.')

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  step_flops = float(cost.get('flops', 0.0)) if cost else 0.0
  memory = compiled.memory_analysis()
  xla_bytes = None
  if memory is not None:
    xla_bytes = {k: int(getattr(memory, f'{k}_size_in_bytes', 0)) for k in
                 ('argument', 'output', 'temp', 'alias', 'generated_code')}
  checks = hlo_checks(compiled.as_text(), config.batch_size, mesh.devices.size,
                      config.model.proj_dim)
  if checks['host_callbacks'] or checks['infeed_outfeed_send_recv']:
    notes.append(f"HOST SYNC IN THE STEP: {checks['host_callbacks']}, "
                 f"{checks['infeed_outfeed_send_recv']} infeed/outfeed/send/recv.")
  if checks['logits_rows_ok'] is False:
    notes.append(f"LOSS MATERIALISES MORE THAN THIS DEVICE'S ROWS: {checks['loss_logits_rows']} "
                 f"rows of {checks['logits_shape_expected_per_device'][1]} columns.")

  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))

  device = mesh.devices.flat[0]
  peak = (('--peak_flops', _PEAK_FLOPS.value) if _PEAK_FLOPS.value
          else peak_flops(device.device_kind, config.model.dtype))
  result = {
      'devices': int(mesh.devices.size), 'device_kind': device.device_kind,
      'platform': device.platform,
      'lower_s': lower_s, 'compile_s': compile_s,
      'step_flops_per_device': step_flops,  # cost_analysis is per device (SPMD module).
      'peak_flops_per_device': peak[1] if peak else None,
      'peak_source': peak[0] if peak else None,
      'xla_buffer_bytes': xla_bytes,
      'donation_warnings': donation_warnings, 'state_donated': donated,
      'host_transfers_in_timed_steps': 'none (jax.transfer_guard disallow)',
      'hlo': checks, 'params': params,
  }

  class Runner:
    """Times more windows of the compiled step; keeps the (donated, replaced) state."""

    def __init__(self):
      self.state, self.metrics, self.windows, self.cpu = state, metrics, [], []

    def time(self, num_steps, num_windows):
      def run_steps(n):
        cpu, start = _cpu_seconds(), time.perf_counter()
        for _ in range(n):
          self.state, self.metrics = compiled(self.state, batch)
        jax.block_until_ready((self.state, self.metrics))
        self.cpu.append((_cpu_seconds() - cpu) / n)
        return time.perf_counter() - start
      with jax.transfer_guard('disallow'):
        windows = _timed_windows(run_steps, num_steps, num_windows)
      self.windows += windows
      return windows

    def trace(self, num_steps, trace_dir):
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(num_steps):
          self.state, self.metrics = compiled(self.state, batch)
        jax.block_until_ready((self.state, self.metrics))

    def summary(self):
      step_s = bench_util.median(self.windows)
      achieved = step_flops / step_s
      stats = [d.memory_stats() for d in mesh.devices.flat]
      peak_bytes = (max(int(s.get('peak_bytes_in_use', 0)) for s in stats)
                    if all(stats) else None)
      return {
          'step_s_median': step_s, 'step_s_min': min(self.windows),
          'step_s_max': max(self.windows), 'window_step_s': self.windows,
          'cpu_s_per_step_median': bench_util.median(self.cpu),
          'images_per_s': config.batch_size / step_s,
          'views_per_s': 2 * config.batch_size / step_s,
          'achieved_flops_per_device': achieved,
          'mfu': achieved / peak[1] if peak else None,
          'peak_device_bytes': peak_bytes,
          'loss_after': float(jax.device_get(self.metrics['loss'])),
      }

  return result, compiled, Runner()


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
  m = config.model
  command = [python, os.path.join(_ROOT, 'benchmarks', 'torch_peer.py'),
             f'--depth={m.depth}', f'--width_multiplier={m.width_multiplier}',
             f'--cifar_stem={int(m.cifar_stem)}', f'--proj_mode={m.proj_mode}',
             f'--proj_num_layers={m.proj_num_layers}', f'--proj_dim={m.proj_dim}',
             f'--num_classes={num_classes}', f'--image_size={config.data.image_size}',
             f'--batch_size={config.batch_size}', f'--dtype={m.dtype}',
             f'--temperature={config.temperature}', f'--weight_decay={config.weight_decay}',
             f'--momentum={config.momentum}', f'--steps={_STEPS.value}',
             f'--warmup={_WARMUP.value}', f'--windows={_WINDOWS.value}',
             *_PEER_ARGS.value.split()]
  if config.similarity != 'cosine':
    notes.append(f'PyTorch peer uses cosine similarity; the config has {config.similarity}.')
  process = subprocess.run(command, capture_output=True, text=True, check=False)
  if process.returncode:
    notes.append(f'PyTorch peer failed ({process.returncode}): '
                 f'{process.stderr.strip().splitlines()[-1:] }')
    return None
  result = json.loads(process.stdout.strip().splitlines()[-1])
  result['command'] = ' '.join(os.path.relpath(c, _ROOT) if c.startswith(_ROOT) else c
                               for c in command)
  return result


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
      ('step GFLOP (XLA, per device)', _fmt(d['step_flops_per_device'], '', 1e9, 1)),
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
    results['device'], compiled, runner = bench_device(config, mesh, num_classes, notes)
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
