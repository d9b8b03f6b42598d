"""Several JAX processes: pretraining on 2 processes x 2 CPU devices vs 1 process x 4 devices.

The `slow` tests (about 100 s on 2 shared cores; no network, no accelerator) run the real program:
scripts/launch_local.sh starts run_pretrain.py twice with --coordinator_address=127.0.0.1:<free
port> --num_processes=2 --process_id=i (gloo collectives over loopback). The reference runs
`pretrain.run` in this process on 4 of its CPU devices, fed the concatenation of what the two
processes read (`tfds_data.pretrain_batches(..., process_index=p, process_count=2)` for p = 0, 1),
i.e. the same global batches. The two-process run gets SIGTERM on process 1 only (as a
TPU maintenance event would deliver it) after step SIGTERM_AFTER_STEP, and is then rerun with the
same command. Checked:
  - both processes checkpoint the same step and exit 0; process 0 alone writes the metrics;
  - the rerun resumes from that checkpoint by itself and finishes;
  - per-step losses (interrupted run, then resumed run) and the final parameters equal the
    reference's, to float32 rounding (gloo sums the all-reduces in another order);
  - the checkpoint written by two processes restores in this single process, on one device.
The other tests check the launcher's contract and fast failure with tests/multiprocess_worker.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_pretrain_config
from simclr_jax import checkpointing
from simclr_jax import data
from simclr_jax import mesh as mesh_lib
from simclr_jax import pretrain
from simclr_jax import tfds_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 10             # 6 steps per epoch on the tiny dataset: crosses an epoch boundary.
SIGTERM_AFTER_STEP = 2
LAUNCH_TIMEOUT_S = 420     # Per launch; a hang fails the test instead of blocking CI.
STOP_TIMEOUT_S = 180       # From the SIGTERM to the exit of both processes.


@pytest.fixture(scope='module')
def config(tiny_data_dir):
  # No periodic checkpoints: a checkpoint before NUM_STEPS can only come from the SIGTERM.
  return tiny_pretrain_config(tiny_data_dir, num_train_steps=NUM_STEPS,
                              checkpoint_every_steps=1000)


@pytest.fixture(scope='module')
def reference(config, tmp_path_factory):
  """1 process x 4 devices on the global batches the two processes build together."""
  workdir = str(tmp_path_factory.mktemp('one_process'))
  read_part = tfds_data.pretrain_batches

  def two_process_batches(split, **kwargs):
    parts = [read_part(split, process_index=p, process_count=2, **kwargs) for p in range(2)]
    for batches in zip(*parts):
      yield {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)  # As the subprocesses (env below).
  try:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(tfds_data, 'pretrain_batches', two_process_batches)
      pretrain.run(config, workdir, mesh=mesh_lib.create_mesh(jax.devices()[:4]))
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
  return workdir


def _children(pid):
  """{pid: command line} of the live child processes of `pid`."""
  children = {}
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/stat') as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
      if ppid == pid:
        with open(f'/proc/{entry}/cmdline', 'rb') as f:
          children[int(entry)] = f.read().replace(b'\0', b' ').decode()
    except (OSError, ValueError, IndexError):
      continue
  return children


def _checkpoint_steps(workdir):
  checkpointer = checkpointing.Checkpointer(workdir, create=False)
  try:
    return checkpointer.all_steps()
  finally:
    checkpointer.close()


def _read_metrics(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


class _Launch:
  """scripts/launch_local.sh -n 2 -d 2 run_pretrain.py ..., output in logdir/process_<i>.log."""

  def __init__(self, args, logdir, env):
    os.makedirs(logdir)
    self.logdir = logdir
    with open(os.path.join(logdir, 'process_0.log'), 'w') as log0:
      self.launcher = subprocess.Popen(
          ['bash', os.path.join(REPO, 'scripts', 'launch_local.sh'), '-n', '2', '-d', '2',
           '--logdir', logdir, '--grace', '120', os.path.join(REPO, 'run_pretrain.py'), *args],
          env=env, stdout=log0, stderr=subprocess.STDOUT)
    self.deadline = time.monotonic() + LAUNCH_TIMEOUT_S

  def log(self, process):
    with open(os.path.join(self.logdir, f'process_{process}.log'), errors='replace') as f:
      return f.read()

  def process_pid(self, process):
    pids = [pid for pid, cmd in _children(self.launcher.pid).items()
            if f'--process_id={process}' in cmd]
    assert len(pids) == 1, _children(self.launcher.pid)
    return pids[0]

  def wait_for_step(self, workdir, step):
    while not any(r['step'] >= step for r in _read_metrics(workdir)):
      assert self.launcher.poll() is None, f'exited early:\n{self.log(0)[-3000:]}'
      assert time.monotonic() < self.deadline, f'no step {step} yet:\n{self.log(0)[-3000:]}'
      time.sleep(0.1)

  def wait(self, timeout_s=None, what='finished'):
    timeout_s = timeout_s or max(self.deadline - time.monotonic(), 1)
    try:
      return self.launcher.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'not {what} after {timeout_s:.0f}s; process 0 log:\n{self.log(0)[-3000:]}\n'
                  f'process 1 log:\n{self.log(1)[-3000:]}')

  def kill(self):
    for pid in _children(self.launcher.pid):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    self.launcher.kill()
    self.launcher.wait()


@pytest.fixture(scope='module')
def two_processes(config, tmp_path_factory):
  """The interrupted run, then the rerun of the same command; returns what they left."""
  root = tmp_path_factory.mktemp('two_processes')
  workdir, config_file = str(root / 'workdir'), root / 'config.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config():\n'
                         f'  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(  # Drop conftest's 8 devices; the launcher sets 2 per process.
      f for f in env.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count'))
  env.update(PYTHON=sys.executable, JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             # The rerun loads the executables the first run compiled (written by process 0).
             JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  args = [f'--config={config_file}', f'--workdir={workdir}']

  first = _Launch(args, str(root / 'logs_first'), env)
  try:
    first.wait_for_step(workdir, SIGTERM_AFTER_STEP)
    os.kill(first.process_pid(1), signal.SIGTERM)
    first_status = first.wait(STOP_TIMEOUT_S, 'stopped by SIGTERM to process 1')
  finally:
    if first.launcher.poll() is None:
      first.kill()
  first_metrics = _read_metrics(workdir)
  first_checkpoints = _checkpoint_steps(workdir)
  first_logs = [first.log(0), first.log(1)]

  rerun = _Launch(args, str(root / 'logs_rerun'), env)
  try:
    rerun_status = rerun.wait()
  finally:
    if rerun.launcher.poll() is None:
      rerun.kill()
  return dict(workdir=workdir, first_status=first_status, first_metrics=first_metrics,
              first_checkpoints=first_checkpoints, first_logs=first_logs,
              rerun_status=rerun_status, rerun_logs=[rerun.log(0), rerun.log(1)],
              metrics=_read_metrics(workdir))


def _restore_on_one_device(workdir, config, step):
  """The full TrainState of `workdir`'s checkpoint `step`, on this process's first device."""
  setup = pretrain.build(config, data.open_split(config.data, config.data.train_split),
                         mesh_lib.create_mesh(jax.devices()[:1]))
  checkpointer = checkpointing.Checkpointer(workdir, create=False)
  try:
    state = checkpointer.restore(step, setup.abstract_state())
  finally:
    checkpointer.close()
  return jax.device_get(state)


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_every_process_at_the_same_step(two_processes):
  stop = two_processes['first_metrics'][-1]['step']
  log0, log1 = two_processes['first_logs']
  assert two_processes['first_status'] == 0, log0[-3000:] + log1[-3000:]
  assert SIGTERM_AFTER_STEP < stop < NUM_STEPS
  # Orbax saves only when every process takes part: both stopped at `stop`.
  assert two_processes['first_checkpoints'] == [stop]
  # Process 0 alone writes metrics: each step once.
  assert [r['step'] for r in two_processes['first_metrics']] == list(range(1, stop + 1))


@pytest.mark.slow
def test_rerun_resumes_from_the_checkpoint_and_finishes(two_processes):
  stop = two_processes['first_metrics'][-1]['step']
  log0, log1 = two_processes['rerun_logs']
  assert two_processes['rerun_status'] == 0, log0[-3000:] + log1[-3000:]
  # Continued after `stop` (a restart from scratch would log steps 1.. again).
  assert [r['step'] for r in two_processes['metrics']] == list(range(1, NUM_STEPS + 1))
  assert _checkpoint_steps(two_processes['workdir']) == [stop, NUM_STEPS]
  # TensorBoard: one events file per launch, process 0's.
  assert len(os.listdir(os.path.join(two_processes['workdir'], 'tb'))) == 2


@pytest.mark.slow
def test_losses_and_parameters_match_one_process(two_processes, reference, config):
  expected = _read_metrics(reference)
  actual = two_processes['metrics']
  assert [r['step'] for r in expected] == [r['step'] for r in actual]
  for key in ('loss', 'learning_rate'):
    np.testing.assert_allclose([r[key] for r in actual], [r[key] for r in expected],
                               rtol=1e-5, err_msg=key)  # Seen: 1.4e-7.

  # The checkpoint of two processes (4 devices) restores here, on one device.
  state = _restore_on_one_device(two_processes['workdir'], config, NUM_STEPS)
  state_reference = _restore_on_one_device(reference, config, NUM_STEPS)
  assert int(state.step) == NUM_STEPS
  np.testing.assert_array_equal(state.rng, state_reference.rng)

  # Summation order differs between 4 devices and 1; ten LARS steps amplify it.
  # Seen: differences up to 6e-4 of a leaf's largest entry.
  def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-4,
                               atol=2e-3 * max(np.abs(expected).max(), 1e-3))

  jax.tree.map(close, state.params, state_reference.params)
  jax.tree.map(close, state.batch_stats, state_reference.batch_stats)
  jax.tree.map(close, state.opt_state, state_reference.opt_state)


# scripts/launch_local.sh and distributed.py, with tests/multiprocess_worker.py (seconds each).


def _start_workers(tmp_path, mode, *args):
  out = tmp_path / 'out'
  out.mkdir()
  launcher = subprocess.Popen(
      ['bash', os.path.join(REPO, 'scripts', 'launch_local.sh'), '-n', '2', '-d', '3',
       '--logdir', str(tmp_path / 'logs'), os.path.join(REPO, 'tests', 'multiprocess_worker.py'),
       f'--mode={mode}', f'--out={out}', *args],
      env=dict(os.environ, PYTHON=sys.executable), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint)
  return launcher, out


def _default_sigint():
  # A test run started in the background inherits an ignored SIGINT, which bash cannot trap;
  # the launcher is meant to run in a terminal, where Ctrl-C is delivered.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _records(out, wait_for=2, key=None, timeout=60):
  """The workers' JSON records, once `wait_for` of them exist (and hold `key`)."""
  deadline = time.monotonic() + timeout
  while True:
    records = []
    for name in sorted(os.listdir(out)):
      if name.endswith('.json'):
        with open(out / name) as f:
          records.append(json.load(f))
    if sum(key is None or key in r for r in records) >= wait_for:
      return records
    assert time.monotonic() < deadline, records
    time.sleep(0.05)


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def test_launcher_gives_each_process_its_flags_and_devices(tmp_path):
  launcher, out = _start_workers(tmp_path, 'exit', '--extra=a b')
  assert launcher.wait(timeout=60) == 0, launcher.stdout.read()
  records = _records(out)
  assert [r['process_id'] for r in records] == [0, 1]
  for record in records:
    assert record['coordinator_address'] == records[0]['coordinator_address']
    assert record['coordinator_address'].startswith('127.0.0.1:')
    assert record['num_processes'] == 2 and record['extra'] == 'a b' and not record['other_args']
    assert record['env']['JAX_NUM_CPU_DEVICES'] == '3'
    assert record['env']['JAX_PLATFORMS'] == 'cpu'


