"""What the entry points (run_pretrain.py, run_eval.py) share: their common flags, config-override
checks before anything runs, the quiet console and its log file, and user errors as one line with
exit status 2.

Only entry points call `define_flags`, so importing the library registers no flags.
"""

import contextlib
import os
import re
import sys
from collections.abc import Callable, Sequence

import jax
from absl import flags
from ml_collections import config_flags

from simclr_jax import checkpointing
from simclr_jax import console
from simclr_jax import distributed
from simclr_jax import errors

# Config fields that moved, with where they are now.
MOVED_FIELDS = {name: f'data.{name}' for name in (
    'dataset', 'data_dir', 'train_split', 'eval_split', 'image_size', 'shuffle_buffer',
    'augment', 'prefetch_batches')}


def define_flags() -> None:
  """Flags every entry point has: the console's, --dry_run and the multi-process start-up ones.

  They are registered as the main program's, so its --help lists them (not only --helpfull).
  """
  main = dict(module_name=sys.argv[0])
  flags.DEFINE_bool('verbose', False, 'Show the INFO and WARNING logs of TF, TFDS, Orbax and JAX '
                    'on the console (the log file always has them).', **main)
  flags.DEFINE_bool('dry_run', False, 'Check the config, data, devices and workdir, print the '
                    'plan and exit, writing nothing and compiling nothing.', **main)
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for GPU clusters or local processes.', **main)
  flags.DEFINE_integer('num_processes', None, 'Total number of processes.', **main)
  flags.DEFINE_integer('process_id', None, 'This process index, 0..num_processes-1.', **main)
  flags.DEFINE_bool('multihost', False,
                    'Call jax.distributed.initialize() with no arguments (Cloud TPU pods, Slurm). '
                    'Also enabled by the environment variable SIMCLR_MULTIHOST=1.', **main)


def initialize_distributed() -> None:
  """jax.distributed start-up from the flags of `define_flags`."""
  distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                         num_processes=flags.FLAGS.num_processes,
                         process_id=flags.FLAGS.process_id, multihost=flags.FLAGS.multihost)


def log_to_file(directory: str) -> None:
  """The full log, third-party INFO included, appended to `directory`/log.txt (process 0; local
  directories only: Python's log handlers cannot append to a gs:// object)."""
  checkpointing.check_workdir(directory)
  if '://' not in directory and jax.process_index() == 0:
    console.log_file(os.path.join(directory, 'log.txt'))


def check_moved_fields(argv: Sequence[str], moved: dict[str, str] = MOVED_FIELDS) -> None:
  """Raises UserError for a --config.<field> override of a field that moved."""
  for arg in argv[1:]:
    match = re.match(r'--config\.([A-Za-z_]\w*)', arg)
    if match and match.group(1) in moved:
      old, new = match.group(1), moved[match.group(1)]
      raise errors.UserError(f'config.{old} is now config.{new}: use --config.{new}'
                             f'{arg[len("--config." + old):]}')


def _override_error(error: Exception, argv: Sequence[str]) -> str:
  """One sentence from ml_collections' error for a bad --config.<field> override."""
  text = ' '.join(str(error).replace('\\n', '\n').split())
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    right, wrong = suggestion.groups()
    for arg in argv[1:]:  # ml_collections names the field alone; find its path.
      path = re.match(r'--config\.([\w.]+)', arg)
      if path and wrong in path.group(1).split('.'):
        parts = path.group(1).split('.')
        wrong, right = path.group(1), '.'.join(right if p == wrong else p for p in parts)
        break
    return f'unknown config field {wrong!r}; did you mean --config.{right}?'
  return f'bad config override: {text.strip(chr(39))}'


@contextlib.contextmanager
def _flag_errors_as_one_line(program: str, argv: Sequence[str], moved: dict[str, str]):
  """Bad flags, moved fields and bad config overrides end as one line and exit status 2."""
  try:
    check_moved_fields(argv, moved)
    yield
  except errors.UserError as e:
    console.fail(program, str(e))
  except flags.Error as e:
    console.fail(program, str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    console.fail(program, _override_error(e, argv))


def define_config_flag(program: str, default: str, help_text: str,
                       moved: dict[str, str] = MOVED_FIELDS):
  """--config (ml_collections). Its default config applies the --config.<field> overrides as
  soon as the flag is defined, so their errors are made one line here, not only at parsing."""
  with _flag_errors_as_one_line(program, sys.argv, moved):
    holder = config_flags.DEFINE_config_file('config', default, help_text, lock_config=True)
  flags.FLAGS.register_flag_by_module(sys.argv[0], flags.FLAGS['config'])  # Listed by --help.
  return holder


def parse_flags(program: str, moved: dict[str, str] = MOVED_FIELDS) -> Callable:
  """A flags parser for app.run that turns bad flags and config overrides into one line."""
  def parse(argv):
    with _flag_errors_as_one_line(program, argv, moved):
      return flags.FLAGS(argv)
  return parse


def run_main(program: str, main: Callable[[], None]) -> None:
  """Runs main(); a UserError becomes one line on stderr and exit status 2."""
  try:
    main()
  except errors.UserError as e:
    console.fail(program, str(e))
