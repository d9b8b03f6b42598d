"""What the entry points print: our log lines, a progress line, one-line errors.

`quiet_third_party_logs(verbose=False)` keeps INFO and above of this project (as plain lines) and
ERROR and above of everyone else; `details()` logs what a progress line already shows, for
`log_file` and `--verbose` only. JAX and TensorFlow log through their own loggers, but TFDS and
Orbax log through absl's logger like this project, so the filter looks at the logger's name and,
for absl's shared logger, at the file that logged: a record is third-party when its file lies in
the Python installation (site-packages, the standard library) and outside `simclr_jax`. Python
warnings are logged too (logger 'py.warnings', third-party). C++ logs of TensorFlow and XLA are
cut at their source by TF_CPP_MIN_LOG_LEVEL, which takes effect only when set before TensorFlow
or JAX first log; `log_file` therefore records only Python-side logs.
"""

import contextlib
import logging
import os
import shutil
import site
import sys
import sysconfig
import time

from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_DIRS = tuple({
    os.path.join(variant, '')
    for path in [*(sysconfig.get_path(name) for name in ('stdlib', 'platstdlib', 'purelib',
                                                          'platlib')),
                 *site.getsitepackages(), site.getusersitepackages()]
    for variant in (path, os.path.realpath(path))})
_OUR_LOGGERS = ('simclr_jax', '__main__')
_DETAILS_LOGGER = 'simclr_jax.details'
_SHARED_LOGGERS = ('absl', 'root')
_QUIET_ENVIRONMENT = {
    'TF_CPP_MIN_LOG_LEVEL': '2',  # TF and XLA C++ INFO/WARNING: CPU-feature banner, GCS auth.
    'TQDM_DISABLE': '1',  # TFDS's progress bars (read when tqdm is first imported).
}
_BAR_WIDTH = 20


def quiet_third_party_logs(verbose: bool) -> None:
  """Console logs: ours from INFO as plain lines, third-party from ERROR; everything if verbose.

  Call it first in `main`: the environment variables silence C++ logs only when set before
  TensorFlow or JAX are imported; the log filter works whenever it is installed.
  """
  handler = absl_logging.get_absl_handler()
  absl_logging.use_absl_handler()  # app.run installs it; other callers may not have.
  _log_from_info()
  logging.captureWarnings(True)
  handler.removeFilter(_quiet_filter)
  # TensorFlow's oneDNN kernels off in both modes: host augmentation (blur's depthwise conv) then
  # computes the same on every x86 CPU, and TF 2.21 prints no oneDNN banner, which it does on
  # oneDNN-capable CPUs whatever TF_CPP_MIN_LOG_LEVEL says.
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  if verbose:
    handler.setFormatter(absl_logging.PythonFormatter())
  else:
    for name, value in _QUIET_ENVIRONMENT.items():
      os.environ.setdefault(name, value)
    handler.addFilter(_quiet_filter)
    handler.setFormatter(_PlainFormatter())
  tfds = sys.modules.get('tensorflow_datasets')
  if tfds is not None:  # Imported already: tqdm has read its environment.
    tfds.display_progress_bar(verbose)


def import_tensorflow():
  """`import tensorflow`, its native start-up lines hidden unless the console is verbose."""
  quiet = _quiet_filter in absl_logging.get_absl_handler().filters
  with _native_stderr_hidden() if quiet else contextlib.nullcontext():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


