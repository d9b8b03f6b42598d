"""Multinomial logistic regression on fixed features, fitted full-batch with L-BFGS on device.

The fast linear evaluation: standardise the features, pick the L2 strength on a held-out part of
the training rows, refit on all of them. Rows carry a weight (0 for padding), so the arrays can be
global, batch-sharded and padded like every other batch in the project.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
import optax.tree

_HIGHEST = jax.lax.Precision.HIGHEST


def standardize(train: jax.Array, weights: jax.Array, *others: jax.Array, eps: float = 1e-6):
  """Scales every column to zero mean and unit variance over the weighted training rows."""
  w = (weights / weights.sum())[:, None]
  mean = jnp.sum(train * w, axis=0)
  std = jnp.sqrt(jnp.sum(jnp.square(train - mean) * w, axis=0)) + eps
  return tuple((x - mean) / std for x in (train, *others))


def logits(params: dict, features: jax.Array) -> jax.Array:
  return jnp.dot(features, params['kernel'], precision=_HIGHEST) + params['bias']


def objective(params: dict, features: jax.Array, labels: jax.Array, weights: jax.Array,
              l2: float) -> jax.Array:
  """Weighted mean softmax cross-entropy + l2 / 2 * |kernel|^2 (the bias is not penalised)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits(params, features), labels)
  return jnp.sum(ce * weights) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(jnp.square(params['kernel']))


def fit(features: jax.Array, labels: jax.Array, weights: jax.Array, l2: float, *,
        num_classes: int, max_steps: int = 500, tolerance: float = 1e-5) -> dict:
  """L-BFGS from zero weights until the gradient norm is below `tolerance` or `max_steps`."""
  params = {'kernel': jnp.zeros((features.shape[1], num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  loss = lambda p: objective(p, features, labels, weights, l2)
  optimizer = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = optimizer.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, 'count')
    grad_norm = optax.tree.norm(optax.tree.get(state, 'grad'))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tolerance))

  params, _ = jax.lax.while_loop(keep_going, step, (params, optimizer.init(params)))
  return params


def accuracy(params: dict, features: jax.Array, labels: jax.Array, weights: jax.Array):
  correct = jnp.argmax(logits(params, features), axis=-1) == labels
  return jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def fit_with_l2_search(features: jax.Array, labels: jax.Array, weights: jax.Array,
                       holdout: jax.Array, l2_grid: Sequence[float], *, num_classes: int,
                       max_steps: int = 500) -> tuple[dict, float, dict]:
  """Chooses the L2 strength by held-out accuracy, then refits on every row.

  `holdout` [N] bool marks the validation rows. Returns (params, chosen l2, {l2: held-out acc}).
  """
  fit_fn = jax.jit(fit, static_argnames=('num_classes', 'max_steps'))
  fit_weights = weights * (~holdout)
  holdout_weights = weights * holdout
  scores = {}
  for l2 in l2_grid:
    params = fit_fn(features, labels, fit_weights, l2, num_classes=num_classes,
                    max_steps=max_steps)
    scores[l2] = float(accuracy(params, features, labels, holdout_weights))
  best = max(l2_grid, key=lambda l2: (scores[l2], l2))  # Ties: the stronger regulariser.
  params = fit_fn(features, labels, weights, best, num_classes=num_classes, max_steps=max_steps)
  return params, best, scores
