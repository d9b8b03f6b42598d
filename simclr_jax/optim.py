"""SimCLR optimisation: LARS with the official exclusions, and the warmup + cosine LR schedule."""

import math

import jax
import optax

from simclr_jax.errors import UserError


def _leaf_names(path) -> list:
  return [getattr(key, 'key', getattr(key, 'name', None)) for key in path]


def weight_decay_mask(params):
  """True for conv and dense kernels, the leaves that get wd * w added to their gradient.

  Biases and BatchNorm parameters are False (the official 'bias' and 'batch_normalization'
  exclusions). The online probe's kernel is True: the official code decays 'head_supervised'
  through an L2 term wd/2 |w|^2 in the loss, whose gradient is the same wd * w.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_names(path)[-1] == 'kernel',
                                          params)


def trust_ratio_mask(params):
  """True for conv and dense kernels outside the online probe ('head_supervised' officially)."""
  def adapted(path, _):
    names = _leaf_names(path)
    return names[-1] == 'kernel' and 'probe' not in names
  return jax.tree_util.tree_map_with_path(adapted, params)


def lars(learning_rate, weight_decay, momentum=0.9, trust_coefficient=1e-3):
  """LARS as in the SimCLR code (classic momentum, learning rate inside the momentum buffer).

  Kernels outside `probe` get weight decay added to the gradient and the trust ratio
  trust_coefficient * |w| / |g| (1 if a norm is 0); the probe's kernel gets weight decay added
  to its gradient and no trust ratio; biases and BatchNorm parameters get plain momentum SGD.
  """
  return optax.lars(learning_rate, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
                    trust_coefficient=trust_coefficient, eps=0.0,
                    trust_ratio_mask=trust_ratio_mask, momentum=momentum, nesterov=False)


def peak_learning_rate(base_learning_rate, batch_size, scaling='linear') -> float:
  """base * batch_size / 256 ('linear') or base * sqrt(batch_size) ('sqrt')."""
  if scaling == 'linear':
    return base_learning_rate * batch_size / 256
  if scaling == 'sqrt':
    return base_learning_rate * math.sqrt(batch_size)
  raise UserError(f"Unknown learning_rate_scaling {scaling!r}; use 'linear' or 'sqrt'.")


def learning_rate_schedule(base_learning_rate, batch_size, num_train_steps, warmup_steps,
                           scaling='linear'):
  """Linear warmup from 0 to the scaled peak (`peak_learning_rate`), then cosine decay to 0 at
  num_train_steps."""
  peak = peak_learning_rate(base_learning_rate, batch_size, scaling)
  if warmup_steps < 0 or num_train_steps < 1:
    raise UserError(f'Need warmup_steps >= 0 and num_train_steps >= 1, got {warmup_steps} and '
                    f'{num_train_steps}; set warmup_epochs >= 0 and a run of at least one step.')
  if warmup_steps >= num_train_steps:  # Short runs never leave the warmup, as in the official code.
    return optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, num_train_steps)


def not_batchnorm_mask(params, batch_stats):
  """True for the leaves of `params` outside BatchNorm layers (the modules with batch_stats)."""
  def outside_batchnorm(path, _):
    node = batch_stats
    for key in path[:-1]:
      name = getattr(key, 'key', getattr(key, 'name', None))
      if not isinstance(node, dict) or name not in node:
        return True
      node = node[name]
    return False
  return jax.tree_util.tree_map_with_path(outside_batchnorm, params)
