"""Device mesh, shardings, and moving host batches onto it."""

import collections
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax import errors

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over all (global) devices.

  `jax.sharding.Mesh` gives Auto axes, so math written on global arrays (BatchNorm statistics,
  the contrastive logits) is partitioned by XLA; `jax.make_mesh` would default to Explicit axes.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_along_data(x: jax.Array) -> jax.Array:
  """`x` constrained to be split over the context mesh's data axis (as is without such a mesh).

  Inside a jitted function, this makes XLA partition the work that produces `x` by rows.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return x
  return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def check_global_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises before any compute if `batch_size` cannot be split over devices and processes."""
  num_devices, num_processes = mesh.devices.size, jax.process_count()
  if batch_size <= 0:
    raise errors.UserError(f'batch_size must be positive, got {batch_size}.')
  for count, what in ((num_devices, 'devices'), (num_processes, 'processes')):
    if batch_size % count:
      raise errors.UserError(
          f'Global batch size {batch_size} is not divisible by the {count} {what}; '
          f'set --config.batch_size to a multiple of {num_devices}.')


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Turns this process's slice of a batch into global arrays sharded over `data`."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def prefetch_to_device(batches: Iterable[dict], mesh: Mesh, size: int = 2) -> Iterator[dict]:
  """Global arrays of the host-local `batches`, `size` of them in flight (transfers are async,
  so they overlap compute)."""
  queue = collections.deque()
  iterator = iter(batches)
  for batch in iterator:
    queue.append(to_global(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
