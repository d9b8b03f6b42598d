"""The contrastive objective and metrics against float64 statements of the paper's formula and of
the official code (tf2/objective.py, tf2/metrics.py), and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import losses
from simclr_jax.errors import UserError


def paper_loss_and_accuracy(z_a, z_b, temperature, similarity):
  """Loops over the 2N anchors of eq. (1) in Chen et al. (2020), in float64: the paper's L, and
  the fraction of anchors whose positive is the top-1 of their 2N - 1 candidates."""
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


def official_objective_and_metrics(z_a, z_b, temperature, similarity='cosine', xp=np):
  """add_contrastive_loss (tf2/objective.py L35-89) and update_pretrain_metrics_train
  (tf2/metrics.py L23-36) on one replica, with the -1e9 self mask, written for NumPy (`xp=np`)
  or jax.numpy (`xp=jnp`, to differentiate). Returns (loss_a + loss_b, accuracy, entropy)."""
  h1 = z_a / xp.linalg.norm(z_a, axis=1, keepdims=True)
  h2 = z_b / xp.linalg.norm(z_b, axis=1, keepdims=True)
  n = h1.shape[0]
  masks = xp.eye(n)
  labels = xp.eye(n, 2 * n)  # one_hot(range(n), 2n): the positive is column i of logits_ab.

  def sim(u, v, shift=0.0):
    if similarity == 'cosine':
      return u @ v.T
    # Shifting the self distances (masked anyway) keeps sqrt's gradient away from 0.
    return -xp.sqrt(xp.sum((u[:, None] - v[None]) ** 2, axis=-1) + shift)

  def log_softmax(logits):
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))

  logits_aa = sim(h1, h1, masks) / temperature - masks * 1e9
  logits_bb = sim(h2, h2, masks) / temperature - masks * 1e9
  logits_ab = sim(h1, h2) / temperature
  logits_ba = sim(h2, h1) / temperature
  loss_a = -xp.sum(labels * log_softmax(xp.concatenate([logits_ab, logits_aa], axis=1)), axis=1)
  loss_b = -xp.sum(labels * log_softmax(xp.concatenate([logits_ba, logits_bb], axis=1)), axis=1)
  accuracy = xp.mean(xp.argmax(labels, axis=1) == xp.argmax(logits_ab, axis=1))
  p = xp.exp(log_softmax(logits_ab))
  entropy = -xp.mean(xp.sum(p * xp.log(p + 1e-8), axis=1))
  return xp.mean(loss_a + loss_b), accuracy, entropy


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
def test_matches_official_code_and_paper(n, d, temperature, noise, similarity):
  z_a, z_b = _pairs(n, d, seed=n, noise=noise)
  loss, metrics = losses.contrastive_loss_and_metrics(z_a, z_b, temperature, similarity)
  official_loss, official_acc, official_entropy = official_objective_and_metrics(
      z_a.astype(np.float64), z_b.astype(np.float64), temperature, similarity)
  paper_loss, paper_acc = paper_loss_and_accuracy(z_a, z_b, temperature, similarity)
  np.testing.assert_allclose(loss, official_loss, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(metrics['contrastive_acc'], official_acc)
  np.testing.assert_allclose(metrics['contrastive_entropy'], official_entropy, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(metrics['contrastive_acc_all'], paper_acc)
  np.testing.assert_allclose(metrics['chance_loss'], 2 * np.log(2 * n - 1), rtol=1e-6)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(losses.nt_xent(z_a, z_b, temperature, similarity), paper_loss,
                             rtol=2e-5, atol=1e-5)


def test_scale_invariant_and_bfloat16_computed_in_float32():
  z_a, z_b = _pairs(6, 8)
  loss = losses.nt_xent(z_a, z_b, 0.2)
  np.testing.assert_allclose(losses.nt_xent(3 * z_a, 0.5 * z_b, 0.2), loss, rtol=1e-6)
  bf16_loss = losses.nt_xent(jnp.asarray(z_a, jnp.bfloat16), jnp.asarray(z_b, jnp.bfloat16), 0.2)
  assert bf16_loss.dtype == jnp.float32
  np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
def test_collapsed_embeddings_give_chance_loss_and_finite_gradients(similarity):
  # All 2N embeddings equal: every candidate is equally similar, so each anchor's loss is
  # log(2N - 1), the objective 2 log(2N - 1), and softmax(logits_ab) is uniform over N keys.
  n = 8
  z = np.tile(np.linspace(-1.0, 1.0, 16, dtype=np.float32), (n, 1))
  loss_fn = lambda z_a, z_b: losses.contrastive_loss_and_metrics(z_a, z_b, 0.05, similarity)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(z, z)
  np.testing.assert_allclose(loss, 2 * np.log(2 * n - 1), rtol=1e-5)
  np.testing.assert_allclose(metrics['chance_loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['contrastive_entropy'], np.log(n), rtol=1e-5)
  assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
def test_near_identical_embeddings_at_low_temperature(similarity):
  rng = np.random.default_rng(1)
  z = rng.normal(size=16) + 1e-3 * rng.normal(size=(2, 8, 16))
  z_a, z_b = z.astype(np.float32)
  loss, grads = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))(z_a, z_b, 0.05, similarity)
  assert all(np.isfinite(g).all() for g in grads)
  expected, _ = paper_loss_and_accuracy(z_a, z_b, 0.05, similarity)
  np.testing.assert_allclose(loss, expected, atol=1e-3)


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
def test_gradients_match_official_float64(similarity):
  z_a, z_b = _pairs(5, 6, seed=3)
  objective = lambda z_a, z_b, t, s: losses.contrastive_loss_and_metrics(z_a, z_b, t, s)[0]
  value_and_grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)), static_argnums=3)

  def official_loss(z_a, z_b, temperature, similarity):
    return official_objective_and_metrics(z_a, z_b, temperature, similarity, xp=jnp)[0]

  with jax.enable_x64(True):
    reference = jax.jit(jax.value_and_grad(official_loss, argnums=(0, 1)), static_argnums=3)
    z64 = (jnp.asarray(z_a, jnp.float64), jnp.asarray(z_b, jnp.float64))
    expected = {t: jax.device_get(reference(*z64, t, similarity)) for t in (0.1, 0.5)}
  for temperature, (expected_loss, expected_grads) in expected.items():
    loss, grads = value_and_grad(z_a, z_b, temperature, similarity)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


def test_contrastive_accuracies_hand_case():
  # Unit vectors at angles (degrees): a = [0, 90], b = [10, 200]. Top-1 by angle among all other
  # views: a0 -> b0 (right), a1 -> b0 (wrong, positive b1), b0 -> a0 (right), b1 -> a1 (right):
  # contrastive_acc_all = 3/4. Among the view-b keys only: a0 -> b0 (right), a1 -> b0 (wrong):
  # contrastive_acc = 1/2.
  angles = np.deg2rad([[0.0, 90.0], [10.0, 200.0]])
  z_a, z_b = (np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32) for a in angles)
  for similarity in ('cosine', 'euclidean'):
    _, metrics = losses.contrastive_loss_and_metrics(z_a, z_b, 0.5, similarity)
    np.testing.assert_allclose(metrics['contrastive_acc'], 0.5)
    np.testing.assert_allclose(metrics['contrastive_acc_all'], 0.75)


def test_entropy_hand_case():
  # N = 2, cosine, tau = 1: a0 = b0 = e1, a1 = b1 = e2. Row a0 of logits_ab is [1, 0], so
  # p = [e, 1] / (e + 1); row a1 is [0, 1], the same entropy.
  z = np.eye(2, dtype=np.float32)
  _, metrics = losses.contrastive_loss_and_metrics(z, z, 1.0)
  p = np.array([np.e, 1.0]) / (np.e + 1.0)
  np.testing.assert_allclose(metrics['contrastive_entropy'], -np.sum(p * np.log(p)), rtol=1e-6)
  np.testing.assert_allclose(metrics['contrastive_acc'], 1.0)


@pytest.mark.parametrize('kwargs, shapes, error, message', [
    (dict(temperature=0.0), ((4, 8), (4, 8)), UserError, 'temperature'),
    (dict(temperature=-0.1), ((4, 8), (4, 8)), UserError, 'temperature'),
    (dict(temperature=0.5, similarity='dot'), ((4, 8), (4, 8)), UserError, 'similarity'),
    (dict(temperature=0.5), ((4, 8), (5, 8)), ValueError, 'shape'),
    (dict(temperature=0.5), ((4, 8, 1), (4, 8, 1)), ValueError, 'shape'),
    (dict(temperature=0.5), ((8,), (8,)), ValueError, 'shape'),
])
def test_bad_arguments(kwargs, shapes, error, message):
  z_a, z_b = (np.ones(s, np.float32) for s in shapes)
  with pytest.raises(error, match=message):
    losses.nt_xent(z_a, z_b, **kwargs)
