"""How an encoder is evaluated: kNN, logistic regression on features, and trained classifiers.

Each protocol takes the checked `Evaluation` (simclr_jax/eval_setup.py), an `Encoder` and the
mesh, runs jitted functions over global arrays, and returns its metrics (top1, top5, ...).
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from simclr_jax import checkpointing
from simclr_jax import console
from simclr_jax import data
from simclr_jax import eval_setup
from simclr_jax import knn
from simclr_jax import logistic_regression
from simclr_jax import mesh as mesh_lib
from simclr_jax import metrics_writer
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import train_loop
from simclr_jax import train_state as train_state_lib


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


def accuracies(split: data.Split, mesh, batch_size: int, score_fn, *args) -> dict:
  """Accuracies over `split` of score_fn(*args, images) -> scores [B, classes]."""
  @functools.partial(jax.jit, out_shardings=mesh_lib.replicated(mesh))
  def count(args, batch):
    return count_correct(score_fn(*args, batch['image']), batch['label'], batch['mask'])

  total = None
  for batch in data.eval_batches(split, mesh, batch_size=batch_size):
    total = _add(total, count(args, batch))
  return _accuracies(total)


# Features (linear_features, knn, the kNN monitor of pretraining).

@functools.partial(jax.jit, static_argnames=('model',))
def features(variables: dict, images: jax.Array, model: models.SimCLRModel | None) -> jax.Array:
  """h of `model` in inference mode (None: the flattened pixels), split like the images.

  `model` is static: one compilation per architecture and batch shape, however many times it
  runs (the monitor calls it with new variables at every evaluation).
  """
  if model is None:
    return images.reshape(images.shape[0], -1)
  return mesh_lib.shard_along_data(
      model.apply(variables, images, train=False, method=models.SimCLRModel.encode))


_IN_FLIGHT = 2  # Batches of `extract_features` left running while its progress is counted.


def extract_features(encoder: eval_setup.Encoder, batches, mesh: jax.sharding.Mesh,
                     progress: console.ProgressLine | None = None) -> dict:
  """{'features', 'label', 'mask'} of all `batches`, as global arrays sharded over the mesh;
  `progress` counts the batches whose features are computed, then is closed."""
  rows = []
  for batch in batches:  # Dispatch is asynchronous: the host prepares the next batch meanwhile.
    rows.append({'features': features(encoder.variables, batch['image'], encoder.model),
                 'label': batch['label'], 'mask': batch['mask']})
    if progress is not None and len(rows) > _IN_FLIGHT:  # Waits only on an older batch.
      jax.block_until_ready(rows[-1 - _IN_FLIGHT]['features'])
      progress.update(len(rows) - _IN_FLIGHT)
  local = [jax.tree.map(lambda x: np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, P(mesh_lib.DATA_AXIS))), row) for row in rows]
  if progress is not None:
    progress.update(len(rows))
    progress.close()
  return mesh_lib.to_global(jax.tree.map(lambda *xs: np.concatenate(xs), *local), mesh)


def extraction_progress(split: data.Split, batch_size: int) -> console.ProgressLine | None:
  """A progress line for `extract_features` over the evaluation batches of `split` (process 0;
  None elsewhere)."""
  if jax.process_index() != 0:
    return None
  return console.ProgressLine(data.eval_steps(split.num_examples, batch_size), unit='batches',
                              desc=f'features of {split.split!r}')


@functools.partial(jax.jit, static_argnames=('model', 'num_classes', 'k', 'temperature'))
def _knn_counts(variables, bank, batch, *, model, num_classes, k, temperature):
  scores = knn.class_scores(features(variables, batch['image'], model), bank['features'],
                            bank['label'], bank['mask'], num_classes=num_classes, k=k,
                            temperature=temperature)
  return count_correct(scores, batch['label'], batch['mask'])


def knn_accuracies(encoder: eval_setup.Encoder, bank: data.Split, queries: data.Split, mesh, *,
                   batch_size: int, k: int, temperature: float,
                   show_progress: bool = False) -> dict:
  """Weighted kNN accuracies of every example of `queries` against the l2-normalised features of
  `bank` (evaluation views of both); `show_progress`: a progress line of the bank's features."""
  bank_features = extract_features(
      encoder, data.eval_batches(bank, mesh, batch_size=batch_size), mesh,
      extraction_progress(bank, batch_size) if show_progress else None)
  bank_features['features'] = jax.jit(knn.l2_normalize)(bank_features['features'])
  total = None
  for batch in data.eval_batches(queries, mesh, batch_size=batch_size):
    total = _add(total, _knn_counts(encoder.variables, bank_features, batch, model=encoder.model,
                                    num_classes=bank.num_classes, k=k, temperature=temperature))
  return _accuracies(total)


