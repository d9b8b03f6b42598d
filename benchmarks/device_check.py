r"""Every number the project needs from one short accelerator window, in about 8 minutes.

    bash benchmarks/device_check.sh [--dry_run]    # OUT=./device_check_out by default

Runs these parts in this order; after each, $OUT/device_check.json (a list with one object per
part) and $OUT/device_check.md (the same as a table) are rewritten, so a timeout keeps what was
measured. A part whose time estimate would end past --budget_s is skipped with a note.

  environment        device, driver, versions, every setting
  jax/<case>         the real pretraining step (`pretrain.build`) on synthetic device data:
                     images/s, ms/step, compile s, step FLOPs -> TFLOP/s and MFU, peak memory
  supervised/<case>  a softmax step of the same encoder, batch and optimizer: the contrastive
                     cost ratio (SimCLR step time / supervised step time)
  torch_eager/<case> benchmarks/torch_peer.py on the same work (skipped when torch is absent)
  e2e/fashion_mnist  SimCLR (configs/fashion_mnist_gpu.py) through the memory source for about
                     --e2e_train_s, then kNN and linear_features top-1 on the test split
  torch_compile/...  the torch.compile peer, if time is left

Cases: r18_cifar_bf16 / r18_cifar_fp32 (ResNet-18 CIFAR stem, 32 px, batch 512) and
r50_224_bf16 (ResNet-50, 224 px, batch 256). --dry_run: the same parts on CPU with tiny shapes
(width 1/8, 16-32 px, a few steps) and most XLA optimisations off.

TensorFlow is hidden from this process, installed or not: it measures the TF-free path (memory
source, no tf.data, metrics.jsonl without TensorBoard) that a host without TensorFlow runs.
"""

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from absl import app, flags, logging

# The TF-free path even where TensorFlow is installed: importing these raises ImportError and
# importlib.util.find_spec gives None, so memory_data reads plain files and no tf.data starts.
for _hidden in ('tensorflow', 'tensorflow_datasets'):
  sys.modules[_hidden] = None

import bench_util  # noqa: E402

sys.path.insert(0, bench_util.ROOT)

_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Every part on CPU with tiny shapes.')
_OUT = flags.DEFINE_string('out', os.environ.get('OUT') or 'device_check_out',
                           'Folder of device_check.json and device_check.md.')
_BUDGET_S = flags.DEFINE_float('budget_s', None, 'Seconds for all parts (default 480; dry 270).')
_E2E_TRAIN_S = flags.DEFINE_float('e2e_train_s', 120, 'Seconds of SimCLR training in the e2e '
                                  'part (epochs estimated from the measured step).')
_STEPS = flags.DEFINE_integer('steps', None, 'Timed steps per part (default 20; dry 2).')
_E2E_EPOCHS = flags.DEFINE_integer('e2e_epochs', 0, 'Epochs of the e2e part (0: as many as '
                                   'fit in --e2e_train_s; 200 is configs/fashion_mnist_gpu.py). '
                                   'Raise --e2e_train_s with it: its guard still stops training.')
_PARTS_FLAG = flags.DEFINE_list('parts', None, 'Only these parts, e.g. e2e/fashion_mnist '
                                '(default: all, in the order of the table).')
_SAVE_HLO = flags.DEFINE_bool('save_hlo', False, 'Write the optimized HLO of each jax part\'s '
                              'step to $OUT/hlo_<case>.txt.')

