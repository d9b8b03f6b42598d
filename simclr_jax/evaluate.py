"""Evaluation of a pretraining run's encoder: linear probe, logistic regression, kNN, fine-tuning.

`evaluate(config, workdir, step)` (configs/eval.py) reads the run's config.json and an Orbax
checkpoint, checks everything it can before compiling anything, runs `config.protocol` with jitted
functions over global arrays on the device mesh, and writes on process 0:
  workdir/eval/<name>.json       the results (top1, top5, step, dataset, ...)
  workdir/eval/results.jsonl     one line per evaluation; TensorBoard scalars `<name>/top1` in
                                 workdir/eval/tb, at the pretraining step
  workdir/eval/<name>/           the classifier's training curve (linear, finetune)
with <name> = protocol[_<p>pct][_on_<dataset>][_random_init|_pixels][_step<N>] (`result_name`).
"""

import dataclasses
import functools
import itertools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from simclr_jax import checkpointing
from simclr_jax import data
from simclr_jax import distributed
from simclr_jax import knn
from simclr_jax import logistic_regression
from simclr_jax import mesh as mesh_lib
from simclr_jax import metrics_writer
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import train_state as train_state_lib

PROTOCOLS = ('linear', 'linear_features', 'knn', 'finetune')
_TRAINED_PROTOCOLS = ('linear', 'finetune')  # Train a classifier on (a fraction of) the labels.
_FEATURES = ('encoder', 'pixels')
_OPTIMIZERS = ('momentum', 'lars')


class SetupError(ValueError):
  """A bad workdir, checkpoint, config or dataset, found before anything is compiled."""


@dataclasses.dataclass(frozen=True)
class Task:
  """The data side of an evaluation."""
  data_config: ml_collections.ConfigDict  # The pretraining config with the evaluation's data.
  train_split: str
  eval_split: str
  num_classes: int
  num_train_examples: int
  train_ids: np.ndarray | None = None     # tfds_ids of a labelled fraction; None: all of train.


@dataclasses.dataclass(frozen=True)
class Encoder:
  """What maps images to features: a restored or random model, or nothing (raw pixels)."""
  model: models.SimCLRModel | None
  variables: dict                         # {'params', 'batch_stats'}, replicated; {} for pixels.
  step: int                               # Pretraining step of the checkpoint; 0 without one.


# Run and checkpoint.

def _label_fraction(config: ml_collections.ConfigDict) -> float:
  """Fraction of train_split's labels the protocol trains on (all for the untrained ones)."""
  return config[config.protocol].label_fraction if config.protocol in _TRAINED_PROTOCOLS else 1.0


