"""SimCLR pretraining: the jitted train step, its setup, and the run around it."""

import dataclasses
import functools
import signal
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from simclr_jax import checkpointing
from simclr_jax import data
from simclr_jax import distributed
from simclr_jax import errors
from simclr_jax import losses
from simclr_jax import mesh as mesh_lib
from simclr_jax import metrics_writer
from simclr_jax import monitor
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import train_loop
from simclr_jax import train_state as train_state_lib
from simclr_jax import workdir_lock


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
               temperature: float, similarity: str, make_views: Callable):
  """One SimCLR update on a global batch; `make_views(batch, step, key)` gives (views
  [B, 2, H, W, 3], labels [B]) with the key of this step (see data.make_views)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  views, labels = make_views(batch, state.step, key)
  views = mesh_lib.shard_along_data(views)
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
      probe_loss, probe_metrics = probe_loss_and_metrics(outputs['probe_logits'],
                                                         jnp.repeat(labels, 2))
      loss += probe_loss  # The probe sees stop_gradient(h): encoder gradients are unchanged.
      metrics.update(probe_metrics)
    return loss, (metrics, updates['batch_stats'])

  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  state, learning_rate = train_state_lib.apply_gradients(state, grads, batch_stats, tx=tx,
                                                        schedule=schedule)
  return state, {**metrics, 'learning_rate': learning_rate}


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a pretraining run (or a benchmark of its step) is built from."""
  config: ml_collections.ConfigDict
  split: data.Split
  mesh: jax.sharding.Mesh
  model: models.SimCLRModel
  num_classes: int                  # Of the online probe; 0 without it.
  steps_per_epoch: int              # Of the data position.
  total_steps: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  create_state: Callable            # jitted rng -> replicated TrainState.
  step_fn: Callable                 # jitted (state, batch) -> (state, metrics); donates state.

  def abstract_state(self) -> train_state_lib.TrainState:
    """The state's shapes and dtypes, replicated on the mesh (for restoring)."""
    return checkpointing.abstract_like(
        jax.eval_shape(self.create_state, jax.random.key(self.config.seed)),
        mesh_lib.replicated(self.mesh))


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises UserError for a batch size, temperature or step cadence pretraining cannot run with."""
  mesh_lib.check_global_batch_size(config.batch_size, mesh)
  if not config.temperature > 0:
    raise errors.UserError(f'temperature must be positive, got {config.temperature}.')
  for name, least in (('log_every_steps', 1), ('checkpoint_every_steps', 0),
                      ('keep_checkpoints', 1), ('eval_every_steps', 0)):
    if config[name] < least:
      raise errors.UserError(f'{name} must be at least {least}, got {config[name]}.')


def build(config: ml_collections.ConfigDict, split: data.Split,
          mesh: jax.sharding.Mesh) -> Setup:
  """The model, optimizer and jitted functions of pretraining on `split`, compiled lazily."""
  check_config(config, mesh)
  data.check_pretrain_split(split, config.batch_size)
  # The online probe needs labels; unlabelled datasets train without it.
  num_classes = (split.num_classes or 0) if config.online_probe else 0
  model = models.create_model(config.model, num_classes=num_classes)
  total_steps = data.train_steps(split.num_examples, config.batch_size, config.num_epochs,
                                 config.num_train_steps)
  schedule = optim.learning_rate_schedule(
      config.learning_rate, config.batch_size, total_steps,
      warmup_steps=data.warmup_steps(split.num_examples, config.batch_size,
                                     config.warmup_epochs),
      scaling=config.learning_rate_scaling)
  tx = optim.lars(schedule, config.weight_decay, momentum=config.momentum)
  replicated = mesh_lib.replicated(mesh)
  create_state = jax.jit(
      functools.partial(train_state_lib.create_train_state, model, tx,
                        image_size=config.data.image_size),
      out_shardings=replicated)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        temperature=config.temperature, similarity=config.similarity,
                        make_views=data.make_views(split, seed=config.seed,
                                                   batch_size=config.batch_size)),
      in_shardings=(replicated, None),  # Batches come placed: sharded (tfds) or replicated.
      out_shardings=(replicated, replicated), donate_argnums=(0,))
  return Setup(config, split, mesh, model, num_classes,
               data.steps_per_epoch(split.num_examples, config.batch_size), total_steps,
               schedule, tx, create_state, step_fn)


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks, so it can checkpoint before exiting."""

  def __init__(self):
    self.requested = False
    self.signal = None  # The number of the signal that asked this process to stop.
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
    self.signal = signum

  def _forward_to_preemption_service(self, signum, frame):
    del frame
    logging.warning('Received signal %d: all processes will checkpoint and stop at the same '
                    'step.', signum)
    signal.raise_signal(signal.SIGTERM)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def describe(setup: Setup, workdir: str, latest_step: int | None) -> str:
  """The run in five lines: data, steps, learning rate, model, workdir (a run's header and the
  plan of --dry_run). Traces the model's initialisation; compiles nothing."""
  config, split = setup.config, setup.split
  height, width, channels = split.image_shape
  images = f'{height}x{width}x{channels}' if height else f'{channels}-channel images of any size'
  classes = f'{split.num_classes} classes' if split.num_classes else 'no labels'
  devices = setup.mesh.devices.flatten()
  warmup = data.warmup_steps(split.num_examples, config.batch_size, config.warmup_epochs)
  peak = optim.peak_learning_rate(config.learning_rate, config.batch_size,
                                  config.learning_rate_scaling)
  schedule = (f'warmup over {warmup:,} steps to {peak:.4g}, cosine to 0 at step '
              f'{setup.total_steps:,}' if warmup < setup.total_steps else
              f'warmup over {warmup:,} steps to {peak:.4g}, ending inside it')
  params = jax.eval_shape(setup.create_state, jax.random.key(config.seed)).params
  counts = ', '.join(f'{name} {sum(x.size for x in jax.tree.leaves(tree)):,}'
                     for name, tree in params.items())
  if latest_step is None:
    state = 'fresh run'
  elif latest_step >= setup.total_steps:
    state = f'complete (step {latest_step:,}): nothing to do'
  else:
    state = f'resumes from step {latest_step:,}'
  model = config.model
  return '\n'.join([
      f'data     {config.data.dataset} {split.split!r}: {split.num_examples:,} examples '
      f'({images}, {classes}), views {config.data.image_size}x{config.data.image_size}',
      f'steps    {setup.total_steps:,} = {setup.total_steps / setup.steps_per_epoch:.3g} epochs '
      f'of {setup.steps_per_epoch:,} steps; global batch {config.batch_size} on {len(devices)} '
      f'{devices[0].platform} device(s), {jax.process_count()} process(es)',
      f'lr       {config.learning_rate} x {config.learning_rate_scaling} batch scaling: '
      f'{schedule}',
      f'model    ResNet-{model.depth} x{model.width_multiplier} {model.dtype}: {counts} '
      'parameters',
      f'workdir  {workdir}: {state}'])