_SPEC_CASES = {  # case: (base config, depth, image size, batch, dtype, classes)
    'r18_cifar_bf16': ('cifar10', 18, 32, 512, 'bfloat16', 10),
    'r18_cifar_fp32': ('cifar10', 18, 32, 512, 'float32', 10),
    'r50_224_bf16': ('imagenet', 50, 224, 256, 'bfloat16', 1000),
}
DRY_RUN_TRAIN_EXAMPLES = 256
# (part, case, seconds each took on an H200 on 2026-12-04; torch_compile's is a guess, it was
# not reached); e2e's adds --e2e_train_s.
_PARTS = (
    ('environment', None, 5),
    ('jax', 'r18_cifar_bf16', 50),
    ('supervised', 'r18_cifar_bf16', 15),
    ('torch_eager', 'r18_cifar_bf16', 25),
    ('e2e', 'fashion_mnist', 30),
    ('jax', 'r18_cifar_fp32', 30),
    ('jax', 'r50_224_bf16', 60),
    ('torch_eager', 'r50_224_bf16', 25),
    ('torch_eager', 'r18_cifar_fp32', 25),
    ('torch_compile', 'r18_cifar_bf16', 90),
)


def case_config(case: str, dry_run: bool):
  """(config, num_classes) of a step-benchmark case; tiny shapes for a dry run."""
  base, depth, size, batch, dtype, num_classes = _SPEC_CASES[case]
  config = importlib.import_module(f'configs.{base}').get_config()
  config.model.update(depth=depth, dtype=dtype)
  config.data.image_size, config.batch_size = size, batch
  if dry_run:
    config.model.width_multiplier = 0.125
    config.data.image_size, config.batch_size = (16 if depth == 18 else 32), 16
  return config, num_classes


def e2e_configs(dry_run: bool, epochs: int):
  """(pretraining config, [eval configs]) of the end-to-end part."""
  from configs import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from configs import fashion_mnist_gpu  # pylint: disable=g-import-not-at-top
  config = fashion_mnist_gpu.get_config()
  config.data.source = 'memory'
  config.num_epochs = epochs
  config.warmup_epochs = max(0.1, epochs / 20)  # The recipe's 10 of 200 epochs.
  config.checkpoint_every_steps = 0  # At the end (or at a stop) only.
  evals = []
  for protocol in ('knn', 'linear_features'):
    e = eval_lib.get_config()
    e.protocol, e.batch_size = protocol, 512
    evals.append(e)
  if dry_run:
    config.model.width_multiplier = 0.125
    config.data.update(image_size=16, train_split=f'train[:{DRY_RUN_TRAIN_EXAMPLES}]',
                       eval_split='test[:128]')
    config.batch_size = 32
    for e in evals:
      e.batch_size, e.data.train_split = 128, config.data.train_split
      e.linear_features.max_steps = 10
  config.log_every_steps = 4 if dry_run else 60_000 // config.batch_size  # Once an epoch.
  return config, evals


class Report:
  """The parts measured so far, rewritten as JSON and markdown after each."""

  def __init__(self, out_dir: str):
    self.out_dir, self.parts = out_dir, []
    os.makedirs(out_dir, exist_ok=True)

  def add(self, record: dict) -> None:
    self.parts.append(record)
    with open(os.path.join(self.out_dir, 'device_check.json'), 'w') as f:
      json.dump(self.parts, f, indent=1, default=str)
    with open(os.path.join(self.out_dir, 'device_check.md'), 'w') as f:
      f.write(markdown(self.parts))

  def find(self, part: str) -> dict:
    return next((p for p in self.parts if p['part'] == part and 'images_per_sec' in p), {})


def _cell(value, fmt):
  return '' if value is None else format(value, fmt)


