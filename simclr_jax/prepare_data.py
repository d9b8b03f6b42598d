r"""Builds TFDS datasets from local files, offline.

    python -m simclr_jax.prepare_data fashion_mnist [--source=DIR] [--data_dir=DIR]
    python -m simclr_jax.prepare_data cifar10 --source=cifar-10-binary.tar.gz  # or -python.tar.gz
    python -m simclr_jax.prepare_data my_images --source=DIR  # DIR/<class>/*.png, or DIR/*.jpg

Afterwards `tfds.load(NAME, data_dir=DIR)` reads the dataset. fashion_mnist and cifar10 get the
name, version, features (with TFDS's class names), splits and example keys of TFDS's own
builders; only the download is replaced by local files. Fashion-MNIST's IDX files
are found in /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist) when
--source is not given. Any other NAME is built from an image folder: a 'train' split with a
'label' ClassLabel named after the sub-folders, or without labels for a flat folder. Preparing a
dataset that is already prepared does nothing.
"""

import codecs
import io
import itertools
import os
import pickle
import tarfile

from absl import app
from absl import flags
from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import memory_data

DEFAULT_SOURCES = {'fashion_mnist': memory_data.DEFAULT_FASHION_MNIST_DIR}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
_FOLDER_VERSION = '1.0.0'


def prepare(name, *, source=None, data_dir=None):
  """Builds dataset `name` from `source` (see the module docstring); returns its directory."""
  if name in BUILDERS:
    reference = tfds.builder(name, data_dir=data_dir)
    if reference.is_prepared():
      return reference.data_dir
    source = source or DEFAULT_SOURCES.get(name)
    if source is None:
      raise ValueError(f'Preparing {name} needs --source={_source_example(name)}.')
    info = reference.info
    return _store(name, reference.version, info.features, BUILDERS[name](reference, source),
                  data_dir, description=info.description, homepage=info.homepage,
                  citation=info.citation)
  if name in tfds.list_builders():
    raise ValueError(f'{name!r} is a registered TFDS dataset that this program cannot build; '
                     f'choose another name for an image folder.')
  if source is None:
    raise ValueError(f'{name!r} is not one of {sorted(BUILDERS)}: give --source=DIR, a folder '
                     'of images (DIR/<class>/*.png or DIR/*.png).')
  try:
    return tfds.builder(name, data_dir=data_dir).data_dir  # Prepared before.
  except tfds.core.registered.DatasetNotFoundError:
    features, examples = _image_folder(source)
    return _store(name, _FOLDER_VERSION, features, {'train': examples}, data_dir,
                  description=f'Images from {source}.')


def can_prepare_offline(name):
  """Whether `prepare(name)` works without --source on this machine."""
  source = DEFAULT_SOURCES.get(name)
  return source is not None and os.path.isdir(source)


def command(name, data_dir=None):
  """The shell command that prepares `name` from local files."""
  source = '' if can_prepare_offline(name) else f' --source={_source_example(name)}'
  data_dir = f' --data_dir={data_dir}' if data_dir else ''
  return f'python -m simclr_jax.prepare_data {name}{source}{data_dir}'


def _store(name, version, features, split_examples, data_dir, **info):
  """Writes {split: (key, example) pairs} as TFDS dataset `name`; returns its directory."""
  return tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, features=features, split_datasets=split_examples,
      data_dir=data_dir, **info).data_dir


def _fashion_mnist(reference, source):
  """{split: (key, example)} from the four IDX .gz files in `source`."""
  del reference  # Fashion-MNIST's class names are part of TFDS's feature definition.
  return {split: _examples(*memory_data.read_fashion_mnist(source, split))
          for split in ('train', 'test')}


def _cifar10(reference, archive):
  """{split: (key, example)} from cifar-10-binary.tar.gz or cifar-10-python.tar.gz."""
  with tarfile.open(archive) as tar:
    files = {os.path.basename(m.name): tar.extractfile(m).read()
             for m in tar.getmembers() if m.isfile()}
  if 'batches.meta.txt' in files:
    names = files['batches.meta.txt'].decode().split('\n')
    read_batch = lambda name: _cifar_binary_batch(files[name + '.bin'])
  elif 'batches.meta' in files:
    names = [n.decode() for n in _unpickle(files['batches.meta'])[b'label_names']]
    read_batch = lambda name: _cifar_python_batch(_unpickle(files[name]))
  else:
    raise ValueError(f'{archive} is neither cifar-10-binary.tar.gz nor cifar-10-python.tar.gz.')
  reference.info.features['label'].names = [n for n in names if n]
  batches = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}
  splits = {}
  for split, batch_names in batches.items():
    images, labels = zip(*map(read_batch, batch_names))
    splits[split] = _examples(np.concatenate(images), np.concatenate(labels), id_prefix=split)
  return splits


