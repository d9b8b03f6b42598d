"""What an evaluation evaluates, checked before anything is compiled.

`prepare(config, workdir, step, mesh)` validates the evaluation config (configs/eval.py), finds
the checkpoint and reads its metadata (the model, image size and pretraining config), opens the
labelled train and test splits and picks the labelled subset; `load_encoder` then restores the
encoder (or builds a random one, or none for raw pixels).
"""

import dataclasses
import functools
import json
import os

import jax
import ml_collections
import numpy as np

from simclr_jax import checkpointing
from simclr_jax import data
from simclr_jax import distributed
from simclr_jax import errors
from simclr_jax import mesh as mesh_lib
from simclr_jax import models
from simclr_jax import train_state as train_state_lib

PROTOCOLS = ('linear', 'linear_features', 'knn', 'finetune', 'distill')
TRAINED_PROTOCOLS = ('linear', 'finetune', 'distill')  # Train a classifier.
FEATURES = ('encoder', 'pixels')
OPTIMIZERS = ('momentum', 'lars')
FEATURE_NORMS = ('none', 'batchnorm')  # Of the linear protocol's features.
# Official semi-supervised subsets (S4L's lists, as the SimCLR papers use): TFDS datasets.
OFFICIAL_SUBSETS = {('imagenet2012', 0.01): 'imagenet2012_subset/1pct',
                    ('imagenet2012', 0.1): 'imagenet2012_subset/10pct'}


@dataclasses.dataclass(frozen=True)
class Task:
  """The data side of an evaluation."""
  train: data.Split                   # Labelled training examples (classifier, kNN bank).
  test: data.Split
  num_classes: int
  label_subset: str                   # How the labelled examples were chosen.
  train_ids: np.ndarray | None = None  # Example ids of a labelled fraction; None: all of train.

  @property
  def num_train_examples(self) -> int:
    return self.train.num_examples if self.train_ids is None else len(self.train_ids)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """An evaluation, checked: what to evaluate, on which data, and where its results go."""
  config: ml_collections.ConfigDict      # The evaluation config.
  workdir: str
  name: str                               # Of the result files (`result_name`).
  run_config: ml_collections.ConfigDict  # The pretraining config of the run.
  saved: checkpointing.SavedRun | None    # The checkpoint; None for random_init and pixels.
  task: Task
  student: 'Student | None' = None        # distill only.
  save_to: str | None = None              # Workdir the trained network is saved to.

  @property
  def image_size(self) -> int:
    return self.task.train.config.image_size


@dataclasses.dataclass(frozen=True)
class Student:
  """The student of distillation: a run to start from, or the model config of a random one."""
  saved: checkpointing.SavedRun | None
  model_config: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Encoder:
  """What maps images to features: a restored or random model, or nothing (raw pixels)."""
  model: models.SimCLRModel | None
  variables: dict                         # {'params', 'batch_stats'}, replicated; {} for pixels.
  step: int                               # Pretraining step of the checkpoint; 0 without one.


def label_fraction(config: ml_collections.ConfigDict) -> float:
  """Fraction of train_split's labels the protocol trains on (all for the others; distillation
  uses every image, without its label)."""
  if config.protocol not in TRAINED_PROTOCOLS:
    return 1.0
  return config[config.protocol].get('label_fraction', 1.0)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError when the evaluation config's switches do not make sense together."""
  if config.protocol not in PROTOCOLS:
    raise errors.UserError(f'Unknown protocol {config.protocol!r}; expected one of {PROTOCOLS}.')
  if config.features not in FEATURES:
    raise errors.UserError(f'Unknown features {config.features!r}; expected one of {FEATURES}.')
  if config.protocol == 'distill' and config.random_init:
    raise errors.UserError('--config.random_init=True has no teacher to distill; give the '
                           '--workdir of a run with a classifier.')
  if config.features == 'pixels' and (config.protocol in TRAINED_PROTOCOLS or config.random_init):
    raise errors.UserError('--config.features=pixels works with the linear_features and knn '
                           'protocols, without random_init.')
  if config.protocol in TRAINED_PROTOCOLS:
    cfg = config[config.protocol]
    if cfg.optimizer not in OPTIMIZERS:
      raise errors.UserError(f'Unknown optimizer {cfg.optimizer!r}; expected one of '
                             f'{OPTIMIZERS}.')
    if not 0 < label_fraction(config) <= 1:
      raise errors.UserError(f'label_fraction must be in (0, 1], got {label_fraction(config)}.')
    if cfg.num_epochs <= 0:
      raise errors.UserError(f'{config.protocol}.num_epochs must be positive, got '
                             f'{cfg.num_epochs}.')
  if config.linear.feature_norm not in FEATURE_NORMS:
    raise errors.UserError(f'Unknown linear.feature_norm {config.linear.feature_norm!r}; '
                           f'expected one of {FEATURE_NORMS}.')
  if config.protocol == 'distill':
    cfg = config.distill
    if cfg.temperature <= 0:
      raise errors.UserError(f'distill.temperature must be positive, got {cfg.temperature}.')
    if cfg.student_workdir and (cfg.student_depth or cfg.student_width_multiplier):
      raise errors.UserError('distill.student_workdir gives the student its architecture; leave '
                             'distill.student_depth and student_width_multiplier unset.')