def markdown(parts) -> str:
  env = next((p for p in parts if p['part'] == 'environment'), {})
  lines = [f"# device_check {env.get('date', '')}: {env.get('device_kind', '')}, "
           f"jax {env.get('jax', '')}, driver {env.get('driver', '')}", '',
           '| part | images/s | ms/step | compile s | TFLOP/s | MFU | peak GiB | notes |',
           '|---|---|---|---|---|---|---|---|']
  for p in parts:
    if p['part'] == 'environment':
      continue
    notes = [f'{k} {p[k]:.3g}' for k in ('jax_over_torch', 'contrastive_cost_ratio',
                                         'seconds_per_epoch', 'epochs', 'knn_top1',
                                         'linear_features_top1') if p.get(k) is not None]
    notes += [f"{k}: {p[k]}" for k in ('skipped', 'error') if p.get(k)]
    lines.append(
        f"| {p['part']} | {_cell(p.get('images_per_sec'), ',.0f')} | "
        f"{_cell(p.get('ms_per_step'), '.2f')} | {_cell(p.get('compile_s'), '.1f')} | "
        f"{_cell(p.get('tflops_per_sec'), '.1f')} | {_cell(p.get('mfu'), '.1%')} | "
        f"{_cell(p.get('peak_device_gib'), '.2f')} | {'; '.join(notes)} |")
  return '\n'.join(lines) + '\n'


def _xla_step_bytes(sizes) -> float:
  """The device memory XLA plans for one step: arguments, outputs and temporaries."""
  return sizes['argument'] + sizes['output'] + sizes['temp'] - sizes['alias'] if sizes else 0


def _step_record(facts, timer, config, num_classes, notes) -> dict:
  summary = timer.summary()
  peak = summary['peak_device_bytes']
  return {
      'images_per_sec': summary['images_per_s'], 'ms_per_step': 1e3 * summary['step_s_median'],
      'compile_s': facts['compile_s'], 'lower_s': facts['lower_s'],
      'tflops_per_sec': summary['achieved_flops_per_device'] / 1e12, 'mfu': summary['mfu'],
      'step_tflop': facts['step_flops_per_device'] / 1e12,
      'peak_flops_source': facts['peak_source'],
      'peak_device_gib': peak / 2**30 if peak else None,  # The process's peak so far.
      'xla_step_gib': _xla_step_bytes(facts['xla_buffer_bytes']) / 2**30,
      'window_ms': [1e3 * w for w in summary['window_step_s']],
      'loss_after': summary['loss_after'], 'params': facts['params']['total'],
      'settings': {'model': config.model.to_dict(), 'image_size': config.data.image_size,
                   'batch_size': config.batch_size, 'num_classes': num_classes,
                   'temperature': config.temperature, 'devices': facts['devices']},
      'checks': {k: facts.get(k) for k in ('state_donated', 'donation_warnings', 'hlo')},
      'notes': notes,
  }


