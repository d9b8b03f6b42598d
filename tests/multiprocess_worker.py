"""A stand-in program for testing scripts/launch_local.sh and simclr_jax/distributed.py.

    multiprocess_worker.py --mode=MODE --out=DIR [--extra=TEXT] --coordinator_address=HOST:PORT \
        --num_processes=N --process_id=I

Writes DIR/process_<I>.json (its pid, flags and JAX environment variables), then by MODE:
  exit  exits 0;
  fail  process 1 exits with status 3 once process 0 has started, which sleeps (as if waiting in
        a collective);
  wait  waits for SIGTERM, adds {"signal": "SIGTERM"} to its file and exits 0;
  raise initialises jax.distributed as run_pretrain.py does, runs one collective, then process 1
        raises while the others wait in a second collective.
Only `raise` initialises JAX.
"""

import json
import os
import signal
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simclr_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODE = flags.DEFINE_enum('mode', None, ['exit', 'fail', 'wait', 'raise'], 'What to do.')
_OUT = flags.DEFINE_string('out', None, 'Directory for process_<i>.json.')
_EXTRA = flags.DEFINE_string('extra', None, 'Recorded as given.')
cli.define_flags()


def main(argv):
  process_id = flags.FLAGS.process_id
  path = os.path.join(_OUT.value, f'process_{process_id}.json')
  record = dict(mode=_MODE.value, coordinator_address=flags.FLAGS.coordinator_address,
                num_processes=flags.FLAGS.num_processes, process_id=process_id,
                pid=os.getpid(), extra=_EXTRA.value, other_args=argv[1:],
                env={k: v for k, v in os.environ.items() if k.startswith('JAX_')})

  def write():
    with open(path + '.tmp', 'w') as f:
      json.dump(record, f)
    os.replace(path + '.tmp', path)

  def on_sigterm(signum, frame):
    del signum, frame
    record['signal'] = 'SIGTERM'
    write()
    sys.exit(0)

  signal.signal(signal.SIGTERM, on_sigterm)
  write()
  if _MODE.value == 'fail' and process_id == 1:
    while not os.path.exists(os.path.join(_OUT.value, 'process_0.json')):
      time.sleep(0.01)
    sys.exit(3)
  if _MODE.value in ('fail', 'wait'):
    time.sleep(600)
  if _MODE.value == 'raise':
    cli.initialize_distributed()
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('both started')
    if process_id == 1:
      raise RuntimeError('process 1 fails')
    multihost_utils.process_allgather(jax.numpy.zeros(1))  # Waits for process 1 forever.


if __name__ == '__main__':
  flags.mark_flags_as_required(['mode', 'out'])
  app.run(main)
