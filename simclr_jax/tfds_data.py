"""The 'tfds' data source: TFDS splits read, decoded and augmented with tf.data on each host.

Batches are host-local numpy dicts (simclr_jax/data.py turns them into global arrays). Each
process reads its own part of the split (`tfds.split_for_jax_process`), and all processes yield
the same number of batches.

Pretraining position: step s is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`.
Epoch e is a fresh pipeline whose file order and shuffle are fixed by (seed, e, process) and whose
augmentation seeds are folded from (seed, e, example id, view), so
`pretrain_batches(..., start_step=s)` yields the batches an uninterrupted run yields from step s
on. The example id is a hash of the example's `tfds_id`, so views do not depend on the number of
processes or on where the example sits in the shuffle.

Decoding: JPEG datasets (e.g. imagenet2012) are read encoded and each view decodes only its crop
window (`tf.image.decode_and_crop_jpeg`); other images (PNG: fashion_mnist, cifar10) are decoded
once per example, after the shuffle and after the examples skipped on resume.
"""

from concurrent import futures
import functools
import itertools
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import augment as augment_lib
from simclr_jax import data
from simclr_jax import errors
from simclr_jax import prepare_data

EVAL_CROP_FRACTION = 0.875
_ID_BUCKETS = 2**62  # Hash range of example ids.


@functools.lru_cache(maxsize=32)
def load_builder(dataset, data_dir=None):
  """The TFDS builder of a prepared dataset with a uint8 'image' feature of 1 or 3 channels."""
  builder = prepare_data.tfds_builder(dataset, data_dir)
  if not builder.is_prepared():
    raise errors.UserError(f'{dataset} is not prepared in {builder.data_dir}; run: '
                           f'{prepare_data.command(dataset, data_dir)}')
  features = builder.info.features
  image = features['image'] if 'image' in features else None
  if not isinstance(image, tfds.features.Image):
    raise errors.UserError(f"{dataset} has no 'image' feature (it has {list(features)}); "
                           'SimCLR needs an image dataset.')
  if image.np_dtype != np.uint8 or image.shape[-1] not in (1, 3):
    raise errors.UserError(f'{dataset} images are {image.np_dtype} {image.shape}; need uint8 '
                           'images with 1 or 3 channels.')
  return builder


def num_examples(builder, split):
  """Examples in `split` ('train', 'train+unlabelled', 'train[:90%]', ...) from TFDS metadata."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise errors.UserError(
        f'{builder.name} has no split {split!r} ({str(e).splitlines()[0]}). Available splits: '
        f'{", ".join(builder.info.splits)}; expressions such as '
        "'train[:90%]' or 'train+test' work too.") from None


def num_classes(builder):
  """Classes of the dataset's 'label' feature, or None when it has no labels."""
  features = builder.info.features
  return features['label'].num_classes if 'label' in features else None