def run_knn(evaluation: eval_setup.Evaluation, encoder: eval_setup.Encoder, mesh) -> dict:
  """Weighted kNN of every test example against the train features."""
  cfg, task = evaluation.config.knn, evaluation.task
  return {**knn_accuracies(encoder, task.train, task.test, mesh,
                           batch_size=evaluation.config.batch_size, k=cfg.k,
                           temperature=cfg.temperature, show_progress=True),
          'k': cfg.k, 'temperature': cfg.temperature}


def run_linear_features(evaluation: eval_setup.Evaluation, encoder: eval_setup.Encoder,
                        mesh) -> dict:
  """Logistic regression on standardised features; L2 strength chosen on held-out train rows."""
  config, task = evaluation.config, evaluation.task
  cfg = config.linear_features
  train, test = (extract_features(
      encoder, data.eval_batches(split, mesh, batch_size=config.batch_size), mesh,
      extraction_progress(split, config.batch_size)) for split in (task.train, task.test))
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


# Trained classifiers (linear, finetune, distill).

@dataclasses.dataclass(frozen=True)
class ClassifierParts:
  """What a trained-classifier protocol trains, and on which loss."""
  model: models.SimCLRModel  # The network whose features the classifier reads.
  proj_layers: int           # Projection layers between h and the classifier.
  logits_fn: Callable        # (params, batch_stats, frozen, images, train) -> (logits, stats)
  frozen: dict               # Variables that stay fixed (linear: the encoder; distill: teacher).
  trunk: dict                # Variables that train under the classifier (finetune, distill).
  loss_fn: Callable          # (logits, batch, frozen) -> (loss, metrics)

def trunk_features(model, variables, images, *, train: bool, proj_layers: int = 0):
  """h, or the output of the first `proj_layers` projection layers (after their ReLU, as in
  SimCLR v2 fine-tuning); returns (features, new batch_stats)."""
  features, state = model.apply(variables, images, train=train, proj_layers=proj_layers,
                                method=models.SimCLRModel.encode, mutable=['batch_stats'])
  return features, state['batch_stats']


FEATURE_NORM_MOMENTUM = 0.9  # PyTorch's BatchNorm1d default (momentum 0.1 in its convention).
FEATURE_NORM_EPSILON = 1e-6   # MAE's linear probe.


def feature_batchnorm(features: jax.Array, stats: dict, train: bool) -> tuple[jax.Array, dict]:
  """BatchNorm without scale or offset (the MoCo v3 / MAE linear probe's): batch statistics
  (biased variance) while training, which also move the running `stats` {'mean', 'var'};
  the running statistics otherwise."""
  if train:
    mean, var = features.mean(0), features.var(0)
    stats = jax.tree.map(lambda old, new: FEATURE_NORM_MOMENTUM * old
                         + (1 - FEATURE_NORM_MOMENTUM) * new, stats, {'mean': mean, 'var': var})
  else:
    mean, var = stats['mean'], stats['var']
  return (features - mean) * jax.lax.rsqrt(var + FEATURE_NORM_EPSILON), stats


