"""Tests of the in-memory dataset source (simclr_jax/memory_data.py)."""

import functools
import gzip
import os
import subprocess
import sys
import textwrap

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import store_tiny_dataset
from simclr_jax import augment
from simclr_jax import augment_device
from simclr_jax import errors
from simclr_jax import memory_data
from simclr_jax import prepare_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = 'tiny_splits'
# 90 and 30 examples: 5% of 90 is 4.5 and 15% is 13.5, so TFDS's ties-to-even rounding matters.
SPLITS = ['train', 'test', 'train[:90%]', 'train[90%:]', 'train[:5%]', 'train[15%:25%]',
          'train[:10]', 'train[-10:]', 'train[10:-10]', 'train+test', 'train[:50%]+test[50%:]',
          'test[:33.3%]', 'train[-20%:]']
BAD_SPLITS = ['validation', 'train[:100]', 'train[:101%]', 'train[5]', 'train[:]', 'train[1.5:]',
              'train[:10]+nope']

pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  store_tiny_dataset(data_dir, num_train=90, num_test=30, name=DATASET)
  store_tiny_dataset(data_dir, num_train=12, num_test=4, name='tiny_unlabelled', labelled=False)
  return data_dir


@pytest.fixture(scope='module')
def npz_dir(tfds_dir, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp('npz'))
  for split in ('train', 'test'):
    path = memory_data.export_npz(DATASET, split, out_dir, data_dir=tfds_dir)
    assert path == os.path.join(out_dir, DATASET, f'{split}.npz')
  return out_dir


def _write_idx(path, array):
  """A gzipped uint8 IDX file: magic 0x0808, the rank, big-endian dimensions, the data."""
  header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def _fashion_mnist_files(folder, num_train=50, num_test=20):
  """Fashion-MNIST's four IDX files with random content; returns {split: (images, labels)}."""
  rng = np.random.RandomState(0)
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for split, prefix, count in (('train', 'train', num_train), ('test', 't10k', num_test)):
    arrays[split] = (rng.randint(0, 256, (count, 28, 28)).astype(np.uint8),
                     rng.randint(0, 10, count).astype(np.uint8))
    _write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), arrays[split][0])
    _write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), arrays[split][1])
  return arrays


def test_tfds_path_reads_the_split_expressions_as_tfds(tfds_dir):
  builder = tfds.builder(DATASET, data_dir=tfds_dir)
  for split in SPLITS:
    images, labels = memory_data.load_split(DATASET, split, data_dir=tfds_dir)
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
    assert labels.dtype == np.int32
    assert len(images) == len(labels) == builder.info.splits[split].num_examples, split
    examples = [example for part in split.split('+')  # Parts in turn, not interleaved.
                for example in tfds.as_numpy(builder.as_dataset(split=part))]
    np.testing.assert_array_equal(images, [e['image'] for e in examples], err_msg=split)
    np.testing.assert_array_equal(labels, [e['label'] for e in examples], err_msg=split)


def test_npz_path_gives_the_tfds_arrays(tfds_dir, npz_dir):
  for split in SPLITS:
    expected = memory_data.load_split(DATASET, split, data_dir=tfds_dir)
    actual = memory_data.load_split(DATASET, split, data_dir=npz_dir)
    for a, e in zip(actual, expected):
      np.testing.assert_array_equal(a, e, err_msg=split)


@pytest.mark.parametrize('split', BAD_SPLITS)
def test_bad_splits_are_user_errors_on_both_paths(tfds_dir, npz_dir, split):
  for data_dir in (tfds_dir, npz_dir):
    with pytest.raises(errors.UserError):
      memory_data.load_split(DATASET, split, data_dir=data_dir)


def test_unlabelled_datasets(tfds_dir, tmp_path):
  images, labels = memory_data.load_split('tiny_unlabelled', 'train', data_dir=tfds_dir)
  assert images.shape == (12, 16, 16, 3) and labels is None
  memory_data.save_npz(images, None, str(tmp_path / 'unlabelled' / 'train.npz'))
  loaded, labels = memory_data.load_split('unlabelled', 'train[:50%]', data_dir=str(tmp_path))
  np.testing.assert_array_equal(loaded, images[:6])
  assert labels is None