def pretrain_batches(split, *, seed, batch_size, start_step=0, process_index=None,
                     process_count=None):
  """Endless iterator of {'views': float32 [b, 2, H, W, 3], 'label': int32 [b]} from start_step.

  b = batch_size // process_count; label is -1 for datasets without labels. Rows i of `views` are
  two views of one image. The first batch takes a few seconds (the shuffle buffer fills); the next
  epoch's pipeline is built and started in a background thread.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(batch_size, process_count)
  builder, config = split.reader, split.config
  steps = data.steps_per_epoch(split.num_examples, batch_size)
  shard = tfds.split_for_jax_process(split.split, process_index=process_index,
                                     process_count=process_count)
  preprocess = functools.partial(pretrain_preprocess_fn, config, builder.info.features, seed=seed)

  def epoch_batches(epoch, skip_batches):
    shuffle_seed = _epoch_seed(seed, epoch, process_index)
    ds = read_split(builder, shard, shuffle_seed=shuffle_seed)
    ds = ds.shuffle(config.shuffle_buffer, seed=shuffle_seed).take(steps * local_batch)
    ds = ds.skip(skip_batches * local_batch)
    ds = ds.map(preprocess(epoch=epoch), num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds.batch(local_batch, drop_remainder=True))

  epoch, skip_batches = divmod(start_step, steps)
  first = epoch_batches(epoch, skip_batches)  # Built here, so that config errors raise here.
  return _epochs(first, epoch_batches, epoch + 1)


def eval_batches(split, *, batch_size, seed=0, augment=False, epoch=None, process_index=None,
                 process_count=None):
  """Iterator of {'image': float32 [b, H, W, 3], 'label': int32 [b], 'mask': bool [b]}.

  b = batch_size // process_count (batch_size is global). Yields
  `data.eval_steps(split.num_examples, batch_size)` batches on every process; across processes
  every example appears exactly once with mask True, the rest is zero padding with mask False.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(batch_size, process_count)
  builder, config = split.reader, split.config
  steps = data.eval_steps(split.num_examples, batch_size)
  shuffle_seed = None if epoch is None else _epoch_seed(seed, epoch, process_index)
  ds = read_split(builder, tfds.split_for_jax_process(split.split, process_index=process_index,
                                                      process_count=process_count),
                  shuffle_seed=shuffle_seed)
  if shuffle_seed is not None:
    ds = ds.shuffle(config.shuffle_buffer, seed=shuffle_seed)
  ds = ds.map(_eval_preprocess_fn(config, builder.info.features, augment=augment, seed=seed,
                                  epoch=epoch or 0),
              num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec))
  ds = ds.concatenate(padding.repeat()).take(steps * local_batch)
  return _finish(ds.batch(local_batch)).as_numpy_iterator()


def example_labels(split):
  """tfds_id and label of every example of the split, in the split's fixed order."""
  ds = read_split(split.reader, split.split).map(lambda ex: (ex['tfds_id'], ex['label']))
  ids, labels = zip(*ds.batch(8192).as_numpy_iterator())
  return np.concatenate(ids), np.concatenate(labels)


def classifier_batches(split, *, seed, batch_size, example_ids=None):
  """Endless training batches {'image', 'label'} (random crop + flip) of the labelled examples.

  `example_ids`, if given, restricts training to those examples (a labelled fraction of the
  split). Reshuffled every epoch; full batches only, so BatchNorm in train mode never sees
  padding. Every process yields steps_per_epoch(examples) batches per epoch, repeating its own
  examples when the labelled subset gives it fewer than its share.
  """
  process_index, process_count = _process(None, None)
  local_batch = _local_batch_size(batch_size, process_count)
  builder, config = split.reader, split.config
  shard = tfds.split_for_jax_process(split.split, process_index=process_index,
                                     process_count=process_count)
  preprocess = functools.partial(_eval_preprocess_fn, config, builder.info.features,
                                 augment=True, seed=seed)
  num_labelled = split.num_examples if example_ids is None else len(example_ids)
  examples_per_epoch = data.steps_per_epoch(num_labelled, batch_size) * local_batch
  labelled = None
  if example_ids is not None:
    labelled = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        example_ids, tf.ones(len(example_ids), tf.bool)), default_value=False)

  for epoch in itertools.count():
    shuffle_seed = _epoch_seed(seed, epoch, process_index)
    ds = read_split(builder, shard, shuffle_seed=shuffle_seed)
    if labelled is not None:
      ds = ds.filter(lambda ex: labelled.lookup(ex['tfds_id']))
    ds = ds.shuffle(config.shuffle_buffer, seed=shuffle_seed).repeat().take(examples_per_epoch)
    ds = ds.map(preprocess(epoch=epoch), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})
    yield from _finish(ds.batch(local_batch, drop_remainder=True)).as_numpy_iterator()


