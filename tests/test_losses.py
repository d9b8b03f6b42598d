"""NT-Xent against a float64 NumPy statement of the paper's formula, and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import losses


def reference_loss_and_accuracy(z_a, z_b, temperature, similarity):
  """Loops over the 2N anchors of eq. (1) in Chen et al. (2020), in float64."""
  z = np.concatenate([z_a, z_b]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  two_n = len(z)

  def sim(u, v):
    return u @ v if similarity == 'cosine' else -np.linalg.norm(u - v)

  total, correct = 0.0, 0
  for i in range(two_n):
    positive = (i + two_n // 2) % two_n
    candidates = [k for k in range(two_n) if k != i]
    s = {k: sim(z[i], z[k]) / temperature for k in candidates}
    total += -np.log(np.exp(s[positive]) / sum(np.exp(s[k]) for k in candidates))
    correct += max(candidates, key=s.get) == positive
  return total / two_n, correct / two_n


def reference_jnp_loss(z_a, z_b, temperature, similarity):
  """Dense TF-SimCLR-style formulation (loss_a + loss_b) / 2 with a large negative self logit."""
  z_a = z_a / jnp.linalg.norm(z_a, axis=1, keepdims=True)
  z_b = z_b / jnp.linalg.norm(z_b, axis=1, keepdims=True)
  n = z_a.shape[0]
  eye = jnp.eye(n)

  def sim(u, v, shift=0.0):
    if similarity == 'cosine':
      return u @ v.T
    squared = jnp.sum((u[:, None] - v[None]) ** 2, axis=-1)
    return -jnp.sqrt(squared + shift)

  def directional(anchor, other):
    # Shifting the self distances (masked anyway) keeps sqrt away from 0.
    logits = jnp.concatenate([sim(anchor, other), sim(anchor, anchor, eye) - 1e9 * eye], axis=1)
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits / temperature, axis=1)))

  return (directional(z_a, z_b) + directional(z_b, z_a)) / 2


def _pairs(n, d, seed=0, noise=1.0):
  rng = np.random.default_rng(seed)
  z_a = rng.normal(size=(n, d))
  z_b = z_a + noise * rng.normal(size=(n, d))
  return z_a.astype(np.float32), z_b.astype(np.float32)


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
@pytest.mark.parametrize('n, d, temperature, noise', [
    (1, 3, 0.5, 1.0),
    (4, 8, 0.1, 0.5),
    (7, 16, 1.0, 2.0),
    (16, 32, 0.05, 0.3),
])
def test_matches_numpy_reference(n, d, temperature, noise, similarity):
  z_a, z_b = _pairs(n, d, seed=n, noise=noise)
  loss, metrics = losses.contrastive_loss_and_metrics(z_a, z_b, temperature, similarity)
  expected_loss, expected_acc = reference_loss_and_accuracy(z_a, z_b, temperature, similarity)
  np.testing.assert_allclose(loss, expected_loss, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(metrics['contrastive_acc'], expected_acc)
  np.testing.assert_allclose(metrics['chance_loss'], np.log(2 * n - 1), rtol=1e-6)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(losses.nt_xent(z_a, z_b, temperature, similarity), loss)


def test_scale_invariant_and_bfloat16_computed_in_float32():
  z_a, z_b = _pairs(6, 8)
  loss = losses.nt_xent(z_a, z_b, 0.2)
  np.testing.assert_allclose(losses.nt_xent(3 * z_a, 0.5 * z_b, 0.2), loss, rtol=1e-6)
  bf16_loss = losses.nt_xent(jnp.asarray(z_a, jnp.bfloat16), jnp.asarray(z_b, jnp.bfloat16), 0.2)
  assert bf16_loss.dtype == jnp.float32
  np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
def test_collapsed_embeddings_give_chance_loss_and_finite_gradients(similarity):
  # All 2N embeddings equal: every candidate is equally similar, so L = log(2N - 1).
  n = 8
  z = np.tile(np.linspace(-1.0, 1.0, 16, dtype=np.float32), (n, 1))
  loss, grads = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))(z, z, 0.05, similarity)
  np.testing.assert_allclose(loss, np.log(2 * n - 1), rtol=1e-5)
  assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
def test_near_identical_embeddings_at_low_temperature(similarity):
  rng = np.random.default_rng(1)
  z = rng.normal(size=16) + 1e-3 * rng.normal(size=(2, 8, 16))
  z_a, z_b = z.astype(np.float32)
  loss, grads = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))(z_a, z_b, 0.05, similarity)
  assert all(np.isfinite(g).all() for g in grads)
  expected, _ = reference_loss_and_accuracy(z_a, z_b, 0.05, similarity)
  np.testing.assert_allclose(loss, expected, atol=1e-3)


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
def test_gradients_match_float64_reference(similarity):
  z_a, z_b = _pairs(5, 6, seed=3)
  value_and_grad = jax.jit(jax.value_and_grad(losses.nt_xent, argnums=(0, 1)),
                           static_argnums=3)
  with jax.enable_x64(True):
    reference = jax.jit(jax.value_and_grad(reference_jnp_loss, argnums=(0, 1)), static_argnums=3)
    z64 = (jnp.asarray(z_a, jnp.float64), jnp.asarray(z_b, jnp.float64))
    expected = {t: jax.device_get(reference(*z64, t, similarity)) for t in (0.1, 0.5)}
  for temperature, (expected_loss, expected_grads) in expected.items():
    loss, grads = value_and_grad(z_a, z_b, temperature, similarity)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


def test_contrastive_accuracy_hand_case():
  # Unit vectors at angles (degrees): a = [0, 90], b = [10, 200]. Top-1 candidates by angle:
  # a0 -> b0 (right), a1 -> b0 (wrong, positive b1), b0 -> a0 (right), b1 -> a1 (right).
  angles = np.deg2rad([[0.0, 90.0], [10.0, 200.0]])
  z_a, z_b = (np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32) for a in angles)
  for similarity in ('cosine', 'euclidean'):
    _, metrics = losses.contrastive_loss_and_metrics(z_a, z_b, 0.5, similarity)
    np.testing.assert_allclose(metrics['contrastive_acc'], 0.75)
    _, expected_acc = reference_loss_and_accuracy(z_a, z_b, 0.5, similarity)
    assert expected_acc == 0.75


@pytest.mark.parametrize('kwargs, shapes, message', [
    (dict(temperature=0.0), ((4, 8), (4, 8)), 'temperature'),
    (dict(temperature=-0.1), ((4, 8), (4, 8)), 'temperature'),
    (dict(temperature=0.5, similarity='dot'), ((4, 8), (4, 8)), 'similarity'),
    (dict(temperature=0.5), ((4, 8), (5, 8)), 'shape'),
    (dict(temperature=0.5), ((4, 8, 1), (4, 8, 1)), 'shape'),
    (dict(temperature=0.5), ((8,), (8,)), 'shape'),
])
def test_bad_arguments(kwargs, shapes, message):
  z_a, z_b = (np.ones(s, np.float32) for s in shapes)
  with pytest.raises(ValueError, match=message):
    losses.nt_xent(z_a, z_b, **kwargs)
