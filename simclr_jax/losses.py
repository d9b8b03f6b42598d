"""SimCLR's contrastive objective (NT-Xent), sharded over the context mesh's 'data' axis."""

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simclr_jax.errors import UserError
from simclr_jax.mesh import DATA_AXIS

_SIMILARITIES = ('cosine', 'euclidean')


def _l2_normalize(x):
  # As tf.math.l2_normalize: x / sqrt(max(|x|^2, 1e-12)).
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _safe_sqrt(x):
  """sqrt with gradient 0 (not inf) at 0, so masked zero distances give no NaN."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _similarity(anchors, keys, similarity):
  """Pairwise similarities of l2-normalised rows: cosine, or minus the euclidean distance."""
  dots = jnp.matmul(anchors, keys.T, precision=jax.lax.Precision.HIGHEST)
  if similarity == 'cosine':
    return dots
  # For unit vectors |u - v|^2 = 2 - 2 u.v; rounding can make it slightly negative.
  return -_safe_sqrt(jnp.maximum(2.0 - 2.0 * dots, 0.0))


def _objective_and_metrics(z_a, z_b, temperature, similarity, axis_name=None):
  """The objective and metrics of the global batch, from this shard's N_local pairs.

  With `axis_name` (inside shard_map) each device builds only its [2 N_local, 2 N] logits against
  the all-gathered embeddings, and divides its sums by the global counts before the psum; without
  it, this shard is the whole batch.
  """
  z_a = _l2_normalize(z_a.astype(jnp.float32))
  z_b = _l2_normalize(z_b.astype(jnp.float32))
  n_local = z_a.shape[0]
  if axis_name is None:
    keys_a, keys_b, offset = z_a, z_b, 0
  else:
    keys_a = jax.lax.all_gather(z_a, axis_name, tiled=True)
    keys_b = jax.lax.all_gather(z_b, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n_local
  n = keys_a.shape[0]

  # Columns: [view a of images 0..N-1, view b of images 0..N-1]; rows: local [view a; view b].
  anchors = jnp.concatenate([z_a, z_b])
  logits = _similarity(anchors, jnp.concatenate([keys_a, keys_b]), similarity) / temperature
  image = offset + jnp.arange(n_local)
  self_col = jnp.concatenate([image, image + n])
  positive_col = jnp.concatenate([image + n, image])
  is_self = jnp.arange(2 * n)[None, :] == self_col[:, None]
  logits = jnp.where(is_self, -jnp.inf, logits)

  positive = jnp.take_along_axis(logits, positive_col[:, None], axis=1)[:, 0]
  anchor_losses = jax.nn.logsumexp(logits, axis=1) - positive
  correct_all = jnp.argmax(logits, axis=1) == positive_col
  # The official metrics look only at logits_ab: view-a anchors against the N view-b keys.
  logits_ab = logits[:n_local, n:]
  correct = jnp.argmax(logits_ab, axis=1) == image
  p = jax.nn.softmax(logits_ab, axis=1)
  entropy = -jnp.sum(p * jnp.log(p + 1e-8), axis=1)
  # Sums over global counts, so that the psum gives means over the global batch. The objective
  # is loss_a + loss_b, each a mean over N anchors: the sum of all 2N anchor losses over N.
  sums = {'loss': jnp.sum(anchor_losses) / n,
          'contrastive_acc': jnp.sum(correct) / n,
          'contrastive_entropy': jnp.sum(entropy) / n,
          'contrastive_acc_all': jnp.sum(correct_all) / (2 * n)}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def _data_axis_size():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[DATA_AXIS]


def contrastive_loss_and_metrics(z_a, z_b, temperature, similarity='cosine'):
  """SimCLR's training objective and metrics for the positive pairs (z_a[i], z_b[i]) of a global
  batch of N, as the official code computes them (tf2/objective.py, tf2/metrics.py).

  Returns (loss, metrics):
    loss: loss_a + loss_b, where loss_a is the mean over the N view-a anchors of the cross-entropy
      of finding its positive among its 2N - 1 candidates (loss_b likewise): 2L, twice the paper's
      NT-Xent (`nt_xent`). Training on it makes weight decay and learning rates mean what they
      mean in the official code.
    metrics['contrastive_acc']: fraction of view-a anchors whose positive is the top-1 of the N
      view-b keys (the official metric, the paper's Table 5).
    metrics['contrastive_entropy']: mean over view-a anchors of -sum p log(p + 1e-8),
      p = softmax over the N view-b keys (Table 5).
    metrics['contrastive_acc_all']: fraction of all 2N anchors whose positive is the top-1 of all
      its 2N - 1 candidates.
    metrics['chance_loss']: 2 log(2N - 1), the loss of collapsed (all equal) embeddings.

  Under `jax.set_mesh(mesh)` with a 'data' axis of size > 1, z_a and z_b are split over that axis by
  a shard_map whose devices each compute the logits of their own anchors only. Take gradients
  outside this function (e.g. `jax.grad` of a jitted loss); they are then exact.
  """
  if isinstance(temperature, numbers.Real) and not temperature > 0:
    raise UserError(f'temperature must be > 0, got {temperature}; set --config.temperature.')
  if similarity not in _SIMILARITIES:
    raise UserError(f'Unknown similarity {similarity!r}; set --config.similarity to one of '
                    f'{_SIMILARITIES}.')
  if z_a.ndim != 2 or z_a.shape != z_b.shape:
    raise ValueError(f'z_a and z_b must both be [N, d] with the same shape, got {z_a.shape} '
                     f'and {z_b.shape}.')
  n = z_a.shape[0]
  num_shards = _data_axis_size()
  fn = functools.partial(_objective_and_metrics, temperature=temperature, similarity=similarity)
  if num_shards > 1:
    if n % num_shards:
      raise UserError(f'Batch of {n} pairs does not split over the {num_shards} devices of the '
                      f"'{DATA_AXIS}' mesh axis; make the batch size a multiple of {num_shards}.")
    fn = jax.shard_map(functools.partial(fn, axis_name=DATA_AXIS),
                       in_specs=(P(DATA_AXIS), P(DATA_AXIS)), out_specs=P())
  metrics = fn(z_a, z_b)
  loss = metrics.pop('loss')
  return loss, {**metrics, 'chance_loss': jnp.float32(2 * math.log(2 * n - 1))}


def nt_xent(z_a, z_b, temperature, similarity='cosine'):
  """NT-Xent loss L of SimCLR (Chen et al. 2020, eq. 1) for positive pairs (z_a[i], z_b[i]).

  L = 1/(2N) sum over the 2N anchors i of -log(exp(s(i, j)/tau) / sum_{k != i} exp(s(i, k)/tau)),
  j the positive of i. s is the cosine similarity ('cosine') or minus the euclidean distance
  ('euclidean') of l2-normalised embeddings. Computed in float32. Training differentiates
  2L, the official code's loss_a + loss_b (`contrastive_loss_and_metrics`); this is half of it.
  """
  return contrastive_loss_and_metrics(z_a, z_b, temperature, similarity)[0] / 2