def result_name(config: ml_collections.ConfigDict, run_dataset: str | None = None) -> str:
  """protocol[_<p>pct][_on_<dataset>][_random_init|_pixels], after checking that the switches
  make sense together: <p>% labels (linear, finetune), <dataset> if not the run's own."""
  if config.protocol not in PROTOCOLS:
    raise SetupError(f'Unknown protocol {config.protocol!r}; expected one of {PROTOCOLS}.')
  if config.features not in _FEATURES:
    raise SetupError(f'Unknown features {config.features!r}; expected one of {_FEATURES}.')
  if config.features == 'pixels' and (config.protocol in _TRAINED_PROTOCOLS or config.random_init):
    raise SetupError('--config.features=pixels works with the linear_features and knn '
                     'protocols, without random_init.')
  name, fraction = config.protocol, _label_fraction(config)
  if fraction < 1:
    name += f'_{100 * fraction:g}pct'
  if config.dataset and config.dataset != run_dataset:
    name += f'_on_{config.dataset}'
  if config.features == 'pixels':
    return f'{name}_pixels'
  return name + ('_random_init' if config.random_init else '')


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The pretraining config that run_pretrain.py wrote to workdir/config.json."""
  path = epath.Path(workdir)
  if not path.is_dir() or not any(path.iterdir()):
    raise SetupError(f'--workdir={workdir} is missing or empty; give the --workdir of a '
                     'pretraining run.')
  if not (path / 'config.json').exists():
    raise SetupError(f'{workdir} has no config.json, so it is not a pretraining workdir.')
  return ml_collections.ConfigDict(json.loads((path / 'config.json').read_text()))


def checkpoint_step(checkpointer: checkpointing.Checkpointer, step: int | None,
                    workdir: str) -> int:
  """`step`, or the latest one when None, after checking that it was saved."""
  steps = sorted(checkpointer.all_steps())
  where = checkpointing.checkpoint_dir(workdir)
  if not steps:
    raise SetupError(f'No checkpoint in {where}; pretrain first, or evaluate an untrained '
                     'encoder with --config.random_init=True.')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise SetupError(f'No checkpoint of step {step} in {where}; available steps: '
                     f'{", ".join(map(str, steps))}.')
  return step


def check_meta(meta: dict, run_config: ml_collections.ConfigDict, step: int, workdir: str):
  """The checkpoint must hold the model that config.json describes."""
  expected = run_config.model.to_dict()
  if meta['model'] != expected:
    details = '; '.join(f'{k}: checkpoint {meta["model"].get(k)!r} vs config.json '
                        f'{expected.get(k)!r}' for k in sorted(set(meta['model']) | set(expected))
                        if meta['model'].get(k) != expected.get(k))
    raise SetupError(f'The checkpoint of step {step} in {workdir} holds another model than '
                     f'its config.json ({details}).')


def open_checkpoint(workdir: str, step: int | None, run_config: ml_collections.ConfigDict):
  """(checkpointer, step, meta) of the checkpoint to evaluate, after checking it."""
  checkpointer = checkpointing.Checkpointer(workdir, create=False)
  step = checkpoint_step(checkpointer, step, workdir)
  meta = checkpointer.restore_meta(step)
  check_meta(meta, run_config, step, workdir)
  return checkpointer, step, meta


def abstract_variables(model: nn.Module, image_size: int) -> dict:
  init = functools.partial(train_state_lib.init_variables, model, image_size=image_size)
  return jax.eval_shape(init, jax.random.key(0))


def restore_encoder(checkpointer: checkpointing.Checkpointer, step: int, meta: dict,
                    mesh: jax.sharding.Mesh) -> Encoder:
  """The checkpoint's model and {'params', 'batch_stats'}, restored replicated onto `mesh`."""
  model = models.create_model(ml_collections.ConfigDict(meta['model']),
                              num_classes=meta['num_classes'])
  abstract = checkpointing.abstract_like(abstract_variables(model, meta['image_size']),
                                         mesh_lib.replicated(mesh))
  return Encoder(model, checkpointer.restore_model(step, abstract), step)


def random_encoder(model_config: ml_collections.ConfigDict, image_size: int, seed: int,
                   mesh: jax.sharding.Mesh) -> Encoder:
  """An untrained model of the same architecture (the random-initialisation baseline)."""
  model = models.create_model(model_config)
  init = functools.partial(train_state_lib.init_variables, model, image_size=image_size)
  variables = jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(jax.random.key(seed))
  return Encoder(model, variables, 0)


# Labelled subsets.

def label_fraction_indices(labels: np.ndarray, fraction: float, num_classes: int,
                           seed: int) -> np.ndarray:
  """Sorted indices of a class-balanced subset of round(fraction * len(labels)) examples.

  Every class gets the same number of examples, or one more (as ImageNet's 1% subset); which
  classes get one more and which examples are taken is fixed by `seed`.
  """
  total = int(round(fraction * len(labels)))
  per_class, extra = divmod(total, num_classes)
  if per_class == 0:
    raise SetupError(f'label_fraction={fraction} keeps {total} of {len(labels)} examples, which '
                     f'leaves some of the {num_classes} classes empty; use at least '
                     f'{num_classes / len(labels):.3g}.')
  rng = np.random.default_rng(seed)
  quota = np.full(num_classes, per_class)
  quota[rng.permutation(num_classes)[:extra]] += 1
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < quota[c]:
      raise SetupError(f'Class {c} has {len(members)} examples, fewer than the {quota[c]} a '
                       f'class-balanced label_fraction={fraction} needs; use a smaller fraction.')
    chosen.append(rng.permutation(members)[:quota[c]])
  return np.sort(np.concatenate(chosen))


# Metrics.

