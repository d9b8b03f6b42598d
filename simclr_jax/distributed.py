"""Multi-process start-up: Cloud TPU pods, GPU clusters, several processes on one machine.

Every process runs the same program. On a Cloud TPU VM pod slice `--multihost` lets JAX read
the topology from the metadata server; elsewhere pass the coordinator explicitly.
"""

import os
import sys
from collections.abc import Callable
from typing import TypeVar

import jax
from absl import logging
from jax.experimental import multihost_utils

from simclr_jax import console
from simclr_jax import errors

_T = TypeVar('_T')


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, multihost: bool = False) -> None:
  """Initialises jax.distributed when asked to; must run before any device is touched.

  With `coordinator_address` (GPU clusters, local processes) every process passes the same
  address and count and its own id; `multihost` (or SIMCLR_MULTIHOST=1) lets JAX read the
  topology itself (Cloud TPU pods, Slurm). Otherwise this is a single-process run.
  """
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise errors.UserError('--coordinator_address needs --num_processes and --process_id.')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif multihost or os.environ.get('SIMCLR_MULTIHOST') == '1':
    jax.distributed.initialize()
  exit_at_once_on_uncaught_exception()
  log = logging.info if jax.process_count() > 1 else console.details().info  # Else in the header.
  log('process %d of %d; %d local / %d global devices (%s)', jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count(),
      jax.devices()[0].platform)


def exit_at_once_on_uncaught_exception() -> None:
  """Makes an uncaught exception end this process right after its traceback is printed.

  In a multi-process run a normal exit waits at JAX's shutdown barrier for every other process,
  up to 5 minutes, and the others are stuck in a collective that waits for this one: the whole
  run would hang for 5 minutes before failing. Exiting at once lets a launcher see the failure
  (and the others abort when the distributed runtime misses this process's heartbeats). In any
  run, it also keeps a thread that never ends (a stuck write) from holding the process.
  """
  previous_hook = sys.excepthook

  def hook(exc_type, exc, traceback):
    previous_hook(exc_type, exc, traceback)
    logging.error('Process %d failed (%s); exiting without waiting for the other processes.',
                  jax.process_index(), exc_type.__name__)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access

  sys.excepthook = hook


def process_0_first(fn: Callable[..., _T], *args, **kwargs) -> _T:
  """Calls `fn(*args, **kwargs)` on process 0, then on the other processes once it returned.

  For work that must not race on a shared file system, such as preparing a TFDS dataset: several
  processes building it at once fail on the final rename. With a shared data_dir the other
  processes then find the work done; on hosts with their own disks each does it once.
  """
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  if jax.process_index() == 0:
    result = fn(*args, **kwargs)
  multihost_utils.sync_global_devices(f'process_0_first {getattr(fn, "__qualname__", fn)}')
  if jax.process_index() != 0:
    result = fn(*args, **kwargs)
  return result
