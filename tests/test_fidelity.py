"""One pretraining step against an independent statement of the official SimCLR update.

The reference differentiates the official TF2 training loss (tf2/run.py L577-617: the contrastive
loss_a + loss_b of tf2/objective.py, the supervised head's cross-entropy on both views and the L2
term of its kernel, tf2/model.py L47-60) on the model's own z, and applies one step of
tf2/lars_optimizer.py in NumPy with the official exclusions (tf2/model.py L35-42). The train step
must apply the same update on 1 and on 8 devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_pretrain_config
from simclr_jax import data
from simclr_jax import mesh as mesh_lib
from simclr_jax import models
from simclr_jax import pretrain
from test_losses import official_objective_and_metrics

pytestmark = pytest.mark.usefixtures('fast_compiles')

NUM_IMAGES, IMAGE_SIZE, NUM_CLASSES = 8, 8, 3
# Large enough that one step moves every parameter far above float32 rounding, and that wd * w
# weighs next to the gradients. Differentiating the paper's L instead of 2L halves every
# BatchNorm update here; leaving out the probe's decay moves its kernel's update by about 30%.
LEARNING_RATE, WEIGHT_DECAY, ETA = 4.0, 0.1, 1e-3


@pytest.fixture(scope='module')
def setup():
  config = tiny_pretrain_config(None, **{'data.image_size': IMAGE_SIZE})
  config.model.zero_init_last_bn = False  # Else the residual branches get no gradient yet.
  # No warmup: the first step runs at the peak rate, lr * B / 256 = LEARNING_RATE.
  config.update(dict(batch_size=NUM_IMAGES, learning_rate=LEARNING_RATE * 256 / NUM_IMAGES,
                     warmup_epochs=0, weight_decay=WEIGHT_DECAY, momentum=0.9,
                     num_train_steps=10))
  build = functools.partial(pretrain.build, config,
                            data.stand_in_split(config.data, 100 * NUM_IMAGES, NUM_CLASSES))
  state = build(mesh_lib.create_mesh(jax.devices()[:1])).create_state(jax.random.key(0))
  # A probe kernel of order 1 (not the 0.01 init), so that its L2 term shows in the update.
  probe = {**state.params['probe'],
           'kernel': jax.random.normal(jax.random.key(1), state.params['probe']['kernel'].shape)}
  state = state.replace(params={**state.params, 'probe': probe})
  rng = np.random.default_rng(0)
  views = rng.uniform(size=(NUM_IMAGES, 2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  batch = {'views': views, 'label': rng.integers(0, NUM_CLASSES, NUM_IMAGES).astype(np.int32)}
  return config, build, jax.device_get(state), batch


def official_training_loss(params, batch_stats, model, batch, temperature):
  """The loss tf2/run.py differentiates (before its division by the replica count, which its
  summed gradients undo), on one device over the global batch."""
  views = batch['views']
  images = views.reshape((-1,) + views.shape[2:])  # Rows 2i, 2i + 1: the views of image i.
  outputs, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                           mutable=['batch_stats'])
  z = outputs['z']
  contrastive, _, _ = official_objective_and_metrics(z[0::2], z[1::2], temperature, xp=jnp)
  labels = jnp.repeat(batch['label'], 2)
  log_p = jax.nn.log_softmax(outputs['probe_logits'])
  supervised = -jnp.mean(log_p[jnp.arange(len(labels)), labels])
  l2 = WEIGHT_DECAY * jnp.sum(params['probe']['kernel'] ** 2) / 2  # tf.nn.l2_loss, no bias.
  return contrastive + supervised + l2


def official_lars_update(params, grads):
  """w_new - w of the first LARS step (zero momentum), classic momentum: lr * trust * g."""
  def update(path, w, g):
    names = [key.key for key in path]
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    # Excluded from LARS: 'batch_normalization' (scale, bias), 'bias', 'head_supervised'.
    if names[-1] == 'kernel' and 'probe' not in names:
      g = g + WEIGHT_DECAY * w
      trust = ETA * np.linalg.norm(w) / np.linalg.norm(g)
    else:
      trust = 1.0
    return -LEARNING_RATE * trust * g
  return jax.tree_util.tree_map_with_path(update, params, grads)


@pytest.fixture(scope='module')
def expected_update(setup):
  config, _, state, batch = setup
  model = models.create_model(config.model, num_classes=NUM_CLASSES)
  grads = jax.jit(jax.grad(official_training_loss), static_argnums=(2, 4))(
      state.params, state.batch_stats, model, batch, config.temperature)
  return official_lars_update(state.params, jax.device_get(grads))


@pytest.mark.parametrize('num_devices', [1, 8])
def test_train_step_applies_the_official_update(setup, expected_update, num_devices):
  _, build, state, batch = setup
  mesh = mesh_lib.create_mesh(jax.devices()[:num_devices])
  with jax.set_mesh(mesh):
    new_state, metrics = build(mesh).step_fn(jax.device_put(state, mesh_lib.replicated(mesh)),
                              jax.device_put(batch, mesh_lib.batch_sharded(mesh)))
  new_params = jax.device_get(new_state.params)
  actual_update = jax.tree.map(lambda new, old: np.float64(new) - old, new_params, state.params)

  def check(path, actual, expected):
    scale = np.abs(expected).max()
    assert scale > 0, path
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3 * scale,
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, actual_update, expected_update)
  assert np.isfinite(metrics['loss'])
