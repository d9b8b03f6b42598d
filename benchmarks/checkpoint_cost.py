r"""What sealing and verifying checkpoints costs: a config's train state saved three times.

    python benchmarks/checkpoint_cost.py [--config=configs/default.py]

Prints, per save, the checkpoint's files and size, the time of `Checkpointer.save` (synchronous
write + checksums), of the checksums alone and of `Checkpointer.damage` (the check on restore).
"""

import os
import sys
import tempfile
import time

import optax
from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simclr_jax import checkpointing  # noqa: E402
from simclr_jax import models  # noqa: E402
from simclr_jax import train_state as train_state_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs/default.py'), 'Pretraining config.')


def main(argv):
  del argv
  import jax
  config = _CONFIG.value
  model = models.create_model(config.model, num_classes=10)
  state = train_state_lib.create_train_state(model, optax.sgd(0.1), jax.random.key(0),
                                             image_size=config.data.image_size)
  checkpointer = checkpointing.Checkpointer(tempfile.mkdtemp())
  for step in (1, 2, 3):
    state = state.replace(step=state.step + 1)
    start = time.perf_counter()
    checkpointer.save(state, checkpointing.run_metadata(config, 10))
    save_s = time.perf_counter() - start
    step_dir = checkpointer._step_path(step)  # pylint: disable=protected-access
    start = time.perf_counter()
    files = checkpointing._file_checksums(step_dir)  # pylint: disable=protected-access
    checksum_s = time.perf_counter() - start
    start = time.perf_counter()
    assert checkpointer.damage(step) is None
    verify_s = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(parent, name))
               for parent, _, names in os.walk(step_dir) for name in names)
    print(f'step {step}: {len(files)} files, {size / 1e6:.1f} MB; save + seal {save_s:.3f} s, '
          f'checksums {checksum_s:.3f} s, verify {verify_s:.3f} s')
  checkpointer.close()


if __name__ == '__main__':
  app.run(main)