class DeviceCheck:
  """The parts, sharing the mesh, the flags and the report."""

  def __init__(self, report: Report, dry_run: bool):
    import jax  # pylint: disable=g-import-not-at-top
    from simclr_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    self.report, self.dry_run = report, dry_run
    self.mesh = mesh_lib.create_mesh(jax.devices()[:1] if dry_run else None)
    self.steps = _STEPS.value or (2 if dry_run else 20)
    self.warmup, self.windows = (1, 1) if dry_run else (3, 4)

  def environment(self, _):
    import jax  # pylint: disable=g-import-not-at-top
    device = self.mesh.devices.flat[0]
    versions = {}
    for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'ml-collections',
                 'torch'):
      with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions[name] = importlib.metadata.version(name)
    smi = None
    if shutil.which('nvidia-smi'):
      smi = subprocess.run(
          ['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm,'
           'power.limit', '--format=csv,noheader'], capture_output=True, text=True,
          check=False).stdout.strip()
    return {
        'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
        'device_kind': device.device_kind, 'platform': device.platform,
        'devices': [str(d) for d in jax.devices()], 'nvidia_smi': smi,
        'driver': smi.split(', ')[1] if smi and ', ' in smi else None,
        'jax': jax.__version__, 'versions': versions, 'python': sys.version.split()[0],
        'cpu': bench_util.cpu_model(), 'cores': len(os.sched_getaffinity(0)),
        'tensorflow': 'hidden from this process (the TF-free path)',
        'settings': {'dry_run': self.dry_run, 'steps': self.steps, 'warmup': self.warmup,
                     'windows': self.windows, 'budget_s': budget_s(self.dry_run),
                     'e2e_train_s': _E2E_TRAIN_S.value,
                     'fashion_mnist_dir': os.environ.get('FASHION_MNIST_DIR'),
                     'xla_flags': os.environ.get('XLA_FLAGS'),
                     'jax_memory_fraction': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'),
                     'cases': {c: dict(zip(('config', 'depth', 'image_size', 'batch_size',
                                            'dtype', 'num_classes'), v))
                               for c, v in _SPEC_CASES.items()}},
    }

  def _timed(self, bench, case):
    import jax  # pylint: disable=g-import-not-at-top
    config, num_classes = case_config(case, self.dry_run)
    notes = []
    with jax.set_mesh(self.mesh):
      facts, timer = bench(config, self.mesh, num_classes, notes, warmup=self.warmup)
      timer.time(self.steps, self.windows)
    if _SAVE_HLO.value and bench.__name__ == 'bench_device':
      with open(os.path.join(self.report.out_dir, f'hlo_{case}.txt'), 'w') as f:
        f.write(timer.compiled.as_text())
    return _step_record(facts, timer, config, num_classes, notes)

  def jax(self, case):
    import step_timing  # pylint: disable=g-import-not-at-top
    return self._timed(step_timing.bench_device, case)

  def supervised(self, case):
    import step_timing  # pylint: disable=g-import-not-at-top
    record = self._timed(step_timing.bench_supervised, case)
    simclr = self.report.find(f'jax/{case}')
    if simclr:
      record['contrastive_cost_ratio'] = simclr['ms_per_step'] / record['ms_per_step']
    return record

  def _torch(self, case, extra_args, timeout):
    if importlib.util.find_spec('torch') is None:
      return {'skipped': 'torch is not importable here'}
    config, num_classes = case_config(case, self.dry_run)
    notes = []
    args = list(extra_args) + (['--device=cpu'] if self.dry_run else [])
    peer = bench_util.run_peer(sys.executable, config, num_classes, notes, timeout=timeout,
                               steps=self.steps, warmup=self.warmup, windows=self.windows,
                               extra_args=args)
    if peer is None:
      return {'error': '; '.join(notes)}
    record = {'images_per_sec': peer['images_per_s'], 'ms_per_step': 1e3 * peer['step_s_median'],
              'tflops_per_sec': (peer['achieved_flops'] or 0) / 1e12 or None,
              'peak_device_gib': (peer['peak_device_bytes'] or 0) / 2**30 or None,
              'warmup_s': peer['warmup_s'], 'peer': peer, 'notes': notes}
    jax_part = self.report.find(f'jax/{case}')
    if jax_part:
      record['jax_over_torch'] = jax_part['images_per_sec'] / record['images_per_sec']
    return record

  def torch_eager(self, case):
    return self._torch(case, [], timeout=120)

  def torch_compile(self, case):
    return self._torch(case, ['--compile'], timeout=240)

  def e2e(self, _):
    from simclr_jax import data  # pylint: disable=g-import-not-at-top
    from simclr_jax import evaluate  # pylint: disable=g-import-not-at-top
    from simclr_jax import pretrain  # pylint: disable=g-import-not-at-top
    measured = self.report.find('jax/r18_cifar_bf16').get('images_per_sec')
    num_train = DRY_RUN_TRAIN_EXAMPLES if self.dry_run else 60_000
    epochs = _E2E_EPOCHS.value or (1 if self.dry_run or not measured else max(
        1, int(_E2E_TRAIN_S.value * 0.8 * measured / num_train)))  # 0.8: augmentation's cost.
    config, evals = e2e_configs(self.dry_run, epochs)
    workdir = tempfile.mkdtemp(prefix='device_check_e2e_')
    start = time.perf_counter()
    # A SIGTERM makes pretrain.run checkpoint and stop: the guard against a wrong estimate.
    guard = threading.Timer(_E2E_TRAIN_S.value * 1.5 + 60, os.kill,
                            (os.getpid(), signal.SIGTERM))
    guard.start()
    try:
      pretrain.run(config, workdir, self.mesh)
    finally:
      guard.cancel()
    train_s = time.perf_counter() - start
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      logged = [json.loads(line) for line in f]
    steps_per_epoch = num_train // config.batch_size
    steady = [r['steps_per_sec'] for r in logged[1:]] or [logged[-1]['steps_per_sec']]
    step_rate = bench_util.median(steady)  # The first interval holds the compilation.
    record = {'images_per_sec': step_rate * config.batch_size,
              'ms_per_step': 1e3 / step_rate,
              'seconds_per_epoch': steps_per_epoch / step_rate,
              'cifar10_epoch_s_equivalent': 50_000 / (step_rate * config.batch_size),
              'epochs': logged[-1]['step'] / steps_per_epoch, 'epochs_planned': epochs,
              'steps': logged[-1]['step'],  # Fewer than planned: the guard stopped the run.
              'steps_planned': data.train_steps(num_train, config.batch_size, epochs),
              'train_wall_s': train_s, 'final_loss': logged[-1]['loss'],
              'final_probe_acc': logged[-1].get('probe_acc'),
              'settings': {'pretrain': config.to_dict(), 'eval': [e.to_dict() for e in evals]}}
    for e in evals:
      result = evaluate.evaluate(e, workdir, mesh=self.mesh)
      record[f'{e.protocol}_top1'] = result['top1']
      record[f'{e.protocol}_s'] = result['seconds']
    kept = os.path.join(self.report.out_dir, 'e2e')
    os.makedirs(kept, exist_ok=True)
    shutil.copy(os.path.join(workdir, 'metrics.jsonl'), kept)
    shutil.copytree(os.path.join(workdir, 'eval'), os.path.join(kept, 'eval'), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns('.*.lock'))  # The device tool returns 8 files.
    shutil.rmtree(workdir, ignore_errors=True)
    return record


