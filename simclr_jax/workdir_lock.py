"""One writer per directory: an exclusive `flock` held while a run writes there.

The kernel releases the lock when its process ends, however it ends, so a lock is never stale.
Only process 0 takes it (the others write only through Orbax, coordinated by process 0's run).
URLs such as gs://bucket/run have no file locks and are not locked, nor are file systems whose
locks fail (a warning says so).
"""

import contextlib
import fcntl
import os
import socket

import jax
from absl import logging

from simclr_jax import errors


@contextlib.contextmanager
def hold(directory: str, name: str = '.lock'):
  """Holds the lock `directory/name` for the block; UserError naming the holder if it is taken."""
  if '://' in directory or jax.process_index() != 0:
    yield
    return
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  with open(path, 'a+') as f:
    locked = True
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise errors.UserError(f'{directory} is in use by {holder} (lock {path}); wait for it to '
                             'finish, or use another directory.') from None
    except OSError as e:  # A file system without locks (some NFS set-ups).
      logging.warning('Cannot lock %s (%s); make sure no other run writes there.', path, e)
      locked = False
    if locked:
      f.seek(0)
      f.truncate()
      f.write(f'pid {os.getpid()} on {socket.gethostname()}')
      f.flush()
    try:
      yield
    finally:
      if locked:
        f.truncate(0)
        fcntl.flock(f, fcntl.LOCK_UN)
