r"""Evaluates the encoder of a pretraining run (see configs/eval.py for the protocols).

    python run_eval.py --workdir=runs/default [--config=configs/eval.py] \
        [--config.protocol=linear|linear_features|knn|finetune] [--step=N]

Uses the latest checkpoint of --workdir unless --step is given; writes WORKDIR/eval/<name>.json
and appends the full log to WORKDIR/eval/log.txt. --dry_run prints the plan only.
"""

import os

from absl import app, flags, logging

from simclr_jax import cli
from simclr_jax import console

_MOVED = {name: f'data.{name}' for name in (
    'dataset', 'data_dir', 'image_size', 'train_split', 'eval_split', 'prefetch_batches')}
_CONFIG = cli.define_config_flag(
    'run_eval.py', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs/eval.py'),
    'Evaluation configuration file.', _MOVED)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the pretraining run to evaluate.',
                               required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
cli.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_third_party_logs(flags.FLAGS.verbose)  # Before TensorFlow's import.

  def evaluate():
    tf = console.import_tensorflow()
    tf.config.set_visible_devices([], 'GPU')  # Hide accelerators from tf.data before JAX.
    cli.initialize_distributed()
    from simclr_jax import evaluate as evaluate_lib
    if flags.FLAGS.dry_run:
      print(evaluate_lib.plan(_CONFIG.value, _WORKDIR.value, _STEP.value))
      return
    if os.path.isdir(_WORKDIR.value):  # Else evaluate says what is wrong with it.
      cli.log_to_file(os.path.join(_WORKDIR.value, 'eval'))
    evaluate_lib.evaluate(_CONFIG.value, _WORKDIR.value, _STEP.value)

  cli.run_main('run_eval.py', evaluate)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.parse_flags('run_eval.py', _MOVED))