def test_fashion_mnist_idx_files_give_the_tfds_arrays(tmp_path, monkeypatch):
  idx_dir = str(tmp_path / 'idx')
  written = _fashion_mnist_files(idx_dir)
  tfds_dir = str(tmp_path / 'tfds')
  prepare_data.prepare('fashion_mnist', source=idx_dir, data_dir=tfds_dir)  # TFDS's builder.
  monkeypatch.setenv('FASHION_MNIST_DIR', idx_dir)
  for split in ('train', 'test', 'train[:90%]', 'train[90%:]', 'train+test'):
    expected = memory_data.load_split('fashion_mnist', split, data_dir=tfds_dir)
    actual = memory_data.load_split('fashion_mnist', split, data_dir=str(tmp_path / 'empty'))
    for a, e in zip(actual, expected):
      np.testing.assert_array_equal(a, e, err_msg=split)
  images, labels = memory_data.load_split('fashion_mnist', 'test', data_dir=str(tmp_path))
  assert images.shape == (20, 28, 28, 1)
  rows = lambda images, labels: sorted(zip(map(bytes, images.reshape(len(images), -1)), labels))
  assert rows(images, labels) == rows(*written['test'])  # The same examples, in another order.


def test_missing_data_are_user_errors(tmp_path, monkeypatch):
  with pytest.raises(errors.UserError, match='No dataset'):
    memory_data.load_split('no_such_dataset', 'train', data_dir=str(tmp_path))
  monkeypatch.setenv('FASHION_MNIST_DIR', str(tmp_path / 'nowhere'))
  with pytest.raises(errors.UserError, match='FASHION_MNIST_DIR'):
    memory_data.load_split('fashion_mnist', 'train', data_dir=str(tmp_path))
  with pytest.raises(errors.UserError, match='not a TFDS dataset'):
    memory_data.export_npz('no_such_dataset', 'train', str(tmp_path), data_dir=str(tmp_path))


def _images(num=20, size=12, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (num, size, size, 3)).astype(np.uint8)


def test_epoch_permutations_cover_every_example_once():
  orders = [np.asarray(memory_data.epoch_permutation(0, epoch, 37)) for epoch in range(3)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(37))
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[0], memory_data.epoch_permutation(1, 0, 37))


def test_batch_indices_cross_epochs_and_drop_the_remainder():
  settings = dict(batch_size=4, steps_per_epoch=3, num_examples=14)
  indices = jax.jit(functools.partial(memory_data.batch_indices, 5, **settings))
  steps = [np.asarray(indices(step)) for step in range(8)]
  for step, ids in enumerate(steps):
    epoch, batch = divmod(step, 3)
    order = np.asarray(memory_data.epoch_permutation(5, epoch, 14))
    np.testing.assert_array_equal(ids, order[batch * 4:batch * 4 + 4])
  first_epoch = np.concatenate(steps[:3])
  assert len(set(first_epoch)) == 12  # Two examples left out of epoch 0.
  assert not np.array_equal(steps[0], steps[3])


PRETRAIN = dict(seed=3, batch_size=4, steps_per_epoch=5, height=8, width=8, color_strength=0.5,
                blur_probability=0.5)
_pretrain_batch = jax.jit(functools.partial(memory_data.pretrain_batch, **PRETRAIN))


def test_pretrain_batch_is_a_function_of_the_step_alone():
  images, labels = _images(), np.arange(20, dtype=np.int32) % 7
  resumed = jax.device_get(_pretrain_batch(images, labels, 7))
  for step in range(7):
    _pretrain_batch(images, labels, step)
  uninterrupted = jax.device_get(_pretrain_batch(images, labels, 7))
  np.testing.assert_array_equal(resumed['views'], uninterrupted['views'])
  assert resumed['views'].shape == (4, 2, 8, 8, 3) and resumed['views'].dtype == np.float32
  assert 0.0 <= resumed['views'].min() and resumed['views'].max() <= 1.0
  ids = memory_data.batch_indices(3, 7, batch_size=4, steps_per_epoch=5, num_examples=20)
  np.testing.assert_array_equal(resumed['label'], labels[np.asarray(ids)])
  unlabelled = _pretrain_batch(images, None, 7)
  np.testing.assert_array_equal(unlabelled['label'], [-1] * 4)