def linear_probe_logits(model, feature_norm: str = 'none'):
  """logits_fn of the linear protocol: frozen encoder, BatchNorm in inference mode; with
  feature_norm='batchnorm', `feature_batchnorm` on h (its running statistics in
  batch_stats['feature_norm'])."""
  def logits_fn(params, batch_stats, frozen, images, train):
    h = model.apply(frozen, images, train=False, method=models.SimCLRModel.encode)
    h = jax.lax.stop_gradient(h)
    if feature_norm == 'batchnorm':
      h, stats = feature_batchnorm(h, batch_stats['feature_norm'], train)
      batch_stats = {**batch_stats, 'feature_norm': stats}
    return logistic_regression.logits(params['probe'], h), batch_stats
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


def label_loss(logits: jax.Array, batch: dict, frozen: dict) -> tuple[jax.Array, dict]:
  """Softmax cross-entropy with the batch's labels, and the accuracy."""
  del frozen
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
  """SimCLR v2's distillation loss, averaged over the batch:
  -sum_y softmax(teacher / T)_y log softmax(student / T)_y (no T^2 factor, as the paper)."""
  targets = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
  return optax.softmax_cross_entropy(student_logits / temperature, targets).mean()


def teacher_logits(teacher: models.SimCLRModel, variables: dict, images: jax.Array) -> jax.Array:
  """The teacher's classifier logits, in inference mode."""
  return teacher.apply(variables, images, train=False)['probe_logits']


def distill_loss_fn(teacher: models.SimCLRModel, temperature: float) -> Callable:
  """loss_fn of distillation: `frozen` holds the teacher's variables; labels are not read."""
  def loss_fn(logits, batch, frozen):
    targets = teacher_logits(teacher, frozen, batch['image'])
    agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    return distillation_loss(logits, targets, temperature), {'teacher_agreement': agreement}
  return loss_fn


def classifier_train_step(state: train_state_lib.TrainState, frozen: dict, batch: dict, *,
                          logits_fn, tx, schedule, loss_fn=label_loss):
  """One step of `loss_fn` (default: softmax cross-entropy on {'image', 'label'})."""
  def total_loss(params):
    logits, batch_stats = logits_fn(params, state.batch_stats, frozen, batch['image'], train=True)
    loss, metrics = loss_fn(logits, batch, frozen)
    return loss, ({'loss': loss, **metrics}, batch_stats)

  grads, (metrics, batch_stats) = jax.grad(total_loss, has_aux=True)(state.params)
  state, learning_rate = train_state_lib.apply_gradients(state, grads, batch_stats, tx=tx,
                                                         schedule=schedule)
  return state, {**metrics, 'learning_rate': learning_rate}


def create_optimizer(cfg, batch_size: int, total_steps: int, batch_stats: dict):
  """Nesterov momentum 0.9 with weight decay added to the gradient (an L2 term), or LARS;
  cosine decay, no warmup. BatchNorm parameters are never decayed."""
  schedule = optim.learning_rate_schedule(cfg.learning_rate, batch_size, total_steps,
                                          warmup_steps=0, scaling=cfg.learning_rate_scaling)
  if cfg.optimizer == 'lars':  # The classifier is named 'probe', so LARS leaves it plain SGD.
    return optim.lars(schedule, cfg.weight_decay), schedule
  decayed = functools.partial(optim.not_batchnorm_mask, batch_stats=batch_stats)
  tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decayed),
                   optax.sgd(schedule, momentum=0.9, nesterov=True))
  return tx, schedule


