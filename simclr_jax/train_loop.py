"""The training loop shared by pretraining, classifier training and the benchmark.

It runs a jitted step over a batch iterator and does the periodic work around it: averaged
metrics every `log_every_steps` (with a finiteness check), evaluations whose results join that
step's record, actions such as checkpoints, and an early stop on request. Every periodic hook
also runs at the last step and at a stop.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Metrics reported as the value of the last step of a logging interval, not the mean.
_LAST_VALUE_METRICS = ('learning_rate',)


@dataclasses.dataclass(frozen=True)
class Periodic:
  """fn(step, state) every `every_steps` steps (0: only at the end and at a stop)."""
  every_steps: int
  fn: Callable[[int, Any], Any]

  def due(self, step: int, final: bool) -> bool:
    return final or (self.every_steps > 0 and step % self.every_steps == 0)


@dataclasses.dataclass(frozen=True)
class Result:
  state: Any
  record: dict            # The last logged record ({} if nothing was logged).
  stopped_at: int | None  # The step of an early stop, None when the run reached its end.


def summarise(pending: list[dict]) -> dict:
  """Host-side means of the per-step metrics of a logging interval (one device->host copy)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending))
  return {k: float(v[-1] if k in _LAST_VALUE_METRICS else np.mean(v))
          for k, v in stacked.items()}


def run(state: Any, step_fn: Callable, batches: Iterator, *, first_step: int, last_step: int,
        log_every_steps: int, on_log: Callable[[int, dict], None],
        non_finite_message: Callable[[int, float], str],
        evaluations: tuple[Periodic, ...] = (), actions: tuple[Periodic, ...] = (),
        should_stop: Callable[[int], bool] = lambda step: False) -> Result:
  """Runs `state, metrics = step_fn(state, batch)` for steps first_step..last_step.

  At a logging step the metrics since the last one are averaged, the due `evaluations` add their
  dicts, a non-finite 'loss' raises FloatingPointError(non_finite_message(step, loss)), and
  `on_log(step, record)` gets the record; then the due `actions` run.
  """
  record, pending = {}, []
  for step in range(first_step, last_step + 1):
    state, metrics = step_fn(state, next(batches))
    pending.append(metrics)
    stopping = should_stop(step)
    final = stopping or step == last_step
    extra = {}
    for evaluation in evaluations:
      if evaluation.due(step, final):
        extra.update(evaluation.fn(step, state))
    if step % log_every_steps == 0 or final or extra:
      record = {**summarise(pending), **extra}
      pending = []
      if not np.isfinite(record['loss']):
        raise FloatingPointError(non_finite_message(step, record['loss']))
      on_log(step, record)
    for action in actions:
      if action.due(step, final):
        action.fn(step, state)
    if stopping:
      return Result(state, record, step)
  return Result(state, record, None)
