"""SimCLR pretraining: the jitted train step and the loop around it."""

import functools
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from simclr_jax import augment_device
from simclr_jax import checkpointing
from simclr_jax import data
from simclr_jax import distributed
from simclr_jax import losses
from simclr_jax import mesh as mesh_lib
from simclr_jax import metrics_writer
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import train_state as train_state_lib

def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(config.num_epochs * steps_per_epoch)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
  """LARS with the paper's warmup + cosine schedule; returns (tx, schedule)."""
  schedule = optim.learning_rate_schedule(
      config.learning_rate, config.batch_size, total_steps,
      warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
      scaling=config.learning_rate_scaling)
  tx = optim.lars(schedule, config.weight_decay, momentum=config.momentum)
  return tx, schedule


def run_metadata(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """What a checkpoint must agree with to be restored (and what evaluation rebuilds from)."""
  return {'model': config.model.to_dict(), 'image_size': config.image_size,
          'num_classes': num_classes, 'dataset': config.dataset}


def probe_loss_and_metrics(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """Softmax cross-entropy of the online probe over examples with a label (label >= 0)."""
  has_label = (labels >= 0).astype(jnp.float32)
  count = jnp.maximum(has_label.sum(), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       jnp.maximum(labels, 0))
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  loss = (ce * has_label).sum() / count
  return loss, {'probe_loss': loss, 'probe_acc': (correct * has_label).sum() / count}


def train_step(state: train_state_lib.TrainState, batch: dict, *, model, tx, schedule,
               temperature: float, similarity: str, augment_views=None):
  """One SimCLR update on a global batch {'views': [B, 2, H, W, 3], 'label': [B]}.

  `augment_views(views, key)`, if given, augments the views on device with a key of this step.
  """
  views = batch['views']
  if augment_views is not None:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    views = augment_views(views, key)
  num_images = views.shape[0]
  # Interleaved views (rows 2i, 2i+1 = image i): one encoder pass, BatchNorm over both views.
  images = views.reshape((2 * num_images,) + views.shape[2:])

  def loss_fn(params):
    outputs, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                   images, train=True, mutable=['batch_stats'])
    z = outputs['z'].reshape(num_images, 2, -1)
    loss, metrics = losses.contrastive_loss_and_metrics(
        z[:, 0], z[:, 1], temperature, similarity=similarity)
    metrics = {'loss': loss, **metrics}
    if 'probe_logits' in outputs:
      probe_loss, probe_metrics = probe_loss_and_metrics(
          outputs['probe_logits'], jnp.repeat(batch['label'], 2))
      loss += probe_loss  # The probe sees stop_gradient(h): encoder gradients are unchanged.
      metrics.update(probe_metrics)
    return loss, (metrics, updates['batch_stats'])

  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics['learning_rate'] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def make_train_step(config: ml_collections.ConfigDict, model, tx, schedule,
                    mesh: jax.sharding.Mesh):
  """`train_step` jitted on `mesh`: replicated state (donated), batch sharded over `data`."""
  augment_views = None
  if config.augment.get('on_device', False):
    augment_views = functools.partial(
        augment_device.augment_views, color_strength=config.augment.color_strength,
        blur_probability=config.augment.blur_probability, brightness=config.augment.brightness)
  replicated = mesh_lib.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        temperature=config.temperature, similarity=config.similarity,
                        augment_views=augment_views),
      in_shardings=(replicated, mesh_lib.batch_sharded(mesh)),
      out_shardings=(replicated, replicated), donate_argnums=(0,))


