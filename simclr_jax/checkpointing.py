"""Orbax checkpoints of a run in `workdir/checkpoints/<step>/`, and the metadata they carry.

Each checkpoint has three items, so evaluation restores the encoder without the optimizer:
  model: {'params', 'batch_stats'}   train: {'opt_state', 'step', 'rng'}   meta: JSON
The metadata (`run_metadata`) is the single record of what a checkpoint holds: the model config,
image size, class count, dataset and the whole pretraining config. Resuming checks it
(`check_resumable`), and evaluation rebuilds the model from it alone.
Every process calls every method (Orbax coordinates multi-host writes).
"""

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from simclr_jax import errors
from simclr_jax import train_state as train_state_lib


def checkpoint_dir(workdir: str) -> str:
  """`workdir/checkpoints`, absolute unless it is a URL such as gs://bucket/run."""
  return os.path.join(workdir if '://' in workdir else os.path.abspath(workdir), 'checkpoints')


def run_metadata(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """What a pretraining checkpoint holds, and the config that trained it."""
  return {'model': config.model.to_dict(), 'image_size': config.data.image_size,
          'num_classes': num_classes, 'dataset': config.data.dataset,
          'config': config.to_dict()}


def check_new_workdir(workdir: str, flag: str) -> None:
  """Raises UserError if `workdir` already holds checkpoints (a network is saved only into a new
  workdir)."""
  if os.path.isdir(checkpoint_dir(workdir)) and os.listdir(checkpoint_dir(workdir)):
    raise errors.UserError(f'{flag}={workdir} already holds checkpoints; give a new directory.')


def save_network(workdir: str, config: ml_collections.ConfigDict, num_classes: int,
                 variables: dict, step: int, **extra_meta) -> None:
  """Writes `workdir` as a run that holds one network and no optimizer state: config.json and a
  checkpoint of `variables` ({'params', 'batch_stats'} of models.create_model(config.model,
  num_classes)) at `step`, which evaluation and the tools restore like a pretraining run."""
  check_new_workdir(workdir, 'workdir')
  checkpointer = Checkpointer(workdir, max_to_keep=1)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  state = train_state_lib.TrainState(
      step=np.int32(step), params=variables['params'], batch_stats=variables['batch_stats'],
      opt_state={}, rng=jax.random.key_data(jax.random.key(0)))
  checkpointer.save(state, {**run_metadata(config, num_classes), **extra_meta})
  checkpointer.wait_until_finished()
  checkpointer.close()


def check_resumable(saved: dict, meta: dict, step: int, workdir: str) -> None:
  """Raises UserError unless a run with metadata `meta` can continue the checkpoint `saved`."""
  fields = [f'model.{k}' for k in sorted(set(saved['model']) | set(meta['model']))
            if saved['model'].get(k) != meta['model'].get(k)]
  fields += [k for k in ('image_size', 'num_classes') if saved.get(k) != meta.get(k)]
  if fields:
    values = '; '.join(f'{k}: checkpoint {_lookup(saved, k)!r}, now {_lookup(meta, k)!r}'
                       for k in fields)
    raise errors.UserError(f'{workdir} holds a checkpoint (step {step}) of a different model '
                           f'({values}). Use a new --workdir, or the config that wrote it.')


def _lookup(meta: dict, dotted: str):
  value = meta
  for part in dotted.split('.'):
    value = value.get(part) if isinstance(value, dict) else None
  return value


def abstract_like(tree: Any, sharding) -> Any:
  """ShapeDtypeStructs carrying `sharding`, so Orbax restores straight onto the mesh."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """Saves and restores `TrainState`s and their run metadata."""

  def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state: train_state_lib.TrainState, meta: dict) -> None:
    step = int(jax.device_get(state.step))
    self._manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave({'params': state.params, 'batch_stats': state.batch_stats}),
        train=ocp.args.StandardSave(
            {'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng}),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_model(self, step: int, abstract_model: dict | None) -> dict:
    """Restores {'params', 'batch_stats'} into the shapes/shardings of `abstract_model`."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model)))
    return restored.model

  def restore(self, step: int,
              abstract_state: train_state_lib.TrainState) -> train_state_lib.TrainState:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(
            {'params': abstract_state.params, 'batch_stats': abstract_state.batch_stats}),
        train=ocp.args.StandardRestore({'opt_state': abstract_state.opt_state,
                                        'step': abstract_state.step,
                                        'rng': abstract_state.rng})))
    return train_state_lib.TrainState(
        step=restored.train['step'], params=restored.model['params'],
        batch_stats=restored.model['batch_stats'], opt_state=restored.train['opt_state'],
        rng=restored.train['rng'])

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """A checkpoint chosen for evaluation: its step and metadata, and how to restore its model."""
  workdir: str
  step: int
  meta: dict
  checkpointer: Checkpointer

  @property
  def model_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.meta['model'])

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The pretraining config that wrote the checkpoint."""
    return ml_collections.ConfigDict(self.meta['config'])


def open_saved_run(workdir: str, step: int | None = None) -> SavedRun:
  """The checkpoint of `step` (default: the latest) in `workdir`; UserError if there is none."""
  if not os.path.isdir(workdir) and '://' not in workdir:
    raise errors.UserError(f'--workdir={workdir} does not exist; give the --workdir of a '
                           'pretraining run.')
  checkpointer = Checkpointer(workdir, create=False)
  steps = checkpointer.all_steps()
  if not steps:
    raise errors.UserError(f'No checkpoint in {checkpointer.directory}; pretrain first, or '
                           'evaluate an untrained encoder with --config.random_init=True.')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise errors.UserError(f'No checkpoint of step {step} in {checkpointer.directory}; '
                           f'available steps: {", ".join(map(str, steps))}.')
  meta = checkpointer.restore_meta(step)
  if 'config' not in meta:
    raise errors.UserError(f'The checkpoint of step {step} in {checkpointer.directory} was '
                           'written by an older simclr_jax without its config; evaluate it with '
                           'that version.')
  return SavedRun(workdir, step, meta, checkpointer)
