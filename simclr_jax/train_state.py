"""The pretraining state: a pytree of arrays, replicated over the mesh."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken.
  params: Any              # {'encoder', 'head', 'probe'}
  batch_stats: Any         # BatchNorm running statistics, same structure.
  opt_state: optax.OptState
  rng: jax.Array           # uint32 key data, for randomness on device.


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
  """Initialises `model` on a dummy batch of two views."""
  dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  return model.init(rng, dummy, train=False)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_size: int) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = init_variables(model, init_rng, image_size)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      rng=jax.random.key_data(state_rng))


def apply_gradients(state: TrainState, grads, batch_stats, *, tx, schedule):
  """The optimizer update of `state`; returns (new state, learning rate of this step)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, schedule(state.step)