def _check(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> None:
  """The checks that need neither the data nor the checkpoints (before the lock and the data)."""
  check_config(config, mesh)
  checkpointing.check_workdir(workdir)


def _open(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, *,
          create: bool, allow_config_change: bool = False
          ) -> tuple[Setup, checkpointing.Checkpointer, int | None, list[str]]:
  """Checks and opens what a run needs: the setup, the checkpointer, the newest intact step (None
  in a new workdir) and the training-config changes since that step's checkpoint."""
  distributed.process_0_first(data.prepare, config.data)
  setup = build(config, data.open_split(config.data, config.data.train_split), mesh)
  checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                            create=create)
  latest = checkpointer.require_intact_step('move them away to start afresh')
  changes = []
  if latest is not None:
    if latest != checkpointer.all_steps()[-1]:
      logging.warning('Resuming from step %d, the newest intact checkpoint.', latest)
    changes = checkpointing.check_resumable(
        checkpointer.restore_meta(latest), checkpointing.run_metadata(config, setup.num_classes),
        latest, workdir, allow_config_change)
  return setup, checkpointer, latest, changes


def plan(config: ml_collections.ConfigDict, workdir: str,
         mesh: jax.sharding.Mesh | None = None, allow_config_change: bool = False) -> str:
  """`describe` of the run `run` would do, after the same checks; writes and compiles nothing."""
  mesh = mesh or mesh_lib.create_mesh()
  _check(config, workdir, mesh)
  setup, checkpointer, latest, _ = _open(config, workdir, mesh, create=False,
                                         allow_config_change=allow_config_change)
  checkpointer.close()
  return describe(setup, workdir, latest)


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: jax.sharding.Mesh | None = None, allow_config_change: bool = False) -> dict:
  """Pretrains (or resumes) in `workdir` on `mesh` (all devices by default).

  Resuming needs the training config of the checkpoint, unless `allow_config_change`. Returns the
  last logged metrics; raises SystemExit(128 + signal) after the checkpoint of a signalled stop.
  """
  mesh = mesh or mesh_lib.create_mesh()
  _check(config, workdir, mesh)
  with workdir_lock.hold(workdir):
    return _run(config, workdir, mesh, allow_config_change)


