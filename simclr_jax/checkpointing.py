"""Orbax checkpoints of a pretraining run, in `workdir/checkpoints/<step>/`.

Each checkpoint has three items so evaluation can restore the encoder without the optimizer:
  model: {'params', 'batch_stats'}   train: {'opt_state', 'step', 'rng'}   meta: JSON
Every process calls every method (Orbax coordinates multi-host writes).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from simclr_jax import train_state as train_state_lib


def checkpoint_dir(workdir: str) -> str:
  """`workdir/checkpoints`, absolute unless it is a URL such as gs://bucket/run."""
  return os.path.join(workdir if '://' in workdir else os.path.abspath(workdir), 'checkpoints')


def abstract_like(tree: Any, sharding) -> Any:
  """ShapeDtypeStructs carrying `sharding`, so Orbax restores straight onto the mesh."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """Saves and restores `TrainState`s and their run metadata."""

  def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: train_state_lib.TrainState, meta: dict) -> None:
    step = int(jax.device_get(state.step))
    self._manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave({'params': state.params, 'batch_stats': state.batch_stats}),
        train=ocp.args.StandardSave(
            {'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng}),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_model(self, step: int, abstract_model: dict) -> dict:
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
