"""Tests of the TFDS input pipelines (simclr_jax/data.py) on tiny datasets in a temporary dir."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from simclr_jax import data

NUM_TRAIN, NUM_TEST, BATCH = 48, 13, 8


def _store(data_dir, name, features, splits):
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=tfds.features.FeaturesDict(features),
      split_datasets=splits, data_dir=data_dir)


def _labelled(n, rng):
  """Examples whose label is their index, so batches show which examples they hold."""
  return [(i, {'image': rng.randint(0, 256, (16, 16, 3)).astype(np.uint8), 'label': i})
          for i in range(n)]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  path = str(tmp_path_factory.mktemp('tfds'))
  rng = np.random.RandomState(0)
  _store(path, 'tiny_images',
         {'image': tfds.features.Image(shape=(16, 16, 3)),
          'label': tfds.features.ClassLabel(num_classes=64)},
         {'train': _labelled(NUM_TRAIN, rng), 'test': _labelled(NUM_TEST, rng)})
  jpegs = [(i, {'image': rng.randint(0, 256, (30 + i, 40, 3)).astype(np.uint8)})
           for i in range(12)]
  _store(path, 'tiny_jpegs',
         {'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg')},
         {'train': jpegs})
  _store(path, 'no_images', {'x': tfds.features.Scalar(np.int64)}, {'train': [(0, {'x': 1})]})
  return path


def _config(data_dir, **overrides):
  config = default.get_config()
  config.update(dict(dataset='tiny_images', data_dir=data_dir, image_size=16, batch_size=BATCH,
                     shuffle_buffer=16))
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_counts(data_dir):
  assert data.num_examples('tiny_images', 'train', data_dir) == NUM_TRAIN
  assert data.num_examples('tiny_images', 'train[:50%]', data_dir) == NUM_TRAIN // 2
  assert data.num_examples('tiny_images', 'train+test', data_dir) == NUM_TRAIN + NUM_TEST
  assert data.num_classes('tiny_images', data_dir) == 64
  assert data.num_classes('tiny_jpegs', data_dir) is None
  assert data.steps_per_epoch(50, 8) == 6 and data.eval_steps(13, 4) == 4


def test_pretrain_batch_shapes_and_two_different_views(data_dir):
  config = _config(data_dir)
  config.augment.blur_probability = 0.5
  batch = next(data.pretrain_batches(config, process_index=0, process_count=1))
  assert batch['views'].shape == (BATCH, 2, 16, 16, 3) and batch['views'].dtype == np.float32
  assert batch['label'].shape == (BATCH,) and batch['label'].dtype == np.int32
  assert 0.0 <= batch['views'].min() and batch['views'].max() <= 1.0
  differences = np.abs(batch['views'][:, 0] - batch['views'][:, 1]).max(axis=(1, 2, 3))
  assert (differences > 0.01).all()


@pytest.mark.parametrize('process_count', [1, 2])
def test_pretrain_processes_read_disjoint_parts_that_cover_the_split(data_dir, process_count):
  steps = NUM_TRAIN // BATCH
  labels = []
  for index in range(process_count):
    config = _config(data_dir)
    config.augment.color_strength = 0.0  # Only which examples come matters here.
    batches = data.pretrain_batches(config, process_index=index, process_count=process_count)
    epoch = _take(batches, steps)
    assert all(b['label'].shape == (BATCH // process_count,) for b in epoch)
    labels.extend(np.concatenate([b['label'] for b in epoch]))
  assert sorted(labels) == list(range(NUM_TRAIN))


def test_resumed_batches_equal_the_uninterrupted_ones(data_dir):
  config = _config(data_dir)
  steps, start_step = NUM_TRAIN // BATCH, 4  # The comparison crosses into epoch 1.
  kwargs = dict(process_index=1, process_count=2)  # Process 1 of 2: per-process seeds too.
  uninterrupted = _take(data.pretrain_batches(config, **kwargs), steps + 3)
  resumed = _take(data.pretrain_batches(config, start_step=start_step, **kwargs),
                  steps + 3 - start_step)
  for expected, batch in zip(uninterrupted[start_step:], resumed):
    np.testing.assert_array_equal(batch['label'], expected['label'])
    np.testing.assert_array_equal(batch['views'], expected['views'])
  # Epochs differ in order and augmentation.
  assert not np.array_equal(uninterrupted[0]['views'], uninterrupted[steps]['views'])


@pytest.mark.parametrize('process_count', [1, 2])
@pytest.mark.parametrize('augment,epoch', [(False, None), (True, 3)])
def test_eval_yields_every_example_exactly_once(data_dir, process_count, augment, epoch):
  batch_size = 4
  labels = []
  for index in range(process_count):
    batches = list(data.eval_batches(_config(data_dir), 'test', batch_size=batch_size,
                                     process_index=index, process_count=process_count,
                                     augment=augment, epoch=epoch))
    assert len(batches) == data.eval_steps(NUM_TEST, batch_size)
    for batch in batches:
      assert batch['image'].shape == (batch_size // process_count, 16, 16, 3)
      assert batch['mask'].dtype == bool
      assert not batch['image'][~batch['mask']].any()
      labels.extend(batch['label'][batch['mask']])
  assert sorted(labels) == list(range(NUM_TEST))


def test_eval_epochs_are_shuffled_differently(data_dir):
  order = lambda epoch: np.concatenate([
      b['label'] for b in data.eval_batches(_config(data_dir), 'train', batch_size=BATCH,
                                            process_index=0, process_count=1, epoch=epoch)])
  first, second = order(0), order(1)
  assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(order(1), second)


def test_jpeg_dataset_without_labels(data_dir):
  config = _config(data_dir, dataset='tiny_jpegs', image_size=24, batch_size=4)
  batch = next(data.pretrain_batches(config, process_index=0, process_count=1))
  assert batch['views'].shape == (4, 2, 24, 24, 3)
  np.testing.assert_array_equal(batch['label'], -1)
  with pytest.raises(ValueError, match="tiny_jpegs has no 'label'"):
    data.eval_batches(config, 'train', batch_size=4, process_index=0, process_count=1)


@pytest.mark.parametrize('overrides,kwargs,error,match', [
    (dict(dataset='no_such_dataset'), {}, ValueError,
     'Unknown dataset .*python -m simclr_jax.prepare_data no_such_dataset --source='),
    (dict(train_split='validation'), {}, ValueError, 'no split .*Available splits: train, test'),
    (dict(train_split='train[:200%]'), {}, ValueError, 'no split'),
    (dict(dataset='no_images'), {}, ValueError, "no_images has no 'image' feature"),
    (dict(image_size=32), {}, ValueError, 'image_size=32 exceeds the 16x16 images'),
    (dict(batch_size=BATCH * 10), {}, ValueError, 'exceeds the 48 examples'),
    ({}, dict(process_count=3), ValueError, 'not divisible by the 3 processes'),
    ({}, dict(process_index=2, process_count=2), ValueError, 'process_index=2'),
])
def test_pretrain_errors(data_dir, overrides, kwargs, error, match):
  config = _config(data_dir, **overrides)
  with pytest.raises(error, match=match):
    data.pretrain_batches(config, **{'process_index': 0, 'process_count': 1, **kwargs})


def test_bad_brightness_raises_before_iterating(data_dir):
  config = _config(data_dir)
  config.augment.brightness = 'gamma'
  with pytest.raises(ValueError, match='brightness'):
    data.pretrain_batches(config, process_index=0, process_count=1)


def test_unprepared_datasets_name_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build mnist'):
    data.num_examples('mnist', 'train', str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=f'python -m simclr_jax.prepare_data cifar10 --source=.* '
                           f'--data_dir={tmp_path}'):
    data.num_examples('cifar10', 'train', str(tmp_path))


def test_ensure_prepared_without_network(tmp_path, monkeypatch, data_dir):
  def offline(*args, **kwargs):
    raise ConnectionError('Name or service not known\nmore details')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
  with pytest.raises(RuntimeError) as error:
    data.ensure_prepared('mnist', str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and 'ConnectionError' in message and 'tfds build mnist' in message
  data.ensure_prepared('tiny_images', data_dir)  # Prepared: nothing to do, nothing downloaded.
