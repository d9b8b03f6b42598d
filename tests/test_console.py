"""Tests of the console layer (simclr_jax/console.py)."""

import io
import json
import os
import re
import subprocess
import sys

import pytest

from simclr_jax import console
from simclr_jax import metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_PREFIX = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def _clock(*times):
  return iter(times).__next__


def test_plain_lines_at_most_every_interval():
  stream = io.StringIO()
  # Created at t=0; updates at t=4, 8, 12, 16, 23, 25; closed at t=26.
  progress = console.ProgressLine(100, unit='steps', stream=stream, interval_s=10,
                                  clock=_clock(0, 4, 8, 12, 16, 23, 25, 26))
  for done in (10, 20, 30, 40, 50, 60):
    progress.update(done, loss=4.3125, acc='62.0%')
  progress.close()
  lines = stream.getvalue().splitlines()
  assert '\r' not in stream.getvalue()
  # t=12: 30 done, 20 steps in the 8 s since the first update: 2.5 steps/s, 70 left: 28 s.
  assert lines[0] == '30/100 steps  30%  2.5 steps/s  ETA 0:28  loss 4.312  acc 62.0%'
  # t=23: 50 done, 40 steps in 19 s: 2.105 steps/s, 50 left: 23.75 s.
  assert lines[1] == '50/100 steps  50%  2.11 steps/s  ETA 0:24  loss 4.312  acc 62.0%'
  # close() at t=26 writes the state of t=25: 60 done, 50 steps in 21 s, 40 left: 16.8 s.
  assert lines[2] == '60/100 steps  60%  2.38 steps/s  ETA 0:17  loss 4.312  acc 62.0%'
  assert len(lines) == 3


def test_interval_zero_writes_every_update_and_the_total_time():
  stream = io.StringIO()
  progress = console.ProgressLine(3, unit='images', desc='checking', stream=stream,
                                  interval_s=0, clock=_clock(0, 1, 2, 3, 4))
  for done in (1, 2, 3):
    progress.update(done)
  progress.close()  # The last state is written already.
  assert stream.getvalue().splitlines() == [
      'checking 1/3 images  33%',
      'checking 2/3 images  67%  1 images/s  ETA 0:01',
      'checking 3/3 images  100%  1 images/s  in 0:03',
  ]


def test_terminal_line_is_rewritten_within_the_width(monkeypatch):
  monkeypatch.setenv('COLUMNS', '40')
  stream = _Terminal()
  progress = console.ProgressLine(1000, unit='steps', stream=stream,
                                  clock=_clock(*range(0, 100, 1)))
  for done in range(0, 1001, 100):
    progress.update(done, loss=1.0 / (done + 1), images_per_sec=1234.5)
  progress.close()
  text = stream.getvalue()
  assert text.startswith('\r') and text.endswith('\n') and text.count('\n') == 1
  lines = text[1:-1].split('\r')
  assert len(lines) == 11  # Every update: the clock advances by more than the 0.1 s interval.
  assert all(len(line) <= 39 for line in lines)
  assert lines[0] == '0/1000 steps  0%  loss 1  images_per_se'  # No room for the bar.
  assert lines[5].startswith('500/1000 steps  50%  100 steps/s  ETA 0')
  assert lines[-1].startswith('1000/1000 steps  100%  100 steps/s  in ')


def test_terminal_line_has_a_bar_where_it_fits(monkeypatch):
  monkeypatch.setenv('COLUMNS', '80')
  stream = _Terminal()
  progress = console.ProgressLine(1000, unit='steps', stream=stream, clock=_clock(0, 1, 2, 3))
  for done in (0, 500):
    progress.update(done)
  progress.close()
  assert stream.getvalue().split('\r')[1:] == [
      '0/1000 steps  [....................]  0%',
      '500/1000 steps  [##########..........]  50%  500 steps/s  ETA 0:01\n',
  ]


def test_terminal_line_clears_a_longer_previous_line(monkeypatch):
  monkeypatch.setenv('COLUMNS', '200')
  stream = _Terminal()
  progress = console.ProgressLine(10, unit='steps', stream=stream, clock=_clock(0, 1, 2, 3))
  progress.update(1, note='a note longer than the next line')
  progress.update(2)
  first, second = stream.getvalue()[1:].split('\r')
  assert second == '2/10 steps  [####................]  20%  1 steps/s  ETA 0:08'.ljust(len(first))


def test_fail_prints_one_line_and_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    console.fail('run_pretrain', 'batch_size=100 is not divisible by 8 devices.')
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.err == 'run_pretrain: error: batch_size=100 is not divisible by 8 devices.\n'
  assert not captured.out


_LOGGING_PROGRAM = r'''
import logging, os, sys, warnings
from absl import app
from absl import logging as absl_logging
from simclr_jax import console

def main(argv):
  console.quiet_third_party_logs(verbose=argv[1] == 'verbose')
  print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))  # TensorFlow's import sets it.
  console.log_file(argv[2])
  console.import_tensorflow()  # Its native banner ignores TF_CPP_MIN_LOG_LEVEL.
  from tensorflow_datasets.core.utils import py_utils  # Logs through absl's shared logger.
  absl_logging.info('ours: info')
  console.details().info('details: info')
  py_utils.print_notebook('tfds: info')
  logging.getLogger('jax._src.xla_bridge').warning('jax: warning')
  logging.getLogger('orbax.checkpoint').error('orbax: error')
  warnings.warn('python: warning')

app.run(main)
'''
_MESSAGES = ('ours: info', 'details: info', 'tfds: info', 'jax: warning', 'orbax: error',
             'python: warning')


@pytest.mark.parametrize('verbose', [False, True])
def test_third_party_logs(tmp_path, verbose):
  log = tmp_path / 'log.txt'
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TQDM_DISABLE')}
  result = subprocess.run(
      [sys.executable, '-c', _LOGGING_PROGRAM, 'verbose' if verbose else 'quiet', str(log)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
  lines = result.stderr.splitlines()
  if verbose:
    assert result.stdout == 'None\n'  # C++ logs are left alone.
    for message in _MESSAGES:
      assert any(ABSL_PREFIX.match(line) and message in line for line in lines), message
  else:
    assert result.stdout == '2\n'
    assert lines == ['ours: info', 'ERROR: orbax: error']  # No TensorFlow banner either.
  logged = log.read_text()  # Everything, with absl's prefixes, whatever the console shows.
  for message in _MESSAGES:
    assert any(ABSL_PREFIX.match(line) and message in line for line in logged.splitlines())


def test_training_log_writes_the_records_and_a_plain_line_per_logged_step(tmp_path, capsys):
  with metrics_writer.TrainingLog(str(tmp_path), first_step=0, total_steps=40, batch_size=8,
                                  steps_per_epoch=10, desc='pretrain') as training_log:
    for step, loss in ((20, 5.25), (40, 4.5)):
      training_log(step, {'loss': loss, 'contrastive_acc': 0.25, 'learning_rate': 0.1})
  lines = capsys.readouterr().err.splitlines()  # Not a terminal: one line per call.
  assert len(lines) == 2
  assert lines[0].startswith('pretrain 20/40 steps  50%  epoch 2.00  loss 5.25  acc 25.0%  img/s')
  assert lines[1].startswith('pretrain 40/40 steps  100%  ')
  assert '  epoch 4.00  loss 4.5  acc 25.0%  img/s' in lines[1]
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [(r['step'], r['epoch'], r['loss']) for r in records] == [(20, 2.0, 5.25), (40, 4.0, 4.5)]
