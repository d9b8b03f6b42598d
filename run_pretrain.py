r"""Pretrains a SimCLR encoder.

    python run_pretrain.py --workdir=runs/default [--config=configs/default.py] \
        [--config.batch_size=512 ...] [--dry_run] [--verbose]

Rerunning the same command resumes from the latest intact checkpoint in --workdir. The console
shows a header and a progress line; WORKDIR/log.txt has the full log. --dry_run prints the plan
only. Exit status: 0 done, 1 a failure (traceback), 2 a user error (one line), 128 + N stopped by
signal N after checkpointing (SIGTERM: 143, Ctrl-C: 130).
"""

import os

from absl import app, flags, logging

from simclr_jax import cli
from simclr_jax import console

_CONFIG = cli.define_config_flag(
    'run_pretrain.py',
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs/default.py'),
    'Training configuration file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.',
                               required=True)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume even though the training config differs from the checkpoint\'s (the old config is '
    'kept as config_to_step<N>.json).')
cli.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_third_party_logs(flags.FLAGS.verbose)  # Before TensorFlow's import.

  def pretrain():
    tf = console.import_tensorflow()
    tf.config.set_visible_devices([], 'GPU')  # Hide accelerators from tf.data before JAX.
    cli.initialize_distributed()
    from simclr_jax import pretrain as pretrain_lib
    if flags.FLAGS.dry_run:
      print(pretrain_lib.plan(_CONFIG.value, _WORKDIR.value,
                              allow_config_change=_ALLOW_CONFIG_CHANGE.value))
      return
    cli.log_to_file(_WORKDIR.value)
    pretrain_lib.run(_CONFIG.value, _WORKDIR.value,
                     allow_config_change=_ALLOW_CONFIG_CHANGE.value)

  cli.run_main('run_pretrain.py', pretrain)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.parse_flags('run_pretrain.py'))