def read_split(builder, split, *, shuffle_seed=None):
  """Raw examples: encoded 'image', 'tfds_id' and the other features; shuffled files if seeded."""
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, add_tfds_id=True, skip_prefetch=True,
                                try_autocache=False)
  return builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                            decoders={'image': tfds.decode.SkipDecoding()},
                            read_config=read_config)


def pretrain_preprocess_fn(config, features, *, seed, epoch):
  """Maps a raw example of `read_split` to {'views': [2, H, W, 3], 'label'} for `epoch`.

  Without host colour augmentation (augment.on_device), colour distortion and blur are left to
  the train step.
  """
  decode = _decoder(features['image'])
  host_color = data.host_color_augmentation(config)
  view_kwargs = dict(
      height=config.image_size, width=config.image_size,
      color_strength=config.augment.color_strength if host_color else 0,
      blur_probability=config.augment.blur_probability if host_color else 0,
      brightness=config.augment.brightness, crop_min_area=config.augment.crop_min_area)

  def preprocess(example):
    image = decode(example['image'])
    example_seed = _example_seed(seed, epoch, example['tfds_id'])
    views = [augment_lib.random_view(image, _fold_in(example_seed, v), **view_kwargs)
             for v in range(2)]
    return {'views': tf.stack(views), 'label': _label(example)}

  return preprocess


def _eval_preprocess_fn(config, features, *, augment, seed, epoch):
  decode = _decoder(features['image'])
  size = dict(height=config.image_size, width=config.image_size)

  def preprocess(example):
    image = decode(example['image'])
    if augment:
      example_seed = _fold_in(_example_seed(seed, epoch, example['tfds_id']), 0)
      view = augment_lib.random_view(image, example_seed, color_strength=0, blur_probability=0,
                                     **size)
    else:
      view = augment_lib.eval_view(image, crop_fraction=EVAL_CROP_FRACTION, **size)
    return {'image': view, 'label': _label(example), 'mask': tf.constant(True)}

  return preprocess


def _epochs(first, epoch_batches, next_epoch):
  """Numpy batches of `first`, then of epochs next_epoch, next_epoch + 1, ...

  While one epoch is consumed, the next one is built and its first batch computed in a
  background thread, so epoch boundaries do not stall on the shuffle buffer.
  """
  def start(ds):
    batches = ds.as_numpy_iterator()
    return itertools.chain([next(batches)], batches)

  pool = futures.ThreadPoolExecutor(1)
  try:
    upcoming = pool.submit(start, first)
    for epoch in itertools.count(next_epoch):
      current = upcoming.result()
      upcoming = pool.submit(lambda e=epoch: start(epoch_batches(e, 0)))
      yield from current
  finally:  # No join: a generator may be closed by the garbage collector on any thread.
    pool.shutdown(wait=False, cancel_futures=True)


def _finish(ds):
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = _num_cpus()
  options.threading.max_intra_op_parallelism = 1
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _num_cpus():
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count()


def _decoder(image_feature):
  """JPEGs stay encoded (views decode their crop windows); other images are decoded here."""
  if image_feature.encoding_format == 'jpeg':
    return lambda encoded: encoded
  return image_feature.decode_example


def _label(example):
  return tf.cast(example.get('label', -1), tf.int32)


def _epoch_seed(seed, epoch, process_index):
  """File order and shuffle seed of one process's epoch."""
  return int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0])


def _example_seed(seed, epoch, tfds_id):
  key = tf.constant([seed, epoch], tf.int64)
  return _fold_in(key, tf.strings.to_hash_bucket_fast(tfds_id, _ID_BUCKETS))


def _fold_in(seed, value):
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))


def _process(process_index, process_count):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  return process_index, process_count


def _local_batch_size(batch_size, process_count):
  if batch_size % process_count:
    raise errors.UserError(f'Batch size {batch_size} is not divisible by the {process_count} '
                           f'processes; use a multiple of {process_count}.')
  return batch_size // process_count
