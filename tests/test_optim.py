"""LARS against a NumPy statement of the SimCLR TF update, and the learning-rate schedule."""

import math

import jax
import numpy as np
import pytest

from simclr_jax import optim
from simclr_jax.errors import UserError

# The official exclusions (tf2/model.py L35-69), leaf by leaf. LARS: weight decay and the trust
# ratio for conv and dense kernels outside the supervised head. The supervised head ('probe') gets
# wd * w through the L2 term in the loss on its kernel (not its bias), and no trust ratio.
# Everything else (BatchNorm, biases) gets plain momentum SGD.
ADAPTED = {('encoder', 'conv_init', 'kernel'), ('head', 'dense_out', 'kernel')}
L2_IN_LOSS = {('probe', 'kernel')}


def _params(rng):
  return {
      'encoder': {
          'conv_init': {'kernel': rng.normal(size=(3, 3, 3, 4))},
          'bn_init': {'scale': 1 + 0.1 * rng.normal(size=4), 'bias': 0.1 * rng.normal(size=4)},
      },
      # A zero kernel has |w| = 0 on the first step: trust ratio 1.
      'head': {'dense_out': {'kernel': np.zeros((4, 3))}},
      'probe': {'kernel': rng.normal(size=(3, 2)), 'bias': rng.normal(size=2)},
  }


def _reference_lars(params, grads, learning_rates, weight_decay, momentum, eta):
  """SimCLR's tf2/lars_optimizer.py (classic momentum, L83-137) leaf by leaf, with the supervised
  head's L2 loss term (tf2/model.py L47-60) added to its kernel's gradient."""
  flat = {path: np.array(w) for path, w in _flatten(params).items()}
  velocity = {path: np.zeros_like(w) for path, w in flat.items()}
  for step_grads, lr in zip(grads, learning_rates):
    for path, g in _flatten(step_grads).items():
      w = flat[path]
      trust = 1.0
      if path in L2_IN_LOSS:
        g = g + weight_decay * w  # The gradient of weight_decay * tf.nn.l2_loss(w).
      if path in ADAPTED:
        g = g + weight_decay * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        if w_norm > 0 and g_norm > 0:
          trust = eta * w_norm / g_norm
      velocity[path] = momentum * velocity[path] + lr * trust * g
      flat[path] = w - velocity[path]
  return flat


def _flatten(tree):
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_masks():
  params = _params(np.random.default_rng(0))
  trust = _flatten(optim.trust_ratio_mask(params))
  decay = _flatten(optim.weight_decay_mask(params))
  assert {path for path, adapted in trust.items() if adapted} == ADAPTED
  assert {path for path, decayed in decay.items() if decayed} == ADAPTED | L2_IN_LOSS


def test_lars_matches_reference_with_schedule():
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x.astype(np.float32), _params(rng))
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
           for _ in range(5)]
  schedule = optim.learning_rate_schedule(2.0, 512, num_train_steps=6, warmup_steps=2)
  # A weight decay large enough that wd * w is not lost next to the gradient.
  weight_decay, momentum, eta = 0.5, 0.9, 1e-3
  learning_rates = [float(schedule(step)) for step in range(5)]
  assert learning_rates[0] == 0 and len(set(learning_rates)) == 5

  tx = optim.lars(schedule, weight_decay, momentum=momentum, trust_coefficient=eta)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = jax.tree.map(lambda w, u: w + u, params, updates)

  expected = _reference_lars(_params(np.random.default_rng(0)), grads, learning_rates,
                             weight_decay, momentum, eta)
  for path, w in _flatten(params).items():
    np.testing.assert_allclose(w, expected[path], rtol=1e-5, atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize('scaling, base, batch_size, peak', [
    ('linear', 0.3, 512, 0.6),
    ('sqrt', 0.075, 4096, 4.8),
])
def test_schedule_values(scaling, base, batch_size, peak):
  schedule = optim.learning_rate_schedule(base, batch_size, num_train_steps=100, warmup_steps=10,
                                          scaling=scaling)
  hand = {
      0: 0.0,
      5: peak / 2,                                    # Halfway through warmup.
      10: peak,                                       # End of warmup.
      40: peak * 0.5 * (1 + math.cos(math.pi / 3)),   # A third of the cosine: 0.75 peak.
      55: peak / 2,                                   # Middle of the cosine.
      100: 0.0,
      120: 0.0,
  }
  for step, value in hand.items():
    np.testing.assert_allclose(schedule(step), value, atol=1e-6, err_msg=f'step {step}')


def test_schedule_without_warmup_starts_at_peak():
  schedule = optim.learning_rate_schedule(1.0, 256, num_train_steps=10, warmup_steps=0)
  np.testing.assert_allclose([schedule(0), schedule(5)], [1.0, 0.5], atol=1e-6)


def test_schedule_shorter_than_warmup_stays_in_warmup():
  schedule = optim.learning_rate_schedule(1.0, 512, num_train_steps=10, warmup_steps=20)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(9)], [0.0, 0.5, 0.9], atol=1e-6)


@pytest.mark.parametrize('kwargs', [
    dict(scaling='log'),
    dict(warmup_steps=-1),
    dict(num_train_steps=0),
])
def test_schedule_bad_arguments(kwargs):
  args = dict(base_learning_rate=1.0, batch_size=256, num_train_steps=100, warmup_steps=10)
  with pytest.raises(UserError):
    optim.learning_rate_schedule(**(args | kwargs))
