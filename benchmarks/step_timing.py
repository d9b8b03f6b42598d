"""Timing of one compiled train step on device-resident synthetic data (JAX, TF-free).

Used by benchmark.py and device_check.py. `time_step` compiles any jitted (state, batch) ->
(state, metrics) step, records XLA's cost and memory analyses, checks donation, and returns a
`StepTimer`; `bench_device` applies it to the real `pretrain.train_step`, `bench_supervised` to a
softmax-classifier step of the same encoder and batch.
"""

import functools
import os
import re
import time
import warnings

import flax.linen as nn
import jax
import numpy as np
import optax

import bench_util
from simclr_jax import data
from simclr_jax import mesh as mesh_lib
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import pretrain
from simclr_jax import train_state as train_state_lib

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


def peak_flops(device_kind: str, dtype: str):
  """(name, peak FLOP/s) of the first PEAK_FLOPS row whose key is in device_kind, else None."""
  for key, name, peaks in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return name, peaks[dtype]
  return None


def synthetic_batch(config, num_classes, mesh):
  """A pretraining batch of random views and labels, sharded over the mesh."""
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = {'views': rng.random((config.batch_size, 2, size, size, 3), np.float32),
           'label': rng.integers(0, max(num_classes, 1), config.batch_size).astype(np.int32)}
  return jax.device_put(batch, mesh_lib.batch_sharded(mesh))


def param_counts(params) -> dict:
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
      # No verdict with proj_dim == 2N (the gathered [2N, d] embeddings look like logits) or on
      # one device, which holds every row: there XLA:GPU stacks the logits' gradient and its
      # transpose into one [4N, 2N] operand (an H200 run), and the transpose has 2N rows.
      'logits_rows_ok': (None if proj_dim == cols or num_devices == 1 else
                         bool(logits_rows) and max(logits_rows) <= cols // num_devices),
  }


def timed_windows(run_steps, num_steps, num_windows):
  """Runs num_steps steps in num_windows windows; returns per-step seconds of each window."""
  num_windows = max(1, min(num_windows, num_steps))
  sizes = [num_steps // num_windows + (i < num_steps % num_windows) for i in range(num_windows)]
  return [run_steps(n) / n for n in sizes]


def _cpu_seconds():
  """User + system CPU seconds of this process (all threads)."""
  t = os.times()
  return t.user + t.system


class StepTimer:
  """Times windows of a compiled step; keeps the (donated, replaced) state."""

  def __init__(self, compiled, state, metrics, batch, *, batch_size, step_flops, peak, mesh):
    self.compiled, self.state, self.metrics, self.batch = compiled, state, metrics, batch
    self.batch_size, self.step_flops, self.peak, self.mesh = batch_size, step_flops, peak, mesh
    self.windows, self.cpu = [], []

  def time(self, num_steps, num_windows):
    def run_steps(n):
      cpu, start = _cpu_seconds(), time.perf_counter()
      for _ in range(n):
        self.state, self.metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, self.metrics))
      self.cpu.append((_cpu_seconds() - cpu) / n)
      return time.perf_counter() - start
    with jax.transfer_guard('disallow'):
      windows = timed_windows(run_steps, num_steps, num_windows)
    self.windows += windows
    return windows

  def trace(self, num_steps, trace_dir):
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(num_steps):
        self.state, self.metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, self.metrics))

  def summary(self):
    step_s = bench_util.median(self.windows)
    achieved = self.step_flops / step_s
    stats = [d.memory_stats() for d in self.mesh.devices.flat]
    peak_bytes = (max(int(s.get('peak_bytes_in_use', 0)) for s in stats)
                  if all(stats) else None)
    return {
        'step_s_median': step_s, 'step_s_min': min(self.windows),
        'step_s_max': max(self.windows), 'window_step_s': self.windows,
        'cpu_s_per_step_median': bench_util.median(self.cpu),
        'images_per_s': self.batch_size / step_s,
        'views_per_s': 2 * self.batch_size / step_s,
        'achieved_flops_per_device': achieved,
        'mfu': achieved / self.peak[1] if self.peak else None,
        'peak_device_bytes': peak_bytes,
        'loss_after': float(jax.device_get(self.metrics['loss'])),
    }