def result_name(config: ml_collections.ConfigDict, run_dataset: str | None,
                step: int | None = None) -> str:
  """protocol[_bn][_<p>pct][_on_<dataset>][_random_init|_pixels][_step<N>]: _bn for the linear
  classifier on batch-normalised features, <p>% labels (linear, finetune), <dataset> if not the
  run's own, <N> for an explicitly requested step."""
  name, fraction = config.protocol, label_fraction(config)
  if config.protocol == 'linear' and config.linear.feature_norm == 'batchnorm':
    name += '_bn'
  if fraction < 1:
    name += f'_{100 * fraction:g}pct'
  if config.data.dataset and config.data.dataset != run_dataset:
    name += f'_on_{config.data.dataset}'
  if config.features == 'pixels':
    name += '_pixels'
  elif config.random_init:
    name += '_random_init'
  return name if step is None else f'{name}_step{step}'


def read_config_json(workdir: str) -> ml_collections.ConfigDict:
  """The pretraining config that run_pretrain.py wrote to workdir/config.json."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    raise errors.UserError(f'--workdir={workdir} is missing or empty; give the --workdir of a '
                           'pretraining run.')
  if not os.path.exists(path):
    raise errors.UserError(f'{workdir} has no config.json, so it is not a pretraining workdir.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def eval_data_config(config: ml_collections.ConfigDict,
                     run_config: ml_collections.ConfigDict,
                     image_size: int) -> ml_collections.ConfigDict:
  """The run's data settings with the evaluation's overrides (None keeps the run's)."""
  data_config = run_config.data.copy_and_resolve_references()
  for key, value in config.data.items():
    if value is not None:
      data_config[key] = value
  if config.data.dataset and config.data.dataset != run_config.data.dataset:
    data_config.data_dir = config.data.data_dir  # A transfer dataset: not the run's data_dir.
  data_config.image_size = config.data.image_size or image_size
  return data_config


def label_fraction_indices(labels: np.ndarray, fraction: float, num_classes: int,
                           seed: int) -> np.ndarray:
  """Sorted indices of a class-balanced subset of round(fraction * len(labels)) examples.

  Every class gets the same number of examples, or one more (as ImageNet's 1% subset); which
  classes get one more and which examples are taken is fixed by `seed`.
  """
  total = int(round(fraction * len(labels)))
  per_class, extra = divmod(total, num_classes)
  if per_class == 0:
    raise errors.UserError(
        f'label_fraction={fraction} keeps {total} of {len(labels)} examples, which leaves some of '
        f'the {num_classes} classes empty; use at least {num_classes / len(labels):.3g}.')
  rng = np.random.default_rng(seed)
  quota = np.full(num_classes, per_class)
  quota[rng.permutation(num_classes)[:extra]] += 1
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < quota[c]:
      raise errors.UserError(
          f'Class {c} has {len(members)} examples, fewer than the {quota[c]} a class-balanced '
          f'label_fraction={fraction} needs; use a smaller fraction.')
    chosen.append(rng.permutation(members)[:quota[c]])
  return np.sort(np.concatenate(chosen))


def prepare_task(config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
                 purpose: str) -> Task:
  """Opens the labelled train and test splits and chooses the labelled subset."""
  fraction = label_fraction(config)
  train_config = data_config
  official = OFFICIAL_SUBSETS.get((data_config.dataset, fraction))
  if official and data_config.train_split == 'train':
    train_config = data_config.copy_and_resolve_references()
    train_config.dataset = official
  distributed.process_0_first(data.prepare, train_config)
  train = data.open_split(train_config, train_config.train_split)
  test = data.open_split(data_config, data_config.eval_split)
  data.check_labelled(train, purpose)
  data.check_labelled(test, purpose)
  if official:
    subset = f'official list ({official})'
  else:
    subset = 'all' if fraction == 1 else f'class-balanced draw, seed {config.seed}'
  train_ids = None
  if fraction < 1 and not official:
    ids, labels = data.example_labels(train)
    train_ids = ids[label_fraction_indices(labels, fraction, train.num_classes, config.seed)]
  task = Task(train, test, train.num_classes, subset, train_ids)
  if config.protocol in TRAINED_PROTOCOLS and task.num_train_examples < config.batch_size:
    raise errors.UserError(f'{task.num_train_examples} labelled training examples make no batch '
                           f'of {config.batch_size}; lower --config.batch_size.')
  return task


def _check_proj_layers(config: ml_collections.ConfigDict,
                       model_config: ml_collections.ConfigDict) -> None:
  if config.protocol not in ('finetune', 'distill'):
    return
  hidden = models.create_model(model_config).head.num_hidden_layers
  proj_layers = config[config.protocol].proj_layers
  if not 0 <= proj_layers <= hidden:
    raise errors.UserError(f'{config.protocol}.proj_layers={proj_layers}, but the '
                           f'projection head has {hidden} hidden layers to keep.')


def save_to(config: ml_collections.ConfigDict, workdir: str, name: str) -> str | None:
  """Where the protocol saves its trained network (distill always, finetune on request)."""
  if config.protocol == 'finetune':
    return config.finetune.save_to
  if config.protocol == 'distill':
    return config.distill.save_to or os.path.join(workdir, 'eval', name, 'student')
  return None


def prepare_student(config: ml_collections.ConfigDict, saved: checkpointing.SavedRun,
                    num_classes: int) -> Student:
  """The student of distillation, checked against the teacher run `saved`."""
  if saved.meta['num_classes'] != num_classes:
    raise errors.UserError(f'The teacher {saved.workdir} has a classifier of '
                           f'{saved.meta["num_classes"] or "no"} classes, the data '
                           f'{num_classes}; give the workdir of a fine-tuned run '
                           '(--config.finetune.save_to) or a converted fine-tuned checkpoint.')
  cfg = config.distill
  if cfg.student_workdir:
    student = checkpointing.open_saved_run(cfg.student_workdir)
    return Student(student, student.model_config)
  model_config = saved.model_config.copy_and_resolve_references()
  model_config.depth = cfg.student_depth or model_config.depth
  model_config.width_multiplier = cfg.student_width_multiplier or model_config.width_multiplier
  models.create_model(model_config)  # UserError for an unknown depth.
  return Student(None, model_config)


def prepare(config: ml_collections.ConfigDict, workdir: str, step: int | None,
            mesh: jax.sharding.Mesh) -> Evaluation:
  """Every check that needs no compilation; raises UserError for anything a user can fix."""
  check_config(config)
  mesh_lib.check_global_batch_size(config.batch_size, mesh)
  saved = None
  if config.random_init or config.features == 'pixels':
    run_config = read_config_json(workdir)
    image_size = run_config.data.image_size
  else:
    saved = checkpointing.open_saved_run(workdir, step)
    run_config, image_size = saved.config, saved.meta['image_size']
  data_config = eval_data_config(config, run_config, image_size)
  task = prepare_task(config, data_config, f'the {config.protocol} protocol')
  student = None
  if config.protocol == 'distill':
    student = prepare_student(config, saved, task.num_classes)
  _check_proj_layers(config, student.model_config if student else run_config.model)
  name = result_name(config, run_config.data.dataset, step)
  target = save_to(config, workdir, name)
  if target:
    checkpointing.check_new_workdir(target, f'--config.{config.protocol}.save_to')
  return Evaluation(config, workdir, name, run_config, saved, task, student, target)


def load_encoder(evaluation: Evaluation, mesh: jax.sharding.Mesh) -> Encoder:
  """The checkpoint's model restored replicated onto `mesh`, a random one, or none (pixels)."""
  config = evaluation.config
  if config.features == 'pixels':
    return Encoder(None, {}, 0)
  if config.random_init:
    return random_encoder(evaluation.run_config.model, evaluation.image_size, config.seed, mesh)
  return restore_encoder(evaluation.saved, mesh)


def random_encoder(model_config: ml_collections.ConfigDict, image_size: int, seed: int,
                   mesh: jax.sharding.Mesh) -> Encoder:
  """An untrained model of `model_config`, initialised from `seed`, replicated onto `mesh`."""
  model = models.create_model(model_config)
  init = functools.partial(train_state_lib.init_variables, model, image_size=image_size)
  return Encoder(model, jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(
      jax.random.key(seed)), 0)


def load_student(evaluation: Evaluation, mesh: jax.sharding.Mesh) -> Encoder:
  """The student of distillation: restored from its run, or randomly initialised (`seed`)."""
  student = evaluation.student
  if student.saved is not None:
    return restore_encoder(student.saved, mesh)
  return random_encoder(student.model_config, evaluation.image_size, evaluation.config.seed,
                        mesh)


def restore_encoder(saved: checkpointing.SavedRun, mesh: jax.sharding.Mesh) -> Encoder:
  """The model a checkpoint holds (from its metadata alone), restored replicated onto `mesh`."""
  model = models.create_model(saved.model_config, num_classes=saved.meta['num_classes'])
  init = functools.partial(train_state_lib.init_variables, model,
                           image_size=saved.meta['image_size'])
  abstract = checkpointing.abstract_like(jax.eval_shape(init, jax.random.key(0)),
                                         mesh_lib.replicated(mesh))
  return Encoder(model, saved.checkpointer.restore_model(saved.step, abstract), saved.step)