def count_correct(scores: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
  """Examples (mask True) whose label has the highest score / is among the 5 highest.

  top5 only when there are more than 5 classes. Ties go to the lower class index.
  """
  counts = {'count': jnp.sum(mask, dtype=jnp.int32)}
  for k in (1, 5):
    if k == 1 or scores.shape[-1] > k:
      top = jax.lax.top_k(scores, k)[1]
      hit = jnp.any(top == labels[:, None], axis=-1) & mask
      counts[f'top{k}'] = jnp.sum(hit, dtype=jnp.int32)
  return counts


def _accuracies(counts: dict) -> dict:
  counts = jax.device_get(counts)
  return {k: float(v) / max(int(counts['count']), 1) for k, v in counts.items() if k != 'count'}


def _add(total: dict | None, counts: dict) -> dict:
  return counts if total is None else jax.tree.map(jnp.add, total, counts)


# Features (linear_features, knn).

def feature_fn(encoder: Encoder):
  """(variables, images [B, H, W, 3]) -> features [B, F]: h, or the flattened pixels."""
  if encoder.model is None:
    return lambda variables, images: images.reshape(images.shape[0], -1)
  return functools.partial(encoder.model.apply, train=False, method=models.SimCLRModel.encode)


def extract_features(encoder: Encoder, batches, mesh: jax.sharding.Mesh) -> dict:
  """{'features', 'label', 'mask'} of all `batches`, as global arrays sharded over the mesh."""
  encode = jax.jit(feature_fn(encoder), out_shardings=mesh_lib.batch_sharded(mesh))
  features, labels, masks = [], [], []
  for batch in batches:  # Dispatch is asynchronous: the host prepares the next batch meanwhile.
    features.append(encode(encoder.variables, mesh_lib.to_global(batch['image'], mesh)))
    labels.append(batch['label'])
    masks.append(batch['mask'])
  local = [multihost_utils.global_array_to_host_local_array(f, mesh, P(mesh_lib.DATA_AXIS))
           for f in features]
  return mesh_lib.to_global({'features': np.concatenate([np.asarray(f) for f in local]),
                             'label': np.concatenate(labels), 'mask': np.concatenate(masks)},
                            mesh)


def _eval_batches(config, task: Task, split: str):
  return data.eval_batches(task.data_config, split, batch_size=config.batch_size)


def run_knn(config, task: Task, encoder: Encoder, mesh) -> dict:
  """Weighted kNN of every test example against the l2-normalised train features."""
  bank = extract_features(encoder, _eval_batches(config, task, task.train_split), mesh)
  bank['features'] = jax.jit(knn.l2_normalize)(bank['features'])

  def test_step(variables, bank, batch):
    scores = knn.class_scores(feature_fn(encoder)(variables, batch['image']), bank['features'],
                              bank['label'], bank['mask'], num_classes=task.num_classes,
                              k=config.knn.k, temperature=config.knn.temperature)
    return count_correct(scores, batch['label'], batch['mask'])

  test_step = jax.jit(test_step, out_shardings=mesh_lib.replicated(mesh))
  total = None
  for batch in mesh_lib.prefetch_to_device(_eval_batches(config, task, task.eval_split), mesh,
                                           config.prefetch_batches):
    total = _add(total, test_step(encoder.variables, bank, batch))
  return {**_accuracies(total), 'k': config.knn.k, 'temperature': config.knn.temperature}


def run_linear_features(config, task: Task, encoder: Encoder, mesh) -> dict:
  """Logistic regression on standardised features; L2 strength chosen on held-out train rows."""
  cfg = config.linear_features
  train = extract_features(encoder, _eval_batches(config, task, task.train_split), mesh)
  test = extract_features(encoder, _eval_batches(config, task, task.eval_split), mesh)
  weights = train['mask'].astype(jnp.float32)
  train_x, test_x = jax.jit(logistic_regression.standardize)(train['features'], weights,
                                                              test['features'])
  holdout = jax.jit(
      lambda key: jax.random.bernoulli(key, cfg.holdout_fraction, weights.shape),
      out_shardings=mesh_lib.batch_sharded(mesh))(jax.random.key(config.seed))
  params, l2, holdout_accuracy = logistic_regression.fit_with_l2_search(
      train_x, train['label'], weights, holdout, cfg.l2_grid, num_classes=task.num_classes,
      max_steps=cfg.max_steps)
  scores = logistic_regression.logits(params, test_x)
  counts = jax.jit(count_correct, out_shardings=mesh_lib.replicated(mesh))(
      scores, test['label'], test['mask'])
  return {**_accuracies(counts), 'l2': l2,
          'holdout_accuracy': {str(k): v for k, v in holdout_accuracy.items()}}


# Trained classifiers (linear, finetune).

def trunk_features(model, variables, images, *, train: bool, proj_layers: int = 0):
  """h, or the output of the first `proj_layers` projection layers (after their ReLU, as in
  SimCLR v2 fine-tuning); returns (features, new batch_stats)."""
  features, state = model.apply(variables, images, train=train, proj_layers=proj_layers,
                                method=models.SimCLRModel.encode, mutable=['batch_stats'])
  return features, state['batch_stats']


def linear_probe_logits(model):
  """logits_fn of the linear protocol: frozen encoder, BatchNorm in inference mode."""
  def logits_fn(params, batch_stats, frozen, images, train):
    del train
    h = model.apply(frozen, images, train=False, method=models.SimCLRModel.encode)
    return logistic_regression.logits(params['probe'], jax.lax.stop_gradient(h)), batch_stats
  return logits_fn


def finetune_logits(model, proj_layers: int):
  """logits_fn of fine-tuning: every parameter of the trunk trains, BatchNorm as `train` says."""
  def logits_fn(params, batch_stats, frozen, images, train):
    del frozen
    variables = {'params': {k: v for k, v in params.items() if k != 'probe'},
                 'batch_stats': batch_stats}
    features, batch_stats = trunk_features(model, variables, images, train=train,
                                           proj_layers=proj_layers)
    return logistic_regression.logits(params['probe'], features), batch_stats
  return logits_fn


def classifier_train_step(state: train_state_lib.TrainState, frozen: dict, batch: dict, *,
                          logits_fn, tx, schedule):
  """One step of softmax cross-entropy on {'image', 'label'}."""
  def loss_fn(params):
    logits, batch_stats = logits_fn(params, state.batch_stats, frozen, batch['image'], train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, ({'loss': loss, 'accuracy': accuracy}, batch_stats)

  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics['learning_rate'] = schedule(state.step)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state), metrics


def classifier_eval_step(state: train_state_lib.TrainState, frozen: dict, batch: dict, *,
                         logits_fn) -> dict:
  logits, _ = logits_fn(state.params, state.batch_stats, frozen, batch['image'], train=False)
  return count_correct(logits, batch['label'], batch['mask'])


def create_optimizer(cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int):
  """Nesterov momentum 0.9 with weight decay added to the gradient (an L2 term), or LARS;
  cosine decay, no warmup."""
  schedule = optim.learning_rate_schedule(cfg.learning_rate, batch_size, total_steps,
                                          warmup_steps=0, scaling=cfg.learning_rate_scaling)
  if cfg.optimizer == 'lars':  # The classifier is named 'probe', so LARS leaves it plain SGD.
    return optim.lars(schedule, cfg.weight_decay), schedule
  tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                   optax.sgd(schedule, momentum=0.9, nesterov=True))
  return tx, schedule


