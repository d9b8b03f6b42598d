"""Whole datasets in device memory: uint8 arrays loaded once, batches as pure functions of a step.

For datasets that fit in accelerator memory (CIFAR-10/100, Fashion-MNIST, STL-10's labelled
96 px splits). `load_split` reads a split as uint8 arrays on the host; the caller puts them on the
devices once and passes them (as arguments, never as closed-over constants) to the jitted
`pretrain_batch`, `classifier_batch` or `eval_images`. The epoch permutation, the gather and every
augmentation run on device, with one key per (seed, epoch, example id, view): a batch is a pure
function of (seed, step), the same on any number of devices, so a resumed run sees exactly the
batches of an uninterrupted one.

TensorFlow is imported only to read a prepared TFDS dataset. Without it, or without the prepared
dataset, `load_split` reads plain files: `<data_dir>/<dataset>/<split>.npz` (arrays `images` and,
optionally, `labels`; `export_npz` writes them from TFDS) and, for fashion_mnist, the four IDX
.gz files in $FASHION_MNIST_DIR, put in TFDS's example order. Split expressions ('train[:90%]',
'train+test', ...) select the same examples on both paths.
"""

import functools
import glob
import gzip
import hashlib
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from simclr_jax import augment_device
from simclr_jax import augment_params
from simclr_jax import errors
from simclr_jax import mesh as mesh_lib

DEFAULT_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'  # Debian's dataset-fashion-mnist.
_FASHION_MNIST_PREFIXES = {'train': 'train', 'test': 't10k'}
_BOUND = r'-?[\d_.]+%?'  # A slice bound: examples, or percent of the split.
_SPLIT_RE = re.compile(
    rf'(?P<name>[\w-]+)(?P<slice>\[(?P<start>{_BOUND})?:(?P<stop>{_BOUND})?\])?')
# Folded into the seed's key before the epoch, so that shuffling keys never equal view keys.
_SHUFFLE_STREAM = np.uint32(2**32 - 1)


def load_split(dataset, split, *, data_dir=None):
  """uint8 images [N, H, W, C] and int32 labels [N] (None if unlabelled) of a split expression.

  Expressions as TFDS reads them: 'train', 'test', 'train[:90%]', 'train[-1000:]',
  'train[:50%]+test'; percent bounds are rounded to the closest example, ties to even.
  """
  if _maybe_prepared_for_tfds(dataset, data_dir):
    arrays = _load_tfds(dataset, split, data_dir)
    if arrays is not None:
      return arrays
  images, labels = [], []
  for name, start, stop, percent in _parse_split(split):
    part_images, part_labels = _read_files(dataset, name, data_dir)
    selected = _absolute_slice(start, stop, percent, len(part_images), f'{split!r} of {dataset}')
    images.append(part_images[selected])
    labels.append(None if part_labels is None else part_labels[selected])
  if any(part_labels is None for part_labels in labels):
    return np.concatenate(images), None
  return np.concatenate(images), np.concatenate(labels)


