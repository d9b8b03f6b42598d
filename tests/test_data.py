"""The data API (simclr_jax/data.py) and the tfds source (simclr_jax/tfds_data.py) on tiny datasets
in a temporary dir."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from simclr_jax import data
from simclr_jax import errors
from simclr_jax import tfds_data

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


def _data_config(data_dir, **overrides):
  config = default.get_data_config()
  config.update(dict(dataset='tiny_images', data_dir=data_dir, image_size=16, shuffle_buffer=16))
  config.update_from_flattened_dict(overrides)
  return config


def _split(data_dir, split='train', **overrides):
  return data.open_split(_data_config(data_dir, **overrides), split)


def _pretrain_batches(data_dir, process_index=0, process_count=1, start_step=0, batch_size=BATCH,
                      **overrides):
  return tfds_data.pretrain_batches(_split(data_dir, **overrides), seed=0, batch_size=batch_size,
                                    start_step=start_step, process_index=process_index,
                                    process_count=process_count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_counts(data_dir):
  assert _split(data_dir).num_examples == NUM_TRAIN
  assert _split(data_dir, 'train[:50%]').num_examples == NUM_TRAIN // 2
  assert _split(data_dir, 'train+test').num_examples == NUM_TRAIN + NUM_TEST
  assert _split(data_dir).num_classes == 64
  assert _split(data_dir, dataset='tiny_jpegs').num_classes is None
  assert _split(data_dir).image_shape == (16, 16, 3)
  assert data.steps_per_epoch(50, 8) == 6 and data.eval_steps(13, 4) == 4


def test_step_counts_of_the_official_recipes():
  """simclr_reference.md 5.3: total N * epochs // B + 1, warmup int(round(epochs_w * N // B))."""
  assert data.train_steps(50_000, 512, 1000) == 97_657         # CIFAR-10, README recipe.
  assert data.warmup_steps(50_000, 512, 10) == 976
  assert data.train_steps(1_281_167, 4096, 100) == 31_279      # ImageNet, 100 epochs.
  assert data.warmup_steps(1_281_167, 4096, 10) == 3_127
  assert data.train_steps(1_281_167, 4096, 800) == 250_228     # The released v2 checkpoints.
  assert data.train_steps(1_281_167, 4096, 100, num_train_steps=7) == 7


def test_pretrain_batch_shapes_and_two_different_views(data_dir):
  batch = next(_pretrain_batches(data_dir, **{'augment.blur_probability': 0.5}))
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
    # Only which examples come matters here.
    batches = _pretrain_batches(data_dir, index, process_count, **{'augment.color_strength': 0})
    epoch = _take(batches, steps)
    assert all(b['label'].shape == (BATCH // process_count,) for b in epoch)
    labels.extend(np.concatenate([b['label'] for b in epoch]))
  assert sorted(labels) == list(range(NUM_TRAIN))


def test_resumed_batches_equal_the_uninterrupted_ones(data_dir):
  steps, start_step = NUM_TRAIN // BATCH, 4  # The comparison crosses into epoch 1.
  # Process 1 of 2: per-process seeds too.
  uninterrupted = _take(_pretrain_batches(data_dir, 1, 2), steps + 3)
  resumed = _take(_pretrain_batches(data_dir, 1, 2, start_step=start_step),
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
    batches = list(tfds_data.eval_batches(_split(data_dir, 'test'), batch_size=batch_size,
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
      b['label'] for b in tfds_data.eval_batches(_split(data_dir), batch_size=BATCH,
                                                 process_index=0, process_count=1, epoch=epoch)])
  first, second = order(0), order(1)
  assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(order(1), second)


def test_jpeg_dataset_without_labels(data_dir):
  batch = next(_pretrain_batches(data_dir, batch_size=4, dataset='tiny_jpegs', image_size=24))
  assert batch['views'].shape == (4, 2, 24, 24, 3)
  np.testing.assert_array_equal(batch['label'], -1)
  with pytest.raises(errors.UserError, match='tiny_jpegs has no labels, which evaluation needs'):
    data.eval_batches(_split(data_dir, dataset='tiny_jpegs'), None, batch_size=4)


@pytest.mark.parametrize('overrides,split,match', [
    (dict(dataset='no_such_dataset'), 'train',
     'Unknown dataset .*python -m simclr_jax.prepare_data no_such_dataset --source='),
    ({}, 'validation', 'no split .*Available splits: train, test'),
    ({}, 'train[:200%]', 'no split'),
    (dict(dataset='no_images'), 'train', "no_images has no 'image' feature"),
    (dict(source='hdf5'), 'train', "Unknown data source 'hdf5'"),
])
def test_open_split_errors(data_dir, overrides, split, match):
  with pytest.raises(errors.UserError, match=match):
    _split(data_dir, split, **overrides)


@pytest.mark.parametrize('overrides,batch_size,match', [
    (dict(image_size=32), BATCH, 'image_size=32 exceeds the 16x16 images'),
    ({}, BATCH * 10, 'exceeds the 48 examples'),
])
def test_pretrain_split_errors(data_dir, overrides, batch_size, match):
  with pytest.raises(errors.UserError, match=match):
    data.check_pretrain_split(_split(data_dir, **overrides), batch_size)


@pytest.mark.parametrize('kwargs,match', [
    (dict(process_count=3), 'not divisible by the 3 processes'),
    (dict(process_index=2, process_count=2), 'process_index=2'),
])
def test_process_errors(data_dir, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _pretrain_batches(data_dir, **kwargs)


def test_bad_brightness_raises_before_iterating(data_dir):
  with pytest.raises(ValueError, match='brightness'):
    _pretrain_batches(data_dir, **{'augment.brightness': 'gamma'})


def test_unprepared_datasets_name_the_command(tmp_path):
  config = default.get_data_config()
  config.data_dir = str(tmp_path)
  config.dataset = 'mnist'
  with pytest.raises(errors.UserError, match='tfds build mnist'):
    data.open_split(config, 'train')
  config.dataset = 'cifar10'
  with pytest.raises(errors.UserError,
                     match=f'python -m simclr_jax.prepare_data cifar10 --source=.* '
                           f'--data_dir={tmp_path}'):
    data.open_split(config, 'train')