def classifier_parts(config, encoder: eval_setup.Encoder,
                     teacher: eval_setup.Encoder | None = None) -> ClassifierParts:
  """linear: a classifier on the frozen `encoder`; finetune: the encoder (and `proj_layers` of
  its head) trains with the classifier; distill: likewise the student `encoder`, on the
  distillation loss to `teacher`."""
  if config.protocol == 'linear':
    return ClassifierParts(encoder.model, 0,
                           linear_probe_logits(encoder.model, config.linear.feature_norm),
                           encoder.variables, {'params': {}}, label_loss)
  proj_layers = config[config.protocol].proj_layers
  keep = ('encoder', 'head') if proj_layers else ('encoder',)
  trunk = {collection: {k: v for k, v in tree.items() if k in keep}
           for collection, tree in encoder.variables.items()}
  frozen, loss_fn = {}, label_loss
  if config.protocol == 'distill':
    frozen, loss_fn = teacher.variables, distill_loss_fn(teacher.model,
                                                         config.distill.temperature)
  return ClassifierParts(encoder.model, proj_layers, finetune_logits(encoder.model, proj_layers),
                         frozen, trunk, loss_fn)


def _num_features(parts: ClassifierParts, image_size: int) -> int:
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  model_variables = jax.eval_shape(
      functools.partial(train_state_lib.init_variables, parts.model, image_size=image_size),
      jax.random.key(0))
  features, _ = jax.eval_shape(
      functools.partial(trunk_features, parts.model, train=False, proj_layers=parts.proj_layers),
      model_variables, images)
  return features.shape[-1]


def classifier_steps(config, num_train_examples: int) -> int:
  """Steps of config.protocol's classifier training: its num_epochs of config.batch_size."""
  steps_per_epoch = data.steps_per_epoch(num_train_examples, config.batch_size)
  return max(int(round(config[config.protocol].num_epochs * steps_per_epoch)), 1)


def train_classifier(evaluation: eval_setup.Evaluation, encoder: eval_setup.Encoder, mesh,
                     log_dir: str, parts: ClassifierParts | None = None):
  """Trains a zero-initialised linear classifier named 'probe' (and for finetune and distill the
  trunk under it) on `parts.loss_fn` (default: `classifier_parts(config, encoder)`) over the
  training examples (the labelled ones; distill: all).

  Returns (trained state, frozen variables, logits_fn(params, batch_stats, frozen, images,
  train) -> (logits, batch_stats)).
  """
  config, task = evaluation.config, evaluation.task
  cfg = config[config.protocol]
  parts = parts or classifier_parts(config, encoder)
  frozen, trunk = parts.frozen, parts.trunk
  num_features = _num_features(parts, evaluation.image_size)
  if config.protocol == 'linear' and config.linear.feature_norm == 'batchnorm':
    trunk = {**trunk, 'batch_stats': {'feature_norm': {
        'mean': jnp.zeros(num_features, jnp.float32), 'var': jnp.ones(num_features, jnp.float32)}}}
  steps_per_epoch = data.steps_per_epoch(task.num_train_examples, config.batch_size)
  total_steps = classifier_steps(config, task.num_train_examples)
  tx, schedule = create_optimizer(cfg, config.batch_size, total_steps,
                                  trunk.get('batch_stats', {}))
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
      functools.partial(classifier_train_step, logits_fn=parts.logits_fn, loss_fn=parts.loss_fn,
                        tx=tx, schedule=schedule),
      in_shardings=(replicated, replicated, mesh_lib.batch_sharded(mesh)),
      out_shardings=(replicated, replicated), donate_argnums=(0,))
  batches = data.classifier_batches(task.train, mesh, seed=config.seed,
                                    batch_size=config.batch_size, example_ids=task.train_ids)
  logging.info('Training the %s classifier: %d steps (%d per epoch) of batch %d.',
               config.protocol, total_steps, steps_per_epoch, config.batch_size)
  with metrics_writer.TrainingLog(log_dir, first_step=0, total_steps=total_steps,
                                  batch_size=config.batch_size, steps_per_epoch=steps_per_epoch,
                                  desc=config.protocol) as training_log:
    result = train_loop.run(
        state, lambda state, batch: step_fn(state, frozen, batch), batches, first_step=1,
        last_step=total_steps, log_every_steps=config.log_every_steps, on_log=training_log,
        non_finite_message=lambda step, loss: (
            f'The {config.protocol} loss is {loss} at step {step}; lower '
            f'--config.{config.protocol}.learning_rate.'))
  return result.state, frozen, parts.logits_fn