def save_npz(images, labels, path):
  """Writes uint8 images [N, H, W, C] and labels [N] (or None) as a compressed .npz file."""
  images, labels = _checked(np.asarray(images), labels, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {'images': images} if labels is None else {'images': images, 'labels': labels}
  np.savez_compressed(path, **arrays)


def export_npz(dataset, split, out_dir, *, data_dir=None):
  """Writes TFDS split `split` (a name, not an expression) to `<out_dir>/<dataset>/<split>.npz`.

  Carries a small dataset to a machine without TensorFlow, where `load_split(dataset, ...,
  data_dir=out_dir)` reads it. Returns the file's path.
  """
  if not re.fullmatch(r'[\w-]+', split):
    raise errors.UserError(f'Export base splits one by one (e.g. "train"), not {split!r}: '
                           'load_split applies slices and sums to the exported files.')
  arrays = _load_tfds(dataset, split, data_dir)
  if arrays is None:
    raise errors.UserError(f'{dataset} is not a TFDS dataset prepared in '
                           f'{data_dir or _tfds_data_dir()}.')
  path = os.path.join(out_dir, dataset, f'{split}.npz')
  save_npz(*arrays, path)
  return path


def read_idx(path):
  """The uint8 array of a gzipped IDX file (the MNIST file format)."""
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (gzip.BadGzipFile, EOFError) as e:
    raise errors.UserError(f'{path} is not a complete gzip file ({e}).') from None
  if data[:3] != b'\x00\x00\x08':
    raise errors.UserError(f'{path} is not a uint8 IDX file.')
  ndim = data[3]
  shape = np.frombuffer(data, '>u4', count=ndim, offset=4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_fashion_mnist(source, split):
  """Fashion-MNIST's 'train' or 'test' split from its IDX .gz files in folder `source`.

  Returns uint8 images [N, 28, 28, 1] and labels [N], in the files' order.
  """
  prefix = _FASHION_MNIST_PREFIXES[split]
  paths = [os.path.join(source, f'{prefix}-{kind}-ubyte.gz')
           for kind in ('images-idx3', 'labels-idx1')]
  missing = [os.path.basename(path) for path in paths if not os.path.exists(path)]
  if missing:
    raise errors.UserError(f'{source} lacks {" and ".join(missing)}: give the folder of '
                           "Fashion-MNIST's four IDX .gz files (FASHION_MNIST_DIR or --source).")
  images, labels = (read_idx(path) for path in paths)
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise errors.UserError(f'{source}: {prefix} images {images.shape} and labels {labels.shape} '
                           'do not match.')
  return images[..., None], labels


def tfds_example_order(split, num_examples):
  """The order in which TFDS stores the examples keyed 0..num_examples-1 of `split`.

  TFDS writes a split's examples sorted by the md5 hash of (split name, key); its fashion_mnist
  builder keys each example by its index in the IDX files.
  """
  salted = hashlib.md5(split.encode())

  def key_hash(index):
    digest = salted.copy()
    digest.update(str(index).encode())
    return digest.digest()

  return np.array(sorted(range(num_examples), key=key_hash), np.int64)


def epoch_permutation(seed, epoch, num_examples):
  """The order of the examples in `epoch`: int32 [num_examples], drawn on device."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _SHUFFLE_STREAM), epoch)
  return jax.random.permutation(key, num_examples)


def batch_indices(seed, step, *, batch_size, steps_per_epoch, num_examples):
  """Example ids [batch_size] of `step`, int32.

  Step s is batch s % steps_per_epoch of epoch s // steps_per_epoch; an epoch's examples beyond
  steps_per_epoch * batch_size are dropped (no partial batch).
  """
  _check_batching(batch_size, steps_per_epoch, num_examples)
  epoch, batch = jnp.divmod(step, steps_per_epoch)
  order = epoch_permutation(seed, epoch, num_examples)
  return lax.dynamic_slice_in_dim(order, batch * batch_size, batch_size)


def pretrain_batch(images, labels, step, *, seed, batch_size, steps_per_epoch, height, width,
                   color_strength, blur_probability, brightness='multiplicative',
                   crop_min_area=augment_params.CROP_AREA_RANGE[0]):
  """The two SimCLR views of each example of `step`, with its label.

  Returns {'views': float32 [B, 2, height, width, 3] in [0, 1], 'label': int32 [B] (-1 without
  labels)}, B = batch_size. View v of example j in epoch e has the key
  fold_in(fold_in(fold_in(key(seed), e), j), v): it depends neither on the device count nor on
  its position in the batch.
  """
  views, label = _batch_views(images, labels, step, seed=seed, batch_size=batch_size,
                              steps_per_epoch=steps_per_epoch, num_views=2, height=height,
                              width=width, color_strength=color_strength,
                              blur_probability=blur_probability, brightness=brightness,
                              crop_min_area=crop_min_area)
  return {'views': views, 'label': label}


def classifier_batch(images, labels, step, *, seed, batch_size, steps_per_epoch, height, width):
  """One light view (crop and flip only) of each example of `step`, for training classifiers.

  Returns {'image': float32 [B, height, width, 3], 'label': int32 [B]}; keys as `pretrain_batch`.
  """
  views, label = _batch_views(images, labels, step, seed=seed, batch_size=batch_size,
                              steps_per_epoch=steps_per_epoch, num_views=1, height=height,
                              width=width, color_strength=0.0, blur_probability=0.0)
  return {'image': views[:, 0], 'label': label}


def eval_images(images, indices, *, height, width):
  """Evaluation views (`augment_device.eval_view`) of images[indices]: float32 [len, h, w, 3]."""
  _check_arrays(images, None, 'images')
  view_fn = functools.partial(augment_device.eval_view, height=height, width=width)
  return jax.vmap(view_fn)(images[indices])


def _batch_views(images, labels, step, *, seed, batch_size, steps_per_epoch, num_views,
                 **view_settings):
  _check_arrays(images, labels, 'images and labels')
  ids = mesh_lib.shard_along_data(batch_indices(
      seed, step, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
      num_examples=images.shape[0]))
  epoch_key = jax.random.fold_in(jax.random.key(seed), step // steps_per_epoch)
  keys = augment_device.view_keys(epoch_key, ids, num_views)
  views = augment_device.random_views(images[ids], keys, **view_settings)
  if labels is None:
    return views, jnp.full(ids.shape, -1, jnp.int32)
  return views, labels[ids].astype(jnp.int32)


def _check_batching(batch_size, steps_per_epoch, num_examples):
  if batch_size < 1 or steps_per_epoch < 1 or steps_per_epoch * batch_size > num_examples:
    raise errors.UserError(f'{steps_per_epoch} batches of {batch_size} per epoch do not fit in '
                           f'{num_examples} examples: use a batch size of at most {num_examples} '
                           f'and steps_per_epoch = {num_examples} // batch_size.')


def _check_arrays(images, labels, where):
  """UserError unless images are uint8 [N, H, W, 1 or 3] and labels None or [N]."""
  if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
    raise errors.UserError(f'{where}: images must be uint8 [N, H, W, 1 or 3], not '
                           f'{images.dtype} {list(images.shape)}.')
  if labels is not None and tuple(labels.shape) != images.shape[:1]:
    raise errors.UserError(f'{where}: labels {list(labels.shape)} do not match '
                           f'{images.shape[0]} images.')


def _checked(images, labels, where):
  """Host arrays checked and typed: (uint8 images, int32 labels or None)."""
  labels = None if labels is None else np.asarray(labels)
  _check_arrays(images, labels, where)
  return images, None if labels is None else labels.astype(np.int32)


def tensorflow_available():
  """Whether TensorFlow and TFDS are installed (checked without importing them)."""
  return all(importlib.util.find_spec(m) for m in ('tensorflow', 'tensorflow_datasets'))


def _maybe_prepared_for_tfds(dataset, data_dir):
  """Whether TFDS is installed and data_dir may hold `dataset`; checked without importing TF."""
  if not tensorflow_available():
    return False
  data_dir = data_dir or _tfds_data_dir()
  if '://' in data_dir:  # Cloud storage: only TFDS can look.
    return True
  pattern = os.path.join(glob.escape(data_dir), glob.escape(dataset.replace(':', '/')), '**',
                         'dataset_info.json')
  return bool(glob.glob(pattern, recursive=True))


def _load_tfds(dataset, split, data_dir):
  """(images, labels) of a prepared TFDS dataset, or None if TFDS does not find it prepared."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Only on this path.
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    return None
  if not builder.is_prepared():
    return None
  if 'image' not in builder.info.features:
    raise errors.UserError(f'{dataset} has no "image" feature.')
  try:
    sequential = tfds.ReadConfig(interleave_cycle_length=1)  # Storage order, parts in turn.
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, read_config=sequential))
  except (ValueError, KeyError) as e:
    raise errors.UserError(f'{dataset} has no split {split!r} ({str(e).splitlines()[0]}); '
                           f'its splits are {", ".join(builder.info.splits)}.') from None
  return _checked(data['image'], data.get('label'), f'{dataset} {split}')