def _record_config(config: ml_collections.ConfigDict, workdir: str, step: int | None,
                   changes: list[str]) -> None:
  """Writes workdir/config.json; a changed config first keeps the old one as
  config_to_step<step>.json."""
  if jax.process_index() != 0:
    return
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  path = epath.Path(workdir) / 'config.json'
  if changes:
    logging.warning('Resuming step %d with a changed config: %s.', step, '; '.join(changes))
    if path.exists():
      path.replace(path.parent / f'config_to_step{step}.json')
  path.write_text(config.to_json_best_effort(indent=2))


def _run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
         allow_config_change: bool) -> dict:
  setup, checkpointer, latest, changes = _open(config, workdir, mesh, create=True,
                                               allow_config_change=allow_config_change)
  meta = checkpointing.run_metadata(config, setup.num_classes)
  for step in checkpointer.all_steps():
    if latest is not None and step > latest:  # Damaged: set aside, so it can be saved anew.
      checkpointer.set_aside(step)
  _record_config(config, workdir, latest, changes)
  logging.info('%s', describe(setup, workdir, latest))

  with jax.set_mesh(mesh):
    if latest is None:
      state = setup.create_state(jax.random.key(config.seed))
    else:
      state = checkpointer.restore(latest, setup.abstract_state())
    start_step = int(jax.device_get(state.step))
    batches = data.pretrain_batches(setup.split, mesh, seed=config.seed,
                                    batch_size=config.batch_size, start_step=start_step)

    def save(step, state):
      if not all_finite(state.params):
        raise FloatingPointError(
            f'Parameters are not finite after step {step}; not checkpointing. The last good '
            f'checkpoint is step {checkpointer.latest_intact_step(quiet=True)}.')
      checkpointer.save(state, meta)

    def non_finite_message(step, loss):
      return (f'Loss is {loss} at step {step}; stopping. The last good checkpoint is step '
              f'{checkpointer.latest_intact_step(quiet=True)} in {checkpointer.directory}.')

    knn = monitor.knn_monitor(config, setup.model, mesh)
    with _StopRequest() as stop, metrics_writer.TrainingLog(
        workdir, first_step=start_step, total_steps=setup.total_steps,
        batch_size=config.batch_size, steps_per_epoch=setup.steps_per_epoch,
        desc='pretrain', truncate=True) as training_log:
      result = train_loop.run(
          state, setup.step_fn, batches, first_step=start_step + 1,
          last_step=setup.total_steps, log_every_steps=config.log_every_steps, on_log=training_log,
          non_finite_message=non_finite_message, evaluations=(knn,) if knn else (),
          actions=(train_loop.Periodic(config.checkpoint_every_steps, save),),
          should_stop=lambda step: stop.requested or checkpointer.reached_preemption(step))
    if result.stopped_at is not None:
      logging.warning('Stopped at step %d; rerun the same command to resume.', result.stopped_at)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if stop.signal is not None:
    raise SystemExit(128 + stop.signal)
  if result.stopped_at is None and start_step < setup.total_steps:
    logging.info('Done: %d steps; checkpoints in %s', setup.total_steps, checkpointer.directory)
  return result.record