def _check_compatible(checkpointer: checkpointing.Checkpointer, step: int, meta: dict,
                      workdir: str) -> None:
  saved = checkpointer.restore_meta(step)
  differences = [k for k in meta if k != 'dataset' and saved.get(k) != meta[k]]
  if differences:
    details = '; '.join(f'{k}: checkpoint {saved.get(k)!r} vs config {meta[k]!r}'
                        for k in differences)
    raise ValueError(f'{workdir} holds a checkpoint (step {step}) of a different setup ({details}).'
                     ' Use a new --workdir, or the config that wrote it.')


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks, so it can checkpoint before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if jax.process_count() > 1:
      # JAX's preemption service owns SIGTERM: it makes `reached_preemption` true on every
      # process at the same step. Replacing its handler would stop only the signalled process.
      handlers = {signal.SIGINT: self._forward_to_preemption_service}
    else:
      handlers = {signal.SIGTERM: self._handle, signal.SIGINT: self._handle}
    for sig, handler in handlers.items():
      self._previous[sig] = signal.signal(sig, handler)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: checkpointing and stopping.', signum)
    self.requested = True

  def _forward_to_preemption_service(self, signum, frame):
    del frame
    logging.warning('Received signal %d: all processes will checkpoint and stop at the same '
                    'step.', signum)
    signal.raise_signal(signal.SIGTERM)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None) -> dict:
  """Pretrains (or resumes) in `workdir` on `mesh` (all devices by default).

  Returns the last logged metrics.
  """
  mesh = mesh or mesh_lib.create_mesh()
  mesh_lib.check_global_batch_size(config.batch_size, mesh)
  distributed.process_0_first(data.ensure_prepared, config.dataset, config.data_dir)
  num_examples = data.num_examples(config.dataset, config.train_split, config.data_dir)
  steps_per_epoch = data.steps_per_epoch(num_examples, config.batch_size)
  total_steps = total_train_steps(config, steps_per_epoch)
  # The online probe needs labels; unlabelled datasets (num_classes None) train without it.
  num_classes = 0
  if config.online_probe:
    num_classes = data.num_classes(config.dataset, config.data_dir) or 0

  model = models.create_model(config.model, num_classes=num_classes)
  tx, schedule = create_optimizer(config, steps_per_epoch, total_steps)
  meta = run_metadata(config, num_classes)
  checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    _check_compatible(checkpointer, latest, meta, workdir)
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))

  replicated = mesh_lib.replicated(mesh)
  create_state = functools.partial(train_state_lib.create_train_state, model, tx,
                                   image_size=config.image_size)
  rng = jax.random.key(config.seed)
  with jax.set_mesh(mesh):
    if latest is None:
      state = jax.jit(create_state, out_shardings=replicated)(rng)
    else:
      abstract = checkpointing.abstract_like(jax.eval_shape(create_state, rng), replicated)
      state = checkpointer.restore(latest, abstract)
      logging.info('Resumed from %s at step %d.', checkpointing.checkpoint_dir(workdir), latest)
    start_step = int(jax.device_get(state.step))

    step_fn = make_train_step(config, model, tx, schedule, mesh)
    batches = mesh_lib.prefetch_to_device(
        data.pretrain_batches(config, start_step=start_step), mesh, config.prefetch_batches)
    writer = metrics_writer.MetricWriter(workdir)
    progress = metrics_writer.Progress(start_step, total_steps, config.batch_size)
    logging.info('Training steps %d..%d (%d per epoch), global batch %d on %d devices.',
                 start_step, total_steps, steps_per_epoch, config.batch_size, mesh.devices.size)

    record, pending = {}, []
    with _StopRequest() as stop:
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = step_fn(state, next(batches))
        pending.append(metrics)
        is_last = step == total_steps
        stopping = stop.requested or checkpointer.reached_preemption(step)
        if step % config.log_every_steps == 0 or is_last or stopping:
          record = metrics_writer.summarise(pending)
          pending = []
          if not np.isfinite(record['loss']):
            raise FloatingPointError(
                f'Loss is {record["loss"]} at step {step}; stopping. The last good checkpoint '
                f'is step {checkpointer.latest_step()} in {checkpointing.checkpoint_dir(workdir)}.')
          record.update(progress.update(step), epoch=step / steps_per_epoch)
          writer.write(step, record)
          metrics_writer.log_progress(step, total_steps, record)
        if step % config.checkpoint_every_steps == 0 or is_last or stopping:
          if not all_finite(state.params):
            raise FloatingPointError(
                f'Parameters are not finite after step {step}; not checkpointing. The last good '
                f'checkpoint is step {checkpointer.latest_step()}.')
          checkpointer.save(state, meta)
        if stopping:
          logging.warning('Stopped at step %d; rerun the same command to resume.', step)
          break
  checkpointer.wait_until_finished()
  checkpointer.close()
  return record
