"""What the entry points (run_pretrain.py, run_eval.py) share: their common flags, config-override
checks before anything runs, and user errors as one line with exit status 2.

Only entry points call `define_flags`, so importing the library registers no flags.
"""

import re
from collections.abc import Callable, Sequence

from absl import flags

from simclr_jax import console
from simclr_jax import distributed
from simclr_jax import errors

# Config fields that moved, with where they are now.
MOVED_FIELDS = {name: f'data.{name}' for name in (
    'dataset', 'data_dir', 'train_split', 'eval_split', 'image_size', 'shuffle_buffer',
    'augment', 'prefetch_batches')}


def define_flags() -> None:
  """Flags every entry point has: the multi-process start-up ones."""
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for GPU clusters or local processes.')
  flags.DEFINE_integer('num_processes', None, 'Total number of processes.')
  flags.DEFINE_integer('process_id', None, 'This process index, 0..num_processes-1.')
  flags.DEFINE_bool('multihost', False,
                    'Call jax.distributed.initialize() with no arguments (Cloud TPU pods, Slurm). '
                    'Also enabled by the environment variable SIMCLR_MULTIHOST=1.')


def initialize_distributed() -> None:
  """jax.distributed start-up from the flags of `define_flags`."""
  distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                         num_processes=flags.FLAGS.num_processes,
                         process_id=flags.FLAGS.process_id, multihost=flags.FLAGS.multihost)


def check_moved_fields(argv: Sequence[str], moved: dict[str, str] = MOVED_FIELDS) -> None:
  """Raises UserError for a --config.<field> override of a field that moved."""
  for arg in argv[1:]:
    match = re.match(r'--config\.([A-Za-z_]\w*)', arg)
    if match and match.group(1) in moved:
      old, new = match.group(1), moved[match.group(1)]
      raise errors.UserError(f'config.{old} is now config.{new}: use --config.{new}'
                             f'{arg[len("--config." + old):]}')


def _override_error(error: Exception) -> str:
  """One sentence from ml_collections' error for a bad --config.<field> override."""
  text = ' '.join(str(error).replace('\\n', '\n').split())
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    return (f'unknown config field {suggestion.group(2)!r}; did you mean '
            f'--config.{suggestion.group(1)}?')
  return f'bad config override: {text.strip(chr(39))}'


def parse_flags(program: str, moved: dict[str, str] = MOVED_FIELDS) -> Callable:
  """A flags parser for app.run that turns bad flags and config overrides into one line."""
  def parse(argv):
    try:
      check_moved_fields(argv, moved)
      return flags.FLAGS(argv)
    except errors.UserError as e:
      console.fail(program, str(e))
    except flags.Error as e:
      console.fail(program, str(e).splitlines()[0])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      console.fail(program, _override_error(e))
  return parse


def run_main(program: str, main: Callable[[], None]) -> None:
  """Runs main(); a UserError becomes one line on stderr and exit status 2."""
  try:
    main()
  except errors.UserError as e:
    console.fail(program, str(e))
