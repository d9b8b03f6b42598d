r"""Evaluates the encoder of a pretraining run (see configs/eval.py for the protocols).

    python run_eval.py --workdir=runs/default [--config=configs/eval.py] \
        [--config.protocol=linear|linear_features|knn|finetune] [--step=N]

Uses the latest checkpoint of --workdir unless --step is given; writes WORKDIR/eval/<name>.json.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from simclr_jax import distributed

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs/eval.py'),
    'Evaluation configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the pretraining run to evaluate.',
                               required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import tensorflow as tf  # Hide accelerators from tf.data before JAX takes them.
  tf.config.set_visible_devices([], 'GPU')
  distributed.initialize_from_flags()
  from simclr_jax import evaluate
  try:
    evaluate.evaluate(_CONFIG.value, _WORKDIR.value, _STEP.value)
  except evaluate.SetupError as e:
    sys.exit(f'run_eval.py: error: {e}')


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main)