def _tfds_data_dir():
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def _read_files(dataset, split, data_dir):
  """(images, labels) of base split `split` from its .npz file or, for fashion_mnist, IDX files."""
  folder = os.path.join(data_dir or _tfds_data_dir(), dataset)
  path = os.path.join(folder, f'{split}.npz')
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as arrays:
      if 'images' not in arrays:
        raise errors.UserError(f'{path} has no array "images".')
      return _checked(arrays['images'], arrays['labels'] if 'labels' in arrays else None, path)
  if dataset == 'fashion_mnist' and split in _FASHION_MNIST_PREFIXES:
    source = os.environ.get('FASHION_MNIST_DIR', DEFAULT_FASHION_MNIST_DIR)
    images, labels = read_fashion_mnist(source, split)
    order = tfds_example_order(split, len(images))
    return _checked(images[order], labels[order], source)
  splits = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(folder, '*.npz')))
  if splits:
    raise errors.UserError(f'{dataset} has no split {split!r} in {folder}; it has '
                           f'{", ".join(splits)}.')
  raise errors.UserError(f'No dataset {dataset!r}: no prepared TFDS dataset (or no TensorFlow) '
                         f'and no file {path} (export_npz writes one).')


def _parse_split(split):
  """[(name, start, stop, percent)] of the '+'-separated parts of a split expression.

  start and stop are None (open), ints, or floats when either bound of the part has '%'.
  """
  parts = []
  for part in re.split(r'\s*\+\s*', split.strip()):
    match = _SPLIT_RE.fullmatch(part)
    if (not match or match['name'] == 'all'
        or (match['slice'] and match['start'] is None and match['stop'] is None)):
      raise errors.UserError(f'Unsupported split {split!r}: use split names with optional '
                             "[start:stop] slices in examples or percent, joined by '+', e.g. "
                             "'train[:90%]+test'.")
    percent = '%' in (match['slice'] or '')
    try:
      start, stop = (_bound(match[end], percent) for end in ('start', 'stop'))
    except ValueError:
      raise errors.UserError(f'Split {split!r}: bounds in examples must be integers.') from None
    parts.append((match['name'], start, stop, percent))
  return parts


def _bound(text, percent):
  if text is None:
    return None
  return float(text.rstrip('%')) if percent else int(text)


def _absolute_slice(start, stop, percent, num_examples, what):
  """TFDS's absolute bounds of a [start:stop] slice of num_examples, as a Python slice."""

  def absolute(bound):
    if percent:
      if abs(bound) > 100:
        raise errors.UserError(f'{what}: percent bounds must lie in [-100, 100].')
      return int(round(bound * num_examples / 100.0))  # TFDS's 'closest' rounding.
    return bound

  start = 0 if start is None else absolute(start)
  stop = num_examples if stop is None else absolute(stop)
  if abs(start) > num_examples or abs(stop) > num_examples:
    raise errors.UserError(f'{what}: slice [{start}:{stop}] reaches beyond its {num_examples} '
                           'examples.')
  return slice(start, stop)