def _classifier_parts(config, encoder: Encoder):
  """(logits_fn, frozen variables, trainable trunk variables) of linear or finetune."""
  if config.protocol == 'linear':
    return linear_probe_logits(encoder.model), encoder.variables, {'params': {}}
  keep = ('encoder', 'head') if config.finetune.proj_layers else ('encoder',)
  trunk = {collection: {k: v for k, v in tree.items() if k in keep}
           for collection, tree in encoder.variables.items()}
  return finetune_logits(encoder.model, config.finetune.proj_layers), {}, trunk


def _num_features(config, encoder: Encoder, image_size: int) -> int:
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  features, _ = jax.eval_shape(
      functools.partial(trunk_features, encoder.model, train=False,
                        proj_layers=config[config.protocol].get('proj_layers', 0)),
      encoder.variables, images)
  return features.shape[-1]


def run_classifier(config, task: Task, encoder: Encoder, mesh, log_dir: str) -> dict:
  """linear or finetune: trains a zero-initialised linear classifier named 'probe' (and, for
  finetune, the trunk under it) on the labelled train examples, then tests it."""
  cfg = config[config.protocol]
  steps_per_epoch = data.steps_per_epoch(task.num_train_examples, config.batch_size)
  total_steps = max(int(round(cfg.num_epochs * steps_per_epoch)), 1)
  tx, schedule = create_optimizer(cfg, config.batch_size, total_steps)
  logits_fn, frozen, trunk = _classifier_parts(config, encoder)
  num_features = _num_features(config, encoder, task.data_config.image_size)
  replicated = mesh_lib.replicated(mesh)

  def create_state(trunk):
    params = {**trunk['params'], 'probe': {
        'kernel': jnp.zeros((num_features, task.num_classes), jnp.float32),
        'bias': jnp.zeros((task.num_classes,), jnp.float32)}}
    return train_state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=trunk.get('batch_stats', {}),
        opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(config.seed)))

  state = jax.jit(create_state, out_shardings=replicated)(trunk)
  step_fn = jax.jit(
      functools.partial(classifier_train_step, logits_fn=logits_fn, tx=tx, schedule=schedule),
      in_shardings=(replicated, replicated, mesh_lib.batch_sharded(mesh)),
      out_shardings=(replicated, replicated), donate_argnums=(0,))
  writer = metrics_writer.MetricWriter(log_dir)
  progress = metrics_writer.Progress(0, total_steps, config.batch_size)
  batches = mesh_lib.prefetch_to_device(
      itertools.islice(data.classifier_batches(
          task.data_config, task.train_split, batch_size=config.batch_size,
          num_examples=task.num_train_examples, tfds_ids=task.train_ids), total_steps),
      mesh, config.prefetch_batches)
  logging.info('Training the %s classifier: %d steps (%d per epoch) of batch %d.',
               config.protocol, total_steps, steps_per_epoch, config.batch_size)
  pending = []
  for step in range(1, total_steps + 1):
    state, metrics = step_fn(state, frozen, next(batches))
    pending.append(metrics)
    if step % config.log_every_steps == 0 or step == total_steps:
      record = metrics_writer.summarise(pending)
      pending = []
      if not np.isfinite(record['loss']):
        raise FloatingPointError(f'The {config.protocol} loss is {record["loss"]} at step '
                                 f'{step}; lower --config.{config.protocol}.learning_rate.')
      record.update(progress.update(step), epoch=step / steps_per_epoch)
      writer.write(step, record)
      metrics_writer.log_progress(step, total_steps, record)

  eval_fn = jax.jit(functools.partial(classifier_eval_step, logits_fn=logits_fn),
                    out_shardings=replicated)
  total = None
  for batch in mesh_lib.prefetch_to_device(_eval_batches(config, task, task.eval_split), mesh,
                                           config.prefetch_batches):
    total = _add(total, eval_fn(state, frozen, batch))
  return {**_accuracies(total), 'num_epochs': cfg.num_epochs, 'train_steps': total_steps,
          'label_fraction': cfg.label_fraction}