def _cifar_binary_batch(data):
  records = np.frombuffer(data, np.uint8).reshape(-1, 1 + 3 * 32 * 32)
  return _chw_to_hwc(records[:, 1:]), records[:, 0]


def _cifar_python_batch(batch):
  return _chw_to_hwc(np.asarray(batch[b'data'], np.uint8)), np.asarray(batch[b'labels'])


def _chw_to_hwc(rows):
  return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


class _NumpyUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays only (no arbitrary code from an archive)."""

  _RECONSTRUCT = np._core.multiarray._reconstruct  # pylint: disable=protected-access
  _ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,  # Python 2 / numpy 1 pickles.
      ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
      ('numpy', 'ndarray'): np.ndarray,
      ('numpy', 'dtype'): np.dtype,
      ('_codecs', 'encode'): codecs.encode,  # Bytes in protocol-2 pickles written by Python 3.
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'Refusing to unpickle {module}.{name}.')
    return self._ALLOWED[module, name]


def _unpickle(data):
  return _NumpyUnpickler(io.BytesIO(data), encoding='bytes').load()


def _examples(images, labels, id_prefix=None):
  """(index, example) pairs, keyed by index like TFDS's own builders; images as PNG bytes."""
  for index, (image, label) in enumerate(zip(_png(images), labels)):
    example = {'image': image, 'label': int(label)}
    if id_prefix is not None:
      example['id'] = f'{id_prefix}_{index:05d}'
    yield index, example


def _png(images):
  """PNG encodings of uint8 images [N, H, W, C], computed in parallel.

  Handing TFDS arrays would encode them one TF call at a time (2/3 of the preparation time).
  """
  ds = tf.data.Dataset.from_tensor_slices(images)
  ds = ds.map(tf.io.encode_png, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
  return itertools.chain.from_iterable(ds.as_numpy_iterator())


def _image_folder(source):
  """(features, examples) of DIR/<class>/<image> (labelled) or DIR/<image> (unlabelled)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  # Only reads image headers.
  root = epath.Path(source)
  if not root.is_dir():
    raise ValueError(f'--source={source} is not a directory.')
  class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
  groups = [(d.name, _image_files(d)) for d in class_dirs] or [(None, _image_files(root))]
  paths = [p for _, files in groups for p in files]
  if not paths:
    raise ValueError(f'No {"/".join(IMAGE_EXTENSIONS)} images in {source}.')
  sizes = set()
  for path in paths:
    with Image.open(path) as image:
      sizes.add(image.size)
  height, width = (sizes.pop()[::-1] if len(sizes) == 1 else (None, None))
  jpeg = all(p.suffix.lower() in ('.jpg', '.jpeg') for p in paths)
  features = {'image': tfds.features.Image(shape=(height, width, 3),
                                           encoding_format='jpeg' if jpeg else None)}
  if class_dirs:
    features['label'] = tfds.features.ClassLabel(names=[name for name, _ in groups])
  examples = ((os.fspath(p), {'image': p, **({'label': i} if class_dirs else {})})
              for i, (_, files) in enumerate(groups) for p in files)
  return tfds.features.FeaturesDict(features), examples


def _image_files(directory):
  return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


BUILDERS = {'fashion_mnist': _fashion_mnist, 'cifar10': _cifar10}  # name: split examples.


def _source_example(name):
  return {'fashion_mnist': 'IDX_DIR', 'cifar10': 'cifar-10-binary.tar.gz'}.get(name, 'IMAGE_DIR')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python -m simclr_jax.prepare_data NAME [--source] [--data_dir]')
  path = prepare(argv[1], source=flags.FLAGS.source, data_dir=flags.FLAGS.data_dir)
  print(f'{argv[1]} is ready in {path}')


if __name__ == '__main__':
  # Defined here, not on import: data.py imports this module into programs with their own flags.
  flags.DEFINE_string('source', None, 'IDX folder, CIFAR-10 archive or image folder.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default ~/tensorflow_datasets).')
  app.run(main)