def save_classifier(evaluation: eval_setup.Evaluation, base: eval_setup.Encoder,
                    model_config, state: train_state_lib.TrainState, proj_layers: int) -> None:
  """Saves the trained network to `evaluation.save_to` as a run (checkpointing.save_network):
  `base`'s variables with the trained trunk and classifier ('probe', reading `proj_layers`)."""
  model_config = model_config.copy_and_resolve_references()
  model_config.probe_proj_layers = proj_layers
  config = evaluation.run_config.copy_and_resolve_references()
  config.model = model_config
  config.data = evaluation.task.test.config.copy_and_resolve_references()  # Not a subset's.
  variables = {collection: {**base.variables[collection], **getattr(state, collection)}
               for collection in ('params', 'batch_stats')}
  checkpointing.save_network(evaluation.save_to, config, evaluation.task.num_classes, variables,
                             int(state.step), classifier=evaluation.config.protocol,
                             trained_from=evaluation.workdir)
  logging.info('Saved the %s network to %s.', evaluation.config.protocol, evaluation.save_to)


def run_classifier(evaluation: eval_setup.Evaluation, encoder: eval_setup.Encoder, mesh,
                   log_dir: str) -> dict:
  """Trains the classifier of linear or finetune (`train_classifier`), then tests it; saves a
  fine-tuned network where `evaluation.save_to` says."""
  cfg = evaluation.config[evaluation.config.protocol]
  state, frozen, logits_fn = train_classifier(evaluation, encoder, mesh, log_dir)

  def scores(state, frozen, images):
    return logits_fn(state.params, state.batch_stats, frozen, images, train=False)[0]

  results = {**accuracies(evaluation.task.test, mesh, evaluation.config.batch_size, scores,
                          state, frozen),
             'num_epochs': cfg.num_epochs,
             'train_steps': int(state.step), 'label_fraction': cfg.label_fraction}
  if evaluation.save_to:
    model_config = (evaluation.saved.model_config if evaluation.saved
                    else evaluation.run_config.model)
    save_classifier(evaluation, encoder, model_config, state, cfg.proj_layers)
    results['saved_to'] = evaluation.save_to
  return results


def run_distill(evaluation: eval_setup.Evaluation, teacher: eval_setup.Encoder,
                student: eval_setup.Encoder, mesh, log_dir: str) -> dict:
  """Distils `teacher`'s classifier into `student` on every training image (labels unused),
  tests both, and saves the student."""
  config = evaluation.config
  cfg = config.distill
  parts = classifier_parts(config, student, teacher)
  state, frozen, logits_fn = train_classifier(evaluation, student, mesh, log_dir, parts)

  def scores(state, frozen, images):
    return logits_fn(state.params, state.batch_stats, frozen, images, train=False)[0]

  test, batch_size = evaluation.task.test, config.batch_size
  results = {**accuracies(test, mesh, batch_size, scores, state, frozen)}
  teacher_scores = functools.partial(teacher_logits, teacher.model)
  results.update({f'teacher_{k}': v for k, v in accuracies(
      test, mesh, batch_size, teacher_scores, teacher.variables).items()})
  save_classifier(evaluation, student, evaluation.student.model_config, state, cfg.proj_layers)
  return {**results, 'temperature': cfg.temperature, 'num_epochs': cfg.num_epochs,
          'train_steps': int(state.step), 'saved_to': evaluation.save_to,
          'student': cfg.student_workdir or 'random init',
          'student_model': evaluation.student.model_config.to_dict()}