# Putting it together.

def _check_protocol_config(config, run_config):
  if config.protocol in _TRAINED_PROTOCOLS:
    cfg = config[config.protocol]
    if cfg.optimizer not in _OPTIMIZERS:
      raise SetupError(f'Unknown optimizer {cfg.optimizer!r}; expected one of {_OPTIMIZERS}.')
    if not 0 < cfg.label_fraction <= 1:
      raise SetupError(f'label_fraction must be in (0, 1], got {cfg.label_fraction}.')
  if config.protocol == 'finetune':
    model = run_config.model
    hidden = model.proj_num_layers - 1 if model.proj_mode == 'nonlinear' else 0
    if not 0 <= config.finetune.proj_layers <= hidden:
      raise SetupError(f'finetune.proj_layers={config.finetune.proj_layers}, but the projection '
                       f'head has {hidden} hidden layers to keep.')


def prepare_task(config, run_config, image_size: int) -> Task:
  """Data settings, class count and labelled subset; raises SetupError on a bad dataset."""
  data_config = run_config.copy_and_resolve_references()
  data_config.dataset = config.dataset or run_config.dataset
  data_config.data_dir = config.data_dir or run_config.data_dir
  data_config.image_size = image_size
  data_config.seed = config.seed
  dataset = data_config.dataset
  distributed.process_0_first(data.ensure_prepared, dataset, data_config.data_dir)
  num_classes = data.num_classes(dataset, data_config.data_dir)
  if not num_classes:
    raise SetupError(f'{dataset} has no labels; the {config.protocol} protocol needs a labelled '
                     'dataset (set --config.dataset).')
  eval_split = config.eval_split or run_config.eval_split
  data.num_examples(dataset, eval_split, data_config.data_dir)  # Checks that the split exists.
  num_train = data.num_examples(dataset, config.train_split, data_config.data_dir)
  train_ids = None
  fraction = _label_fraction(config)
  if fraction < 1:
    ids, labels = data.split_labels(data_config, config.train_split)
    train_ids = ids[label_fraction_indices(labels, fraction, num_classes, config.seed)]
    num_train = len(train_ids)
  if config.protocol in _TRAINED_PROTOCOLS and num_train < config.batch_size:
    raise SetupError(f'{num_train} labelled training examples make no batch of '
                     f'{config.batch_size}; lower --config.batch_size.')
  return Task(data_config, config.train_split, eval_split, num_classes, num_train, train_ids)