def matmul_conv_flops(jaxpr, num_devices: int = 1) -> float:
  """FLOPs per device of the convolutions and matrix products of a (closed) jaxpr.

  2 x the multiply-adds of every conv_general_dilated and dot_general, the backward pass
  included, as PyTorch's FlopCounterMode counts them, so JAX and the peer are counted alike. Taken
  from the jaxpr, not XLA's cost analysis, whose compiled count omits GPU convolutions (cuDNN
  custom calls; an H200 run read 0.027 TFLOP for a ResNet-18 step PyTorch counts at 3.4).
  Work outside shard_map is global and split over num_devices; inside it is per device.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  flops = 0.0
  for eqn in jaxpr.eqns:
    name, out = eqn.primitive.name, eqn.outvars[0].aval.shape
    if name == 'conv_general_dilated':
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params['dimension_numbers'].rhs_spec[0]]
      # An input gradient of a strided convolution dilates its input with zeros (lhs_dilation):
      # only one output in prod(lhs_dilation) meets real inputs.
      useful = np.prod(out) / np.prod(eqn.params['lhs_dilation'])
      flops += 2 * useful * np.prod(kernel) / out_features / num_devices
    elif name == 'dot_general':
      lhs = eqn.invars[0].aval.shape
      (contracting, _), _ = eqn.params['dimension_numbers']
      flops += 2 * np.prod(out) * np.prod([lhs[d] for d in contracting]) / num_devices
    inner_devices = 1 if name == 'shard_map' else num_devices
    repeats = eqn.params.get('length', 1) if name == 'scan' else 1
    inner = [matmul_conv_flops(sub, inner_devices) for param in eqn.params.values()
             for sub in (param if isinstance(param, (tuple, list)) else (param,))
             if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))]
    # A cond runs one of its branches: the costliest one is counted.
    flops += repeats * (max(inner, default=0.0) if name == 'cond' else sum(inner))
  return float(flops)


def _xla_flops(compiled) -> float:
  """XLA's cost-analysis FLOPs of a compiled step, per device (omits GPU convolutions)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def time_step(step_fn, state, batch, *, batch_size, dtype, mesh, notes, warmup,
              peak_override=None, proj_dim=None):
  """Lowers, compiles and warms up the jitted step_fn; returns (facts, StepTimer).

  The facts: lower and compile seconds, the FLOPs of the step (per device), buffer sizes,
  donation, and (given proj_dim, for the SimCLR step) the HLO checks of `hlo_checks`.
  """
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    start = time.perf_counter()
    traced = step_fn.trace(state, batch)
    lowered = traced.lower()
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

  step_flops = matmul_conv_flops(traced.jaxpr, mesh.devices.size)
  memory = compiled.memory_analysis()
  xla_bytes = None
  if memory is not None:
    xla_bytes = {k: int(getattr(memory, f'{k}_size_in_bytes', 0)) for k in
                 ('argument', 'output', 'temp', 'alias', 'generated_code')}
  device = mesh.devices.flat[0]
  peak = (('--peak_flops', peak_override) if peak_override
          else peak_flops(device.device_kind, dtype))
  facts = {
      'devices': int(mesh.devices.size), 'device_kind': device.device_kind,
      'platform': device.platform,
      'lower_s': lower_s, 'compile_s': compile_s,
      'step_flops_per_device': step_flops,
      'xla_flops_per_device': _xla_flops(compiled),
      'peak_flops_per_device': peak[1] if peak else None,
      'peak_source': peak[0] if peak else None,
      'xla_buffer_bytes': xla_bytes,
      'donation_warnings': donation_warnings, 'state_donated': donated,
      'host_transfers_in_timed_steps': 'none (jax.transfer_guard disallow)',
      'params': param_counts(state.params),
  }
  if proj_dim is not None:
    checks = hlo_checks(compiled.as_text(), batch_size, mesh.devices.size, proj_dim)
    if checks['host_callbacks'] or checks['infeed_outfeed_send_recv']:
      notes.append(f"HOST SYNC IN THE STEP: {checks['host_callbacks']}, "
                   f"{checks['infeed_outfeed_send_recv']} infeed/outfeed/send/recv.")
    if checks['logits_rows_ok'] is False:
      notes.append(f"LOSS MATERIALISES MORE THAN THIS DEVICE'S ROWS: "
                   f"{checks['loss_logits_rows']} rows of "
                   f"{checks['logits_shape_expected_per_device'][1]} columns.")
    facts['hlo'] = checks

  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return facts, StepTimer(compiled, state, metrics, batch, batch_size=batch_size,
                          step_flops=step_flops, peak=peak, mesh=mesh)