def test_views_depend_on_seed_epoch_example_and_view_only():
  images, labels = _images(), np.arange(20, dtype=np.int32)
  batch = _pretrain_batch(images, labels, 7)  # Epoch 1.
  view_settings = {k: PRETRAIN[k] for k in ('height', 'width', 'color_strength',
                                            'blur_probability')}
  random_view = jax.jit(functools.partial(augment_device.random_view, **view_settings))
  for position, example in enumerate(np.asarray(batch['label'])):
    for view in range(2):
      key = jax.random.key(3)
      for data in (1, example, view):
        key = jax.random.fold_in(key, data)
      np.testing.assert_allclose(batch['views'][position, view], random_view(images[example], key),
                                 atol=1e-6)

  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  sharded_fn = jax.jit(functools.partial(memory_data.pretrain_batch, **PRETRAIN),
                       out_shardings=NamedSharding(mesh, P('data')))
  sharded = sharded_fn(images, labels, 7)
  np.testing.assert_allclose(sharded['views'], batch['views'], atol=1e-6)
  np.testing.assert_array_equal(sharded['label'], batch['label'])


def test_classifier_batch_is_crop_and_flip_only():
  colours = np.random.RandomState(1).randint(0, 256, (20, 3)).astype(np.uint8)
  images = np.broadcast_to(colours[:, None, None], (20, 12, 12, 3))  # One colour per image.
  labels = np.arange(20, dtype=np.int32)
  batch = jax.jit(functools.partial(memory_data.classifier_batch, seed=0, batch_size=8,
                                    steps_per_epoch=2, height=10, width=10))(images, labels, 1)
  assert batch['image'].shape == (8, 10, 10, 3)
  expected = colours[np.asarray(batch['label'])][:, None, None] / 255.0
  np.testing.assert_allclose(batch['image'], np.broadcast_to(expected, (8, 10, 10, 3)), atol=1e-6)


def test_eval_images_match_tf_eval_views():
  images = _images(num=5, size=40)
  indices = np.array([3, 0])
  actual = jax.jit(functools.partial(memory_data.eval_images, height=36, width=36))(images,
                                                                                    indices)
  for view, index in zip(actual, indices):
    expected = augment.eval_view(tf.constant(images[index]), height=36, width=36)
    np.testing.assert_allclose(view, expected, atol=1e-4)


def test_bad_arrays_and_batching_are_user_errors():
  images = _images()
  with pytest.raises(errors.UserError, match='do not fit'):
    memory_data.pretrain_batch(images, None, 0, **dict(PRETRAIN, batch_size=8))
  with pytest.raises(errors.UserError, match='uint8'):
    memory_data.pretrain_batch(images.astype(np.float32), None, 0, **PRETRAIN)
  with pytest.raises(errors.UserError, match='labels'):
    memory_data.pretrain_batch(images, np.arange(19), 0, **PRETRAIN)


def test_without_tfds_nothing_imports_tensorflow(tmp_path):
  _fashion_mnist_files(str(tmp_path / 'idx'))
  script = textwrap.dedent("""
      import functools, sys
      import jax
      import numpy as np
      from simclr_jax import memory_data
      jax.config.update('jax_disable_most_optimizations', True)
      data_dir = sys.argv[1]
      images, labels = memory_data.load_split(
          'fashion_mnist', 'train[:50%]+test', data_dir=data_dir)
      memory_data.save_npz(images, labels, f'{data_dir}/mine/train.npz')
      images, labels = memory_data.load_split('mine', 'train[:16]', data_dir=data_dir)
      batching = dict(seed=0, batch_size=8, steps_per_epoch=2, height=16, width=16)
      batches = [
          jax.jit(functools.partial(memory_data.pretrain_batch, color_strength=0.5,
                                    blur_probability=0.5, **batching))(images, labels, 3),
          jax.jit(functools.partial(memory_data.classifier_batch, **batching))(images, labels, 3),
          jax.jit(functools.partial(memory_data.eval_images, height=36, width=36))(
              images, np.arange(4)),
      ]
      jax.block_until_ready(batches)
      print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow',
                                                                  'tensorflow_datasets')))
  """)
  env = dict(os.environ, FASHION_MNIST_DIR=str(tmp_path / 'idx'))
  result = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == '[]'
