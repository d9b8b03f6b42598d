"""Orbax checkpoints of a run in `workdir/checkpoints/<step>/`, and the metadata they carry.

Each checkpoint has three items, so evaluation restores the encoder without the optimizer:
  model: {'params', 'batch_stats'}   train: {'opt_state', 'step', 'rng'}   meta: JSON
The metadata (`run_metadata`) is the single record of what a checkpoint holds: the model config,
image size, class count, dataset and the whole pretraining config. Resuming checks it
(`check_resumable`), and evaluation rebuilds the model from it alone.

Every checkpoint is sealed once written: `checkpoints/<step>.sha256.json` holds the SHA-256 of
every file of `<step>/`. Only a step whose files match it is intact (`latest_intact_step`); a
torn, truncated or altered checkpoint is reported and passed over. (Checkpoints of a directory
without any seal, written before there were seals, are used unverified.)
Every process calls every method (Orbax coordinates multi-host writes).
"""

import dataclasses
import errno
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from simclr_jax import errors
from simclr_jax import train_state as train_state_lib


CHECKSUM_SUFFIX = '.sha256.json'


def checkpoint_dir(workdir: str) -> str:
  """`workdir/checkpoints`, absolute unless it is a URL such as gs://bucket/run."""
  return os.path.join(workdir if '://' in workdir else os.path.abspath(workdir), 'checkpoints')


def check_workdir(workdir: str) -> None:
  """Raises UserError unless `workdir` is, or can be made, a writable directory (URLs pass)."""
  if '://' in workdir:
    return
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise errors.UserError(f'--workdir={workdir}: {existing} is a file, not a directory; '
                           'give a directory.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.UserError(f'--workdir={workdir}: {existing} is not writable; give a directory '
                           'you can write.')


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


# Config fields a resumed run may change: they alter no update, only how often things are logged,
# checkpointed and monitored, and where the same data is read from.
BOOKKEEPING_FIELDS = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                      'eval_every_steps', 'monitor', 'data.data_dir', 'data.prefetch_batches')


def check_resumable(saved: dict, meta: dict, step: int, workdir: str,
                    allow_config_change: bool = False) -> list[str]:
  """Raises UserError unless a run with metadata `meta` can continue the checkpoint `saved`.

  A different model never can; a different training config (anything but BOOKKEEPING_FIELDS)
  only with `allow_config_change`. Returns the changed training fields and their two values.
  """
  fields = _differing(saved['model'], meta['model'], 'model.')
  fields += [k for k in ('image_size', 'num_classes') if saved.get(k) != meta.get(k)]
  if fields:
    raise errors.UserError(f'{workdir} holds a checkpoint (step {step}) of a different model '
                           f'({"; ".join(_changes(saved, meta, fields))}). Use a new '
                           '--workdir, or the config that wrote it.')
  if 'config' not in saved:  # Written before checkpoints carried their config.
    return []
  # Fields added to (or removed from) the config since the checkpoint was written do not count:
  # a new field's default keeps the old behaviour.
  fields = [k for k in _differing(saved['config'], _as_json(meta['config']), shared_only=True)
            if not k.startswith(('model.', *BOOKKEEPING_FIELDS))]
  changes = _changes(saved['config'], meta['config'], fields)
  if fields and not allow_config_change:
    raise errors.UserError(f'{workdir} holds a checkpoint (step {step}) trained with another '
                           f'config ({"; ".join(changes)}). Resume with the config that wrote '
                           'it, use a new --workdir, or pass --allow_config_change.')
  return changes


def _differing(old: dict, new: dict, prefix: str = '', shared_only: bool = False) -> list[str]:
  """Dotted names of the leaves that differ between two nested dicts (of the keys both have, if
  `shared_only`)."""
  names = []
  keys = set(old) & set(new) if shared_only else set(old) | set(new)
  for key in sorted(keys):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      names += _differing(a, b, f'{prefix}{key}.', shared_only)
    elif a != b:
      names.append(f'{prefix}{key}')
  return names


def _changes(old: dict, new: dict, fields: list[str]) -> list[str]:
  return [f'{k}: checkpoint {_lookup(old, k)!r}, now {_lookup(new, k)!r}' for k in fields]


def _as_json(tree: dict) -> dict:
  """`tree` as it reads back from a checkpoint's JSON metadata (tuples become lists)."""
  return json.loads(json.dumps(tree, default=str))


def _lookup(meta: dict, dotted: str):
  value = meta
  for part in dotted.split('.'):
    value = value.get(part) if isinstance(value, dict) else None
  return value


def _file_checksums(directory: epath.Path, prefix: str = '') -> dict[str, str]:
  """SHA-256 of every file below `directory`, by path relative to it."""
  checksums = {}
  for path in sorted(directory.iterdir()) if directory.exists() else ():
    if path.is_dir():
      checksums.update(_file_checksums(path, f'{prefix}{path.name}/'))
    else:
      digest = hashlib.sha256()
      with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          digest.update(chunk)
      checksums[prefix + path.name] = digest.hexdigest()
  return checksums


