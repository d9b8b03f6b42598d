"""Processes: one writer per workdir (a second is refused in one line naming the holder), and a
failure ends the process at once even when a thread would keep it alive."""

import os
import subprocess
import sys

import pytest

from conftest import count_compilations, tiny_pretrain_config
from simclr_jax import errors
from simclr_jax import pretrain
from simclr_jax import workdir_lock

_HOLDER = '''
import sys
from simclr_jax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print('held', flush=True)
  sys.stdin.read()  # Until the test closes stdin.
'''


@pytest.fixture
def held_workdir(tmp_path):
  """A workdir whose lock another process holds; yields (workdir, that process)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, workdir], cwd=root, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert holder.stdout.readline() == 'held\n'
  yield workdir, holder
  holder.kill()
  holder.wait()


def test_second_writer_is_refused_before_compiling(held_workdir, tiny_data_dir):
  workdir, holder = held_workdir
  with count_compilations() as compilations, pytest.raises(
      errors.UserError, match=f'{workdir} is in use by pid {holder.pid} on '):
    pretrain.run(tiny_pretrain_config(tiny_data_dir), workdir)
  assert compilations == []


def test_lock_is_free_once_its_process_is_gone(held_workdir):
  workdir, holder = held_workdir
  holder.kill()  # No clean-up runs: the kernel releases the lock.
  holder.wait()
  with workdir_lock.hold(workdir):
    with pytest.raises(errors.UserError, match=f'in use by pid {os.getpid()}'):
      with workdir_lock.hold(workdir):
        pass
  with workdir_lock.hold(workdir):  # Released at the end of the block.
    pass


_STUCK = '''
import threading
from simclr_jax import distributed
distributed.exit_at_once_on_uncaught_exception()
threading.Thread(target=threading.Event().wait).start()  # A save that never finishes.
raise OSError('Save failed')
'''


def test_failure_exits_at_once_despite_a_stuck_thread():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', _STUCK], cwd=root, capture_output=True,
                          text=True, timeout=60,  # Without the hook: never returns.
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 1 and 'OSError: Save failed' in result.stderr