def test_launcher_kills_the_others_when_one_process_fails(tmp_path):
  launcher, out = _start_workers(tmp_path, 'fail')
  assert launcher.wait(timeout=60) == 3
  records = _records(out)
  assert not any(_alive(r['pid']) for r in records)
  assert 'process 1 exited with status 3' in launcher.stdout.read()


def _has_pdeathsig():
  try:
    return '--pdeathsig' in subprocess.run(['setpriv', '--help'], capture_output=True,
                                           text=True).stdout
  except OSError:
    return False


@pytest.mark.parametrize('signal_to_launcher', [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_a_signal_to_the_launcher_reaches_every_process_as_sigterm(tmp_path, signal_to_launcher):
  if signal_to_launcher == signal.SIGKILL and not _has_pdeathsig():
    pytest.skip('no `setpriv --pdeathsig` (util-linux >= 2.33) on this machine')
  # SIGKILL cannot be trapped: the processes get SIGTERM as their parent-death signal.
  launcher, out = _start_workers(tmp_path, 'wait')
  _records(out)
  launcher.send_signal(signal_to_launcher)
  launcher.wait(timeout=60)
  records = _records(out, key='signal')
  assert [r['signal'] for r in records] == ['SIGTERM', 'SIGTERM']
  if signal_to_launcher != signal.SIGKILL:
    assert launcher.returncode == 0


def test_a_failing_process_ends_the_run_at_once(tmp_path):
  # Without distributed.exit_at_once_on_uncaught_exception, process 1 would wait up to 5 minutes
  # at JAX's shutdown barrier for process 0, which waits for it in a collective.
  start = time.monotonic()
  launcher, out = _start_workers(tmp_path, 'raise')
  assert launcher.wait(timeout=120) == 1
  assert time.monotonic() - start < 90
  output = launcher.stdout.read()
  assert 'process 1 exited with status 1' in output
  with open(tmp_path / 'logs' / 'process_1.log') as f:
    assert 'RuntimeError: process 1 fails' in f.read()
  assert not any(_alive(r['pid']) for r in _records(out))
