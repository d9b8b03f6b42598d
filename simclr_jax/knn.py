"""Weighted k-nearest-neighbour classification of features (InstDisc, solo-learn).

Each query's k most cosine-similar training features vote for their labels with weight
exp(similarity / temperature); a class's score is the sum of its votes.
"""

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def class_scores(queries: jax.Array, keys: jax.Array, key_labels: jax.Array,
                 key_valid: jax.Array, *, num_classes: int, k: int,
                 temperature: float) -> jax.Array:
  """Scores [Q, num_classes] of `queries` [Q, d] against the bank `keys` [N, d].

  `key_valid` [N] marks real keys; padding rows are never neighbours. `keys` should already be
  l2-normalised (normalise the bank once); `queries` are normalised here.
  """
  similarity = l2_normalize(queries) @ keys.T
  similarity = jnp.where(key_valid[None, :], similarity, -jnp.inf)
  top_similarity, top_index = jax.lax.top_k(similarity, min(k, keys.shape[0]))
  weights = jnp.exp(top_similarity / temperature)  # 0 for padding (exp(-inf)).
  votes = jax.nn.one_hot(key_labels[top_index], num_classes, dtype=jnp.float32)
  return jnp.einsum('qk,qkc->qc', weights, votes)
