"""The TF-free core: the memory source's train step and evaluation code import no TensorFlow."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from configs import default
    from simclr_jax import (checkpointing, data, evaluate, losses, memory_data, mesh, models,
                            monitor, optim, pretrain, protocols, train_state)
    jax.config.update('jax_disable_most_optimizations', True)
    rng = np.random.default_rng(0)
    memory_data.save_npz(rng.integers(0, 256, (64, 16, 16, 3), np.uint8),
                         rng.integers(0, 4, 64), f'{sys.argv[1]}/tiny/train.npz')
    config = default.get_config()
    config.data.update(source='memory', dataset='tiny', data_dir=sys.argv[1], image_size=16)
    config.model.width_multiplier = 0.125
    config.batch_size = 16
    the_mesh = mesh.create_mesh(jax.devices()[:1])
    setup = pretrain.build(config, data.open_split(config.data, 'train'), the_mesh)
    with jax.set_mesh(the_mesh):
      state = setup.create_state(jax.random.key(0))
      batch = next(data.pretrain_batches(setup.split, the_mesh, seed=0, batch_size=16))
      state, metrics = setup.step_fn(state, batch)
    print(float(metrics['loss']))
    print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow',
                                                                'tensorflow_datasets')))
""")


def test_memory_source_train_step_imports_no_tensorflow(tmp_path):
  """Even where TensorFlow is installed, the memory source's step never imports it."""
  result = subprocess.run([sys.executable, '-c', _SCRIPT, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  loss, modules = result.stdout.strip().splitlines()[-2:]
  assert float(loss) > 0
  assert modules == '[]'
