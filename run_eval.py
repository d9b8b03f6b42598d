r"""Evaluates the encoder of a pretraining run (see configs/eval.py for the protocols).

    python run_eval.py --workdir=runs/default [--config=configs/eval.py] \
        [--config.protocol=linear|linear_features|knn|finetune] [--step=N]

Uses the latest checkpoint of --workdir unless --step is given; writes WORKDIR/eval/<name>.json.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from simclr_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs/eval.py'),
    'Evaluation configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the pretraining run to evaluate.',
                               required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
cli.define_flags()
_MOVED = {name: f'data.{name}' for name in (
    'dataset', 'data_dir', 'image_size', 'train_split', 'eval_split', 'prefetch_batches')}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')

  def evaluate():
    import tensorflow as tf  # Hide accelerators from tf.data before JAX takes them.
    tf.config.set_visible_devices([], 'GPU')
    cli.initialize_distributed()
    from simclr_jax import evaluate as evaluate_lib
    evaluate_lib.evaluate(_CONFIG.value, _WORKDIR.value, _STEP.value)

  cli.run_main('run_eval.py', evaluate)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.parse_flags('run_eval.py', _MOVED))