def setup(config: ml_collections.ConfigDict, workdir: str, step: int | None,
          mesh: jax.sharding.Mesh):
  """Every check that needs no compilation; returns (run_config, task, checkpoint), where
  checkpoint is (checkpointer, step, meta), or None for random_init and pixels."""
  result_name(config)
  run_config = load_run_config(workdir)
  _check_protocol_config(config, run_config)
  try:
    mesh_lib.check_global_batch_size(config.batch_size, mesh)
    checkpoint, image_size = None, config.image_size or run_config.image_size
    if not (config.random_init or config.features == 'pixels'):
      checkpoint = open_checkpoint(workdir, step, run_config)
      image_size = config.image_size or checkpoint[2]['image_size']
    task = prepare_task(config, run_config, image_size)
  except (ValueError, FileNotFoundError) as e:  # Mesh and data checks.
    raise SetupError(str(e)) from e
  return run_config, task, checkpoint


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  """Runs config.protocol on the checkpoint of `step` (default: latest) of the run in `workdir`."""
  start, requested_step = time.perf_counter(), step
  mesh = mesh_lib.create_mesh()
  run_config, task, checkpoint = setup(config, workdir, step, mesh)
  image_size = task.data_config.image_size
  if config.features == 'pixels':
    encoder = Encoder(None, {}, 0)
  elif config.random_init:
    encoder = random_encoder(run_config.model, image_size, config.seed, mesh)
  else:
    checkpointer, step, meta = checkpoint
    encoder = restore_encoder(checkpointer, step, meta, mesh)
    checkpointer.close()

  # An explicit --step keeps its own file, so it never overwrites the latest checkpoint's result.
  name = result_name(config, run_config.dataset) + ('' if requested_step is None else f'_step{requested_step}')
  eval_dir = os.path.join(workdir, 'eval')
  with jax.set_mesh(mesh):
    if config.protocol in _TRAINED_PROTOCOLS:
      metrics = run_classifier(config, task, encoder, mesh, os.path.join(eval_dir, name))
    elif config.protocol == 'knn':
      metrics = run_knn(config, task, encoder, mesh)
    else:
      metrics = run_linear_features(config, task, encoder, mesh)
  results = {'protocol': config.protocol, 'name': name, 'step': encoder.step,
             'dataset': task.data_config.dataset, 'train_split': task.train_split,
             'eval_split': task.eval_split, 'num_train_examples': task.num_train_examples,
             'image_size': image_size, **metrics, 'seconds': time.perf_counter() - start,
             'config': config.to_dict()}
  write_results(eval_dir, name, results)
  return results


def write_results(eval_dir: str, name: str, results: dict) -> None:
  """eval/<name>.json, a line in eval/results.jsonl, TensorBoard scalars; one console line."""
  scores = {k: results[k] for k in ('top1', 'top5') if k in results}
  summary = '  '.join(f'{k} {100 * v:.2f}%' for k, v in scores.items())
  logging.info('%s of step %d on %s %s: %s (%d train examples, %.0fs) -> %s', results['name'],
               results['step'], results['dataset'], results['eval_split'], summary,
               results['num_train_examples'], results['seconds'],
               os.path.join(eval_dir, f'{results["name"]}.json'))
  writer = metrics_writer.MetricWriter(eval_dir, filename='results.jsonl', tensorboard_subdir='tb')
  writer.write(results['step'], {f'{name}/{k}': v for k, v in scores.items()})
  if jax.process_index() == 0:
    (epath.Path(eval_dir) / f'{name}.json').write_text(json.dumps(results, indent=2))