def budget_s(dry_run: bool) -> float:
  return _BUDGET_S.value or (270 if dry_run else 480)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  dry_run = _DRY_RUN.value
  if dry_run:
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  if dry_run:
    jax.config.update('jax_disable_most_optimizations', True)
  start = time.perf_counter()
  report = Report(_OUT.value)
  check = DeviceCheck(report, dry_run)
  for kind, case, estimate in _PARTS:
    name = kind if case is None else f'{kind}/{case}'
    if _PARTS_FLAG.value and name not in _PARTS_FLAG.value + ['environment']:
      continue
    # The estimates are an accelerator's; a dry run stops only when past its budget.
    estimate = 0 if dry_run else estimate + (_E2E_TRAIN_S.value if kind == 'e2e' else 0)
    elapsed = time.perf_counter() - start
    if elapsed + estimate > budget_s(dry_run):
      report.add({'part': name, 'skipped': f'{elapsed:.0f} s spent; its ~{estimate:.0f} s '
                                           f'would pass the {budget_s(dry_run):.0f} s budget'})
      continue
    part_start = time.perf_counter()
    try:
      record = {'part': name, **getattr(check, kind)(case)}
    except Exception as e:  # pylint: disable=broad-except  # Keep measuring the other parts.
      traceback.print_exc()
      record = {'part': name, 'error': f'{type(e).__name__}: {str(e)[:300]}'}
    record['part_s'] = time.perf_counter() - part_start
    report.add(record)
    print(f"[{time.perf_counter() - start:4.0f} s] {name}: "
          f"{record.get('error') or record.get('skipped') or 'done'}", flush=True)
  print(markdown(report.parts))
  print(f'Wrote {os.path.join(report.out_dir, "device_check.json")} in '
        f'{time.perf_counter() - start:.0f} s.')


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(main)