@contextlib.contextmanager
def _native_stderr_hidden():
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as devnull:
      os.dup2(devnull.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def log_file(path: str) -> logging.Handler:
  """Also writes the full Python log (third-party INFO included, absl's prefixes) to `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  handler = logging.FileHandler(path)
  handler.setFormatter(absl_logging.PythonFormatter())
  logging.root.addHandler(handler)
  _log_from_info()
  return handler


def fail(program: str, message: str):
  """Prints `<program>: error: <message>` on stderr and exits with status 2."""
  print(f'{program}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def details() -> logging.Logger:
  """A logger for the log file and verbose consoles only (quiet consoles show a progress line)."""
  logger = logging.getLogger(_DETAILS_LOGGER)
  logger.setLevel(logging.INFO)
  return logger


def _log_from_info():
  if absl_logging.get_verbosity() < absl_logging.INFO:
    absl_logging.set_verbosity(absl_logging.INFO)


def _is_ours(record: logging.LogRecord) -> bool:
  if record.name in _SHARED_LOGGERS:
    path = record.pathname
    return path.startswith(_PACKAGE_DIR) or not path.startswith(_LIBRARY_DIRS)
  return record.name.split('.')[0] in _OUR_LOGGERS


def _quiet_filter(record: logging.LogRecord) -> bool:
  if record.name == _DETAILS_LOGGER:
    return False
  return record.levelno >= logging.ERROR or _is_ours(record)


class _PlainFormatter(logging.Formatter):
  """The message alone; warnings and errors keep their level as a prefix."""

  def format(self, record):
    message = super().format(record)
    return message if record.levelno <= logging.INFO else f'{record.levelname}: {message}'


class ProgressLine:
  """Progress as `done/total unit`, a bar, the rate, the ETA and the caller's fields.

  On a terminal, one line rewritten in place (never longer than the terminal is wide); elsewhere
  (a log file, a pipe) a plain line at most every `interval_s` seconds, and one at `close()`. The
  rate is measured from the first `update`, so start-up time (compilation) does not count.
  """

  def __init__(self, total: int, *, unit: str, desc: str = '', stream=None,
               interval_s: float | None = None, clock=time.monotonic):
    self._total = total
    self._unit = unit
    self._desc = desc
    self._stream = sys.stderr if stream is None else stream
    self._tty = _isatty(self._stream)
    self._interval_s = (0.1 if self._tty else 30.0) if interval_s is None else interval_s
    self._clock = clock
    self._created = clock()
    self._start = None  # (done, time) at the first update.
    self._done = 0
    self._fields = {}
    self._updated_time = None
    self._written = None  # (done, fields) of the last line written.
    self._written_time = None if self._tty else self._created  # Plain lines wait an interval.
    self._length = 0  # Of the line on the terminal now.
    self._closed = False

  def update(self, done: int, **fields) -> None:
    """Records progress `done` (of total) and fields shown as `name value`; may write a line."""
    now = self._clock()
    if self._start is None:
      self._start = (done, now)
    self._done, self._fields, self._updated_time = done, fields, now
    if self._written_time is None or now - self._written_time >= self._interval_s:
      self._write(now)

  def close(self) -> None:
    """Writes the final state (unless just written) and ends the terminal line."""
    if self._closed:
      return
    self._closed = True
    if self._written != (self._done, self._fields):
      self._write(self._clock() if self._updated_time is None else self._updated_time)
    if self._tty:
      self._stream.write('\n')
      self._stream.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _write(self, now):
    self._written, self._written_time = (self._done, self._fields), now
    if self._tty:
      width = _columns(self._stream) - 1  # Writing the last column wraps on some terminals.
      line = self._line(now, bar=True)
      if len(line) > width:
        line = self._line(now, bar=False)[:width]
      self._stream.write('\r' + line + ' ' * (min(self._length, width) - len(line)))
      self._length = len(line)
    else:
      self._stream.write(self._line(now, bar=False) + '\n')
    self._stream.flush()

  def _line(self, now, bar):
    fraction = min(1.0, self._done / self._total) if self._total else 1.0
    parts = [f'{self._desc} {self._done}/{self._total} {self._unit}'.lstrip()]
    if bar:
      filled = round(fraction * _BAR_WIDTH)
      parts.append('[' + '#' * filled + '.' * (_BAR_WIDTH - filled) + ']')
    parts.append(f'{100 * fraction:.0f}%')
    first_done, first_time = self._start or (self._done, now)
    rate = None
    if self._done > first_done and now > first_time:
      rate = (self._done - first_done) / (now - first_time)
      parts.append(f'{rate:.0f} {self._unit}/s' if rate >= 100 else f'{rate:.3g} {self._unit}/s')
    if fraction == 1:
      parts.append(f'in {_duration(now - self._created)}')
    elif rate:
      parts.append(f'ETA {_duration((self._total - self._done) / rate)}')
    parts.extend(f'{name} {_value(value)}' for name, value in self._fields.items())
    return '  '.join(parts)


def _isatty(stream):
  isatty = getattr(stream, 'isatty', None)
  return bool(isatty and isatty())


def _columns(stream):
  try:
    columns = os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, OSError, ValueError):  # No file descriptor, or not a terminal.
    columns = 0
  return columns or shutil.get_terminal_size().columns  # 0: a terminal of unknown size.


def _duration(seconds):
  minutes, seconds = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'


def _value(value):
  return f'{value:.4g}' if isinstance(value, float) else str(value)
