"""Test set-up: 8 forced CPU devices, set before JAX initialises its backends.

Tests that need one device build a mesh over `jax.devices()[:1]`; tests that compare device
counts build meshes over 1, 2, 4 or 8 of these devices in the same process.
"""

import contextlib
import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # As console.quiet_third_party_logs.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY_DATASET = 'tiny_images'
TINY_IMAGE_SIZE = 16
TINY_NUM_CLASSES = 4


def store_tiny_dataset(data_dir, num_train=96, num_test=32, seed=0, name=TINY_DATASET,
                       labelled=True):
  """A 16x16 RGB TFDS dataset of random images (labelled or not), written to `data_dir`."""
  import tensorflow_datasets as tfds
  rng = np.random.RandomState(seed)
  features = {'image': tfds.features.Image(shape=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3))}
  if labelled:
    features['label'] = tfds.features.ClassLabel(num_classes=TINY_NUM_CLASSES)

  def examples(n):
    return [(i, {'image': rng.randint(0, 256, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), np.uint8),
                 **({'label': i % TINY_NUM_CLASSES} if labelled else {})}) for i in range(n)]

  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=tfds.features.FeaturesDict(features),
      split_datasets={'train': examples(num_train), 'test': examples(num_test)},
      data_dir=data_dir)
  return data_dir


def assert_frequency(events, probability):
  """Asserts that the frequency of the boolean `events` is within 4 binomial sigma of
  `probability` (a false failure once in ~16,000 seeds)."""
  events = np.asarray(events)
  sigma = np.sqrt(probability * (1 - probability) / events.size)
  assert abs(events.mean() - probability) < 4 * sigma, (events.mean(), probability, sigma)


@contextlib.contextmanager
def count_compilations():
  """Yields a list that collects one entry per XLA compilation made inside the block."""
  import jax.monitoring
  compilations = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compilations.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compilations
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope='module')
def fast_compiles():
  """Most XLA optimisations off: compiles are ~10x faster and results stay exact."""
  import jax
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
  return store_tiny_dataset(str(tmp_path_factory.mktemp('tfds')))


def tiny_pretrain_config(data_dir, **overrides):
  """configs/default.py shrunk to a ResNet-18 of width 1/8 on the tiny dataset; `overrides` are
  flattened field names ('batch_size', 'data.dataset', ...)."""
  from configs import default
  config = default.get_config()
  config.data.update(dict(dataset=TINY_DATASET, data_dir=data_dir, image_size=TINY_IMAGE_SIZE,
                          shuffle_buffer=32))
  config.update(dict(batch_size=16, num_train_steps=4, log_every_steps=1,
                     checkpoint_every_steps=2, warmup_epochs=0.5))
  config.model.width_multiplier = 0.125
  config.update_from_flattened_dict(overrides)
  return config


def write_random_run(workdir, image_size=TINY_IMAGE_SIZE, **model):
  """A run in `workdir` holding one checkpoint of a random tiny model (`model`: config.model
  overrides) with random BatchNorm statistics; returns (model, its variables as NumPy)."""
  import jax
  import jax.numpy as jnp
  import optax
  from simclr_jax import checkpointing
  from simclr_jax import models
  from simclr_jax import train_state as train_state_lib
  config = tiny_pretrain_config('unused', **{'data.image_size': image_size,
                                             **{f'model.{k}': v for k, v in model.items()}})
  net = models.create_model(config.model, num_classes=TINY_NUM_CLASSES)
  state = train_state_lib.create_train_state(net, optax.sgd(0.1), jax.random.key(1),
                                             image_size=image_size)
  rng = np.random.default_rng(0)
  state = state.replace(batch_stats=jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(rng.uniform(0.5, 2, x.shape) if path[-1].key == 'var'
                                  else rng.uniform(-0.2, 0.2, x.shape), x.dtype),
      state.batch_stats))
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(state, checkpointing.run_metadata(config, TINY_NUM_CLASSES))
  checkpointer.wait_until_finished()
  checkpointer.close()
  return net, jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
