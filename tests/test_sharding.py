"""Data-parallel equivalence: loss, gradients and BatchNorm statistics on 1 vs k CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from simclr_jax import losses, models
from simclr_jax.errors import UserError
from test_losses import official_objective_and_metrics


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _mesh(num_devices):
  return jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ('data',))


def _put(mesh, tree, spec):
  return jax.device_put(tree, NamedSharding(mesh, spec))


def _close(actual, expected):
  # Sums over the batch run in another order on 8 devices: float32 tolerance per leaf scale.
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _loss_and_grads(z_a, z_b, similarity, mesh):
  loss_fn = functools.partial(losses.contrastive_loss_and_metrics, temperature=0.2,
                              similarity=similarity)
  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    return jax.device_get(step(_put(mesh, z_a, P('data')), _put(mesh, z_b, P('data'))))


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
def test_sharded_loss_metrics_and_gradients_match_one_device(similarity):
  rng = np.random.default_rng(0)
  z_a, z_b = rng.normal(size=(2, 16, 8)).astype(np.float32)
  (loss, metrics), grads = _loss_and_grads(z_a, z_b, similarity, _mesh(1))
  official_loss, official_acc, official_entropy = official_objective_and_metrics(
      z_a.astype(np.float64), z_b.astype(np.float64), 0.2, similarity)
  np.testing.assert_allclose(loss, official_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['contrastive_acc'], official_acc)
  np.testing.assert_allclose(metrics['contrastive_entropy'], official_entropy, rtol=1e-5)
  assert set(metrics) == {'contrastive_acc', 'contrastive_entropy', 'contrastive_acc_all',
                          'chance_loss'}
  for k in (2, 8):
    (loss_k, metrics_k), grads_k = _loss_and_grads(z_a, z_b, similarity, _mesh(k))
    np.testing.assert_allclose(loss_k, loss, rtol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
                 metrics_k, metrics)
    for g_k, g in zip(grads_k, grads):
      np.testing.assert_allclose(g_k, g, rtol=1e-5, atol=1e-7)
  # Without any mesh: the same numbers.
  unsharded = losses.contrastive_loss_and_metrics(z_a, z_b, 0.2, similarity)
  np.testing.assert_allclose(unsharded[0], loss, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), unsharded[1], metrics)


def test_sharded_loss_builds_only_local_logits():
  z = jax.ShapeDtypeStruct((16, 8), jnp.float32)
  with jax.set_mesh(_mesh(8)):
    hlo = jax.jit(lambda a, b: losses.nt_xent(a, b, 0.2)).lower(z, z).as_text()
  assert 'tensor<4x32xf32>' in hlo       # 2 * 2 local anchors x 2 * 16 global candidates.
  assert 'tensor<32x32xf32>' not in hlo


def test_batch_must_split_over_devices():
  z = np.ones((12, 8), np.float32)
  with jax.set_mesh(_mesh(8)):
    with pytest.raises(UserError, match='split'):
      losses.nt_xent(z, z, 0.5)


def test_encoder_head_and_loss_match_one_device():
  model = models.SimCLRModel(
      encoder=models.ResNet(18, width_multiplier=0.125, cifar_stem=True),
      head=models.ProjectionHead(proj_dim=16))
  num_images = 8
  # Interleaved views: rows 2i and 2i + 1 are the two views of image i.
  images = jax.random.uniform(jax.random.key(1), (2 * num_images, 8, 8, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)

  def loss_fn(params, batch_stats, images):
    outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                   train=True, mutable=['batch_stats'])
    z = outputs['z'].reshape(num_images, 2, -1)
    return losses.nt_xent(z[:, 0], z[:, 1], 0.5), updates['batch_stats']

  def run(mesh):
    with jax.set_mesh(mesh):
      step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
      replicated = _put(mesh, variables, P())
      return jax.device_get(step(replicated['params'], replicated['batch_stats'],
                                 _put(mesh, images, P('data'))))

  (loss, stats), grads = run(_mesh(1))
  (loss_8, stats_8), grads_8 = run(_mesh(8))
  np.testing.assert_allclose(loss_8, loss, rtol=1e-5)
  assert set(grads) == {'encoder', 'head'}
  jax.tree.map(_close, grads_8, grads)
  jax.tree.map(_close, stats_8, stats)
  # The statistics really moved (momentum 0.9 from mean 0 / var 1).
  assert np.abs(stats['encoder']['bn_init']['mean']).max() > 1e-3
