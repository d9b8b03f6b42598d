"""Process-0 metric logging: `workdir/metrics.jsonl`, TensorBoard events, a console line."""

import json
import os
import time

import jax
import numpy as np
from absl import logging
from etils import epath


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends one JSON object per `write` call; writes nothing on processes other than 0.

  A run resumed from step `after_step` first drops the rows of later steps, which the
  interrupted run logged after its last checkpoint, so every step appears once.
  """

  def __init__(self, workdir: str, filename: str = 'metrics.jsonl', tensorboard_subdir='tb',
               after_step: int | None = None):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    self.path = epath.Path(workdir) / filename
    if after_step is not None and self.path.exists():
      drop_rows_after(self.path, after_step)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Process 0 only.
    except ImportError:  # A TF-free install (the memory source): metrics.jsonl alone.
      logging.info('No TensorFlow: no TensorBoard events, only %s.', self.path)
      self._summary = None
      return
    self._tf = tf
    self._summary = tf.summary.create_file_writer(os.path.join(workdir, tensorboard_subdir))

  def write(self, step: int, metrics: dict) -> dict:
    """Writes scalar `metrics` at `step`; returns them as Python numbers."""
    record = {'step': int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    if not self._enabled:
      return record
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    if self._summary is None:
      return record
    with self._summary.as_default(step=int(step)):
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)):
          self._tf.summary.scalar(key, value)
    self._summary.flush()
    return record


def drop_rows_after(path: epath.Path, step: int) -> None:
  """Rewrites the JSON-lines file `path` (atomically) without its rows of steps after `step`,
  and without torn lines (a kill in mid-write)."""
  kept = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if row.get('step', 0) <= step:
      kept.append(line + '\n')
  temporary = path.parent / f'.{path.name}.tmp'
  temporary.write_text(''.join(kept))
  temporary.replace(path)


class Progress:
  """Throughput and ETA between calls, measured on the host."""

  def __init__(self, first_step: int, total_steps: int, examples_per_step: int):
    self._total_steps = total_steps
    self._examples_per_step = examples_per_step
    self._start = self._last = (first_step, time.perf_counter())

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    last_step, last_time = self._last
    first_step, first_time = self._start
    self._last = (step, now)
    rate = (step - last_step) / max(now - last_time, 1e-9)
    overall = (step - first_step) / max(now - first_time, 1e-9)
    eta = (self._total_steps - step) / max(overall, 1e-9)
    return {'steps_per_sec': rate, 'images_per_sec': rate * self._examples_per_step,
            'eta_seconds': eta}


def log_progress(step: int, total_steps: int, record: dict) -> None:
  eta = int(record.get('eta_seconds', 0))
  shown = ', '.join(f'{k}={v:.4g}' for k, v in record.items()
                    if isinstance(v, float) and k not in ('eta_seconds', 'steps_per_sec'))
  logging.info('step %d/%d  %s  ETA %dh%02dm%02ds', step, total_steps, shown,
               eta // 3600, eta % 3600 // 60, eta % 60)