def _is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` or an exception it was raised from is ENOSPC (Orbax wraps errors)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    error = error.__cause__ or error.__context__
  return False


def abstract_like(tree: Any, sharding) -> Any:
  """ShapeDtypeStructs carrying `sharding`, so Orbax restores straight onto the mesh."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """Saves and restores `TrainState`s and their run metadata."""

  def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True):
    # Synchronous saves: a save is sealed (checksummed) as soon as it is written, and a failed
    # one raises here rather than in a thread the interpreter would wait for at exit. A writer
    # (create=True) removes the temporary directories of saves that never finished.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           cleanup_tmp_directories=create,
                                           enable_async_checkpointing=False)
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state: train_state_lib.TrainState, meta: dict) -> None:
    """Writes and seals the checkpoint of `state.step`; UserError when the disk is full."""
    step = int(jax.device_get(state.step))
    try:
      self._manager.save(step, args=ocp.args.Composite(
          model=ocp.args.StandardSave({'params': state.params, 'batch_stats': state.batch_stats}),
          train=ocp.args.StandardSave(
              {'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng}),
          meta=ocp.args.JsonSave(meta)), force=True)
      self._manager.wait_until_finished()
      if jax.process_index() == 0:
        self._seal(step)
    except Exception as e:  # pylint: disable=broad-except  # Orbax wraps I/O errors variously.
      if not _is_disk_full(e):
        raise
      if jax.process_index() == 0:
        for partial in epath.Path(self.directory).glob(f'{step}.orbax-checkpoint-tmp*'):
          partial.rmtree(missing_ok=True)
      raise errors.UserError(
          f'No space left on the disk of {self.directory} while saving step {step}; the last '
          f'intact checkpoint is step {self.latest_intact_step(quiet=True)}. Free space and rerun '
          'the same command to resume.') from None

  def _checksum_path(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / f'{step}{CHECKSUM_SUFFIX}'

  def _seal(self, step: int) -> None:
    """Writes the checksums of step `step` (atomically), and drops those of deleted steps."""
    path = self._checksum_path(step)
    temporary = path.parent / f'.{path.name}.tmp'
    temporary.write_text(json.dumps(_file_checksums(self._step_path(step)), indent=1))
    temporary.replace(path)
    kept = {f'{s}{CHECKSUM_SUFFIX}' for s in self._manager.all_steps()}
    for stale in epath.Path(self.directory).glob(f'*{CHECKSUM_SUFFIX}'):
      if stale.name not in kept:
        stale.unlink(missing_ok=True)

  def _step_path(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def damage(self, step: int) -> str | None:
    """Why the checkpoint of `step` is not intact (naming the file), or None if it is."""
    path = self._checksum_path(step)
    try:
      expected = json.loads(path.read_text())
    except FileNotFoundError:
      if not any(epath.Path(self.directory).glob(f'*{CHECKSUM_SUFFIX}')):
        logging.log_first_n(logging.WARNING, 'The checkpoints in %s have no checksums (written '
                            'before simclr_jax sealed them); they are used unverified.', 1,
                            self.directory)
        return None
      return f'{path} is missing: the save of step {step} did not finish'
    except (OSError, ValueError) as e:
      return f'{path} is unreadable ({e})'
    actual = _file_checksums(self._step_path(step))
    for name in sorted(set(expected) | set(actual)):
      if name not in actual:
        return f'{self._step_path(step) / name} is missing'
      if expected.get(name) != actual[name]:
        return f'{self._step_path(step) / name} does not match its checksum'
    return None

  def latest_intact_step(self, quiet: bool = False) -> int | None:
    """The newest step whose files match their checksums; warns about each newer damaged one."""
    for step in reversed(self.all_steps()):
      problem = self.damage(step)
      if problem is None:
        return step
      if not quiet:
        logging.warning('Passing over the checkpoint of step %d: %s.', step, problem)
    return None

  def require_intact_step(self, advice: str) -> int | None:
    """The newest intact step, None without checkpoints; UserError (ending with `advice`) when
    there are checkpoints but none is intact."""
    latest = self.latest_intact_step()
    if latest is None and self.all_steps():
      raise errors.UserError(f'No intact checkpoint in {self.directory} (steps '
                             f'{", ".join(map(str, self.all_steps()))}; see the warnings above); '
                             f'{advice}.')
    return latest

  def set_aside(self, step: int) -> None:
    """Renames a damaged step directory to `<step>.damaged`, so a resumed run can save it anew."""
    if jax.process_index() == 0:
      target = self._step_path(step).parent / f'{step}.damaged'
      target.rmtree(missing_ok=True)  # An older damaged copy of the same step.
      self._step_path(step).rename(target)
      self._checksum_path(step).unlink(missing_ok=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set aside step {step}')
    self._manager.reload()

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
  """The intact checkpoint of `step` (default: the latest intact one) in `workdir`; UserError if
  there is none."""
  if not os.path.isdir(workdir) and '://' not in workdir:
    raise errors.UserError(f'--workdir={workdir} does not exist; give the --workdir of a '
                           'pretraining run.')
  checkpointer = Checkpointer(workdir, create=False)
  steps = checkpointer.all_steps()
  if not steps:
    raise errors.UserError(f'No checkpoint in {checkpointer.directory}; pretrain first, or '
                           'evaluate an untrained encoder with --config.random_init=True.')
  if step is None:
    step = checkpointer.require_intact_step('evaluate another run')
  elif step not in steps:
    raise errors.UserError(f'No checkpoint of step {step} in {checkpointer.directory}; '
                           f'available steps: {", ".join(map(str, steps))}.')
  elif problem := checkpointer.damage(step):
    raise errors.UserError(f'The checkpoint of step {step} is damaged: {problem}.')
  meta = checkpointer.restore_meta(step)
  if 'config' not in meta:
    raise errors.UserError(f'The checkpoint of step {step} in {checkpointer.directory} was '
                           'written by an older simclr_jax without its config; evaluate it with '
                           'that version.')
  return SavedRun(workdir, step, meta, checkpointer)