def bench_device(config, mesh, num_classes, notes, *, warmup, peak_override=None):
  """Compiles the real pretraining step (as `pretrain.run` builds it) on a synthetic batch."""
  # The schedule's length does not change the step's cost: a stand-in split of 1000 batches.
  split = data.stand_in_split(config.data, 1000 * config.batch_size, num_classes or None)
  setup = pretrain.build(config, split, mesh)
  state = setup.create_state(jax.random.key(config.seed))
  return time_step(setup.step_fn, state, synthetic_batch(config, num_classes, mesh),
                   batch_size=config.batch_size, dtype=config.model.dtype, mesh=mesh,
                   notes=notes, warmup=warmup, peak_override=peak_override,
                   proj_dim=config.model.proj_dim)


class Classifier(nn.Module):
  """The SimCLR encoder under one softmax layer: the supervised baseline of the same work."""
  encoder: models.ResNet
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.num_classes, name='head')(self.encoder(x, train=train))


def supervised_step(state, batch, *, model, tx, schedule):
  """Softmax cross-entropy on both views of the pretraining batch: the same 2B encoder passes
  as `pretrain.train_step`, without projection head and contrastive loss."""
  views = mesh_lib.shard_along_data(batch['views'])
  images = views.reshape((-1,) + views.shape[2:])
  labels = mesh_lib.shard_along_data(batch['label']).repeat(2)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                  images, train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype('float32'),
                                                           labels).mean()
    return loss, updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, _ = train_state_lib.apply_gradients(state, grads, batch_stats, tx=tx, schedule=schedule)
  return state, {'loss': loss}


def bench_supervised(config, mesh, num_classes, notes, *, warmup, peak_override=None):
  """The supervised step of the same encoder, batch, optimizer (LARS) and dtype."""
  simclr = models.create_model(config.model, num_classes=num_classes)
  model = Classifier(simclr.encoder, max(num_classes, 2))
  schedule = optim.learning_rate_schedule(config.learning_rate, config.batch_size, 1000,
                                          warmup_steps=0, scaling=config.learning_rate_scaling)
  tx = optim.lars(schedule, config.weight_decay, momentum=config.momentum)
  replicated = mesh_lib.replicated(mesh)
  create_state = jax.jit(functools.partial(train_state_lib.create_train_state, model, tx,
                                           image_size=config.data.image_size),
                         out_shardings=replicated)
  step_fn = jax.jit(functools.partial(supervised_step, model=model, tx=tx, schedule=schedule),
                    in_shardings=(replicated, None), out_shardings=(replicated, replicated),
                    donate_argnums=(0,))
  state = create_state(jax.random.key(config.seed))
  return time_step(step_fn, state, synthetic_batch(config, num_classes, mesh),
                   batch_size=config.batch_size, dtype=config.model.dtype, mesh=mesh,
                   notes=notes, warmup=warmup, peak_override=peak_override)
