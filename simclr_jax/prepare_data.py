r"""Builds TFDS datasets from local files, offline.

    python -m simclr_jax.prepare_data fashion_mnist [--source=DIR] [--data_dir=DIR]
    python -m simclr_jax.prepare_data cifar10 --source=cifar-10-binary.tar.gz  # or -python.tar.gz
    python -m simclr_jax.prepare_data my_images --source=DIR [--skip_bad_images] [--verbose]

Afterwards `tfds.load(NAME, data_dir=DIR)` reads the dataset. fashion_mnist and cifar10 get the
name, version, features (with TFDS's class names), splits and example keys of TFDS's own
builders; only the download is replaced by local files. Fashion-MNIST's IDX files are found in
/usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist) when --source is not
given. Preparing a dataset that is already prepared does nothing.

Any other NAME (lower case, digits, '_') is built from an image folder DIR:

    DIR/<class>/...              -> a labelled 'train' split
    DIR/*.jpg                    -> an unlabelled 'train' split
    DIR/<split>/<class>/...      -> labelled splits named after the split folders
    DIR/<split>/*.jpg            -> unlabelled splits

Split folders are those named exactly train, test, validation, val, valid, unlabelled or
unlabeled; any other folder is a class. A folder holding both kinds, or class folders beside loose
images, is refused. Class folders are read recursively. The classes are the union of the class
folders of all splits, sorted, so labels agree between splits; a split may lack some classes. In a
labelled dataset, an unlabelled split (e.g. STL-10's DIR/unlabelled/*.png) has label -1. Hidden
files and folders are skipped; files without an image extension (IMAGE_EXTENSIONS) are counted and
ignored.

Every image is decoded completely before anything is written, so unreadable, truncated or
mislabelled files fail here, not during training: they are refused with their count and the first
few paths, or left out with --skip_bad_images (their list is written to skipped_images.txt in the
dataset's directory). Images become 3-channel ('image' has shape (H, W, 3), or (None, None, 3)
when sizes differ). PNGs, and RGB or grayscale JPEGs, are stored as their files' bytes; other
images (CMYK JPEGs, GIF, BMP, WebP, TIFF) are converted to RGB and stored as JPEG (from JPEG) or
PNG. 'image' is JPEG-encoded when every stored image is a JPEG (so training decodes only each
view's crop window).
"""

import codecs
import collections
from concurrent import futures
import contextlib
import dataclasses
import functools
import io
import itertools
import os
import pickle
import re
import tarfile

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from simclr_jax import console
from simclr_jax import memory_data
from simclr_jax.errors import UserError

DEFAULT_SOURCES = {'fashion_mnist': memory_data.DEFAULT_FASHION_MNIST_DIR}
SPLIT_FOLDERS = ('train', 'test', 'validation', 'val', 'valid', 'unlabelled', 'unlabeled')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
SKIPPED_IMAGES_FILE = 'skipped_images.txt'
_FOLDER_VERSION = '1.0.0'
_FOLDER_NAME = re.compile(r'[a-z][a-z0-9_]*')
_JPEG_FORMATS = ('JPEG', 'MPO')  # PIL's names; MPO: cameras' JPEGs with extra frames.
_JPEG_QUALITY = 95  # Of re-encoded JPEGs (e.g. CMYK ones).
_REPORTED_PATHS = 3


def prepare(name, *, source=None, data_dir=None, skip_bad_images=False):
  """Builds dataset `name` from `source` (see the module docstring); returns its directory."""
  if name in BUILDERS:
    reference = tfds.builder(name, data_dir=data_dir)
    if reference.is_prepared():
      return reference.data_dir
    source = source or DEFAULT_SOURCES.get(name)
    if source is None:
      raise UserError(f'Preparing {name} needs --source={_source_example(name)}.')
    info = reference.info
    return _store(name, reference.version, info.features, BUILDERS[name](reference, source),
                  data_dir, description=info.description, homepage=info.homepage,
                  citation=info.citation)
  if is_registered(name):
    raise UserError(f'{name!r} is a registered TFDS dataset that this program cannot build '
                    f'(get it with: {command(name, data_dir)}); choose another name for an '
                    'image folder.')
  if not _FOLDER_NAME.fullmatch(name):
    raise UserError(f'Dataset name {name!r} must be lower case letters, digits and _, starting '
                    'with a letter.')
  prepared = _prepared_builder(name, data_dir)
  if prepared is not None:
    return prepared.data_dir
  if source is None:
    raise UserError(f'{name!r} is not one of {sorted(BUILDERS)}: give --source=DIR, a folder of '
                    'images (DIR/<class>/*.png, DIR/*.png, DIR/train/<class>/*.png, ...).')
  return _image_folder(name, source, data_dir, skip_bad_images)


def ensure_prepared(dataset, data_dir=None):
  """Makes sure `dataset` is prepared in `data_dir`: nothing to do, local files, or a download.

  Builds fashion_mnist from /usr/share/datasets/fashion-mnist when present; lets TFDS download
  other registered datasets (cifar10, stl10, ...). Run it in one process per file system (TFDS
  writes to a temporary folder and renames it, so a race only wastes work).
  """
  builder = tfds_builder(dataset, data_dir)
  if builder.is_prepared():
    return
  if can_prepare_offline(dataset):
    prepare(dataset, data_dir=data_dir)
    return
  logging.warning('%s is not prepared in %s: downloading it with TFDS. Without network access '
                  'this fails after minutes of retries; to prepare it offline instead: %s',
                  dataset, builder.data_dir, command(dataset, data_dir))
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except  # Network errors come in many types.
    reason = (str(e).splitlines() or [''])[0][:200]
    raise UserError(f'Could not download {dataset} ({type(e).__name__}: {reason}); prepare it '
                    f'offline: {command(dataset, data_dir)}') from e


def tfds_builder(dataset, data_dir=None):
  """TFDS's builder of `dataset`: from its code if registered, else from its prepared files.

  Never goes online (TFDS's own look-up of an unknown name queries its community index on GCS).
  """
  if is_registered(dataset):
    return tfds.builder(dataset, data_dir=data_dir)
  builder = _prepared_builder(dataset, data_dir)
  if builder is None:
    raise UserError(f'Unknown dataset {dataset!r}: not a TFDS dataset, nor prepared in '
                    f'{data_dir or tfds.core.constants.DATA_DIR}. To build one from local files: '
                    f'{command(dataset, data_dir)}')
  return builder


def can_prepare_offline(name):
  """Whether `prepare(name)` works without --source on this machine."""
  source = DEFAULT_SOURCES.get(name)
  return source is not None and os.path.isdir(source)


def command(name, data_dir=None):
  """The shell command that prepares `name`: from local files, or TFDS's download."""
  data_dir = f' --data_dir={data_dir}' if data_dir else ''
  if name not in BUILDERS and is_registered(name):
    return f'tfds build {name}{data_dir} (needs internet; or copy a prepared data_dir here)'
  source = '' if can_prepare_offline(name) else f' --source={_source_example(name)}'
  return f'python -m simclr_jax.prepare_data {name}{source}{data_dir}'


@functools.cache
def _registered_names():
  return frozenset(tfds.list_builders(with_community_datasets=False))  # The default goes online.


def is_registered(dataset):
  """Whether TFDS has a builder of this name (looked up offline)."""
  return re.split('[:/]', dataset)[0] in _registered_names()  # 'name/config:version'


def _prepared_builder(name, data_dir):
  """The builder of `name` prepared in `data_dir` (without its code), or None."""
  try:
    return tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    return None


def _store(name, version, features, split_examples, data_dir, **info):
  """Writes {split: (count, (key, example) pairs)} as TFDS dataset `name`; returns its directory."""
  written = itertools.count(1)
  total = sum(count for count, _ in split_examples.values())
  with console.ProgressLine(total, unit='images', desc=f'writing {name}') as progress:

    def counted(examples):
      for example in examples:
        yield example
        progress.update(next(written))

    # TFDS prints notes to stdout ('Downloading and preparing dataset Unknown size ...').
    with contextlib.redirect_stdout(io.StringIO()):
      builder = tfds.dataset_builders.store_as_tfds_dataset(
          name=name, version=version, features=features, data_dir=data_dir,
          split_datasets={split: counted(examples)
                          for split, (_, examples) in split_examples.items()},
          download_config=tfds.download.DownloadConfig(try_download_gcs=False), **info)
  return builder.data_dir


def _fashion_mnist(reference, source):
  """{split: (count, (key, example) pairs)} from the four IDX .gz files in `source`."""
  del reference  # Fashion-MNIST's class names are part of TFDS's feature definition.
  splits = {}
  for split in ('train', 'test'):
    images, labels = memory_data.read_fashion_mnist(source, split)
    splits[split] = len(images), _examples(images, labels)
  return splits


def _cifar10(reference, archive):
  """{split: (count, (key, example) pairs)} from cifar-10-binary.tar.gz or -python.tar.gz."""
  if not os.path.isfile(archive):
    raise UserError(f'--source={archive} is not a file; give cifar-10-binary.tar.gz or '
                    'cifar-10-python.tar.gz.')
  try:
    with tarfile.open(archive) as tar:
      files = {os.path.basename(m.name): tar.extractfile(m).read()
               for m in tar.getmembers() if m.isfile()}
  except (tarfile.TarError, EOFError, OSError) as e:
    raise UserError(f'{archive} is not a readable tar archive ({e}).') from None
  batches = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}
  if 'batches.meta.txt' in files:
    names = files['batches.meta.txt'].decode().split('\n')
    file_name, read_batch = '{}.bin'.format, _cifar_binary_batch
  elif 'batches.meta' in files:
    names = [n.decode() for n in _unpickle(files['batches.meta'])[b'label_names']]
    file_name, read_batch = '{}'.format, lambda data: _cifar_python_batch(_unpickle(data))
  else:
    raise UserError(f'{archive} is neither cifar-10-binary.tar.gz nor cifar-10-python.tar.gz.')
  missing = [file_name(b) for bs in batches.values() for b in bs if file_name(b) not in files]
  if missing:
    raise UserError(f'{archive} lacks {", ".join(missing)}.')
  reference.info.features['label'].names = [n for n in names if n]
  splits = {}
  for split, batch_names in batches.items():
    images, labels = zip(*(read_batch(files[file_name(b)]) for b in batch_names))
    images, labels = np.concatenate(images), np.concatenate(labels)
    splits[split] = len(images), _examples(images, labels, id_prefix=split)
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
      raise UserError(f'Refusing to unpickle {module}.{name}: this is not CIFAR-10 data.')
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
  # Imported on use: console.quiet_third_party_logs must run before TensorFlow's import.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_tensor_slices(images)
  ds = ds.map(tf.io.encode_png, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
  return itertools.chain.from_iterable(ds.as_numpy_iterator())


@dataclasses.dataclass(frozen=True)
class _Decoded:
  """What decoding an image file found: PIL's format, mode and (width, height), or the failure."""
  format: str | None = None
  mode: str | None = None
  size: tuple[int, int] | None = None
  failure: str | None = None


def _image_folder(name, source, data_dir, skip_bad_images):
  """Checks and writes the image folder `source` as dataset `name`; returns its directory."""
  splits, class_names, ignored = _folder_layout(source)
  if ignored:
    logging.info('Ignoring %d files without an image extension (%s), e.g. %s.', len(ignored),
                 ' '.join(IMAGE_EXTENSIONS), ignored[0])
  paths = [path for files in splits.values() for path, _ in files]
  decoded = _decode_all(paths)
  bad = {path: d.failure for path, d in decoded.items() if d.failure}
  if bad and not skip_bad_images:
    shown = _first_few([f'{path} ({failure})' for path, failure in bad.items()])
    raise UserError(f'{len(bad)} of {len(paths)} image files cannot be decoded: {shown}; repair '
                    'or delete them, or pass --skip_bad_images to leave them out.')
  splits = {split: [(path, label) for path, label in files if path not in bad]
            for split, files in splits.items()}
  for split, files in splits.items():
    if not files:
      raise UserError(f'Split {split!r} of {source} has no image that can be decoded.')
  kept = [d for d in decoded.values() if not d.failure]
  features = {'image': _image_feature(kept)}
  if class_names:
    features['label'] = tfds.features.ClassLabel(names=class_names)
  labels = {class_name: i for i, class_name in enumerate(class_names)}

  def examples(files):
    stored = _parallel_map(lambda path: _stored_bytes(path, decoded[path]), [p for p, _ in files])
    for (path, class_name), image in zip(files, stored):
      example = {'image': image}
      if class_names:
        example['label'] = -1 if class_name is None else labels[class_name]
      yield os.path.relpath(path, source), example

  dataset_dir = _store(name, _FOLDER_VERSION, tfds.features.FeaturesDict(features),
                       {split: (len(files), examples(files)) for split, files in splits.items()},
                       data_dir, description=f'Images from {source}.')
  if bad:
    skipped = os.path.join(dataset_dir, SKIPPED_IMAGES_FILE)
    with open(skipped, 'w') as f:
      f.writelines(f'{path}\t{failure}\n' for path, failure in bad.items())
    logging.warning('Left out %d of %d image files that cannot be decoded; they are listed in %s.',
                    len(bad), len(paths), skipped)
  return dataset_dir


def _folder_layout(source):
  """({split: [(image path, class name or None)]}, sorted class names, ignored files) of `source`.

  See the module docstring for the layouts.
  """
  if not os.path.isdir(source):
    problem = 'is not a directory' if os.path.exists(source) else 'does not exist'
    raise UserError(f'--source={source} {problem}; give a folder of images.')
  folders, images, ignored = _children(source)
  split_folders = [f for f in folders if os.path.basename(f) in SPLIT_FOLDERS]
  if not split_folders:
    parts = {'train': (source, folders, images)}
  elif len(split_folders) < len(folders) or images:
    splits = ', '.join(os.path.basename(f) for f in split_folders)
    others = _first_few([os.path.basename(p) for p in folders + images if p not in split_folders])
    raise UserError(f'{source} holds split folders ({splits}) beside other entries ({others}); '
                    f'split folders are named {", ".join(SPLIT_FOLDERS)}: move the others into '
                    'them.')
  else:
    parts = {}
    for folder in split_folders:
      class_folders, loose, other = _children(folder)
      parts[os.path.basename(folder)] = (folder, class_folders, loose)
      ignored += other
  splits, class_names = {}, set()
  for split, (folder, class_folders, loose) in parts.items():
    if class_folders and loose:
      raise UserError(f'{folder} holds class folders beside {len(loose)} loose images (e.g. '
                      f'{loose[0]}): move the images into a class folder.')
    files = [(path, None) for path in loose]
    for class_folder in class_folders:
      class_images, other = _files_below(class_folder)
      files += [(path, os.path.basename(class_folder)) for path in class_images]
      class_names.add(os.path.basename(class_folder))
      ignored += other
    if not files:
      raise UserError(f'No images ({" ".join(IMAGE_EXTENSIONS)}) in {folder}.')
    splits[split] = files
  return splits, sorted(class_names), ignored


def _first_few(items):
  return ', '.join(items[:_REPORTED_PATHS]) + (', ...' if len(items) > _REPORTED_PATHS else '')


def _children(folder):
  """(sub-folders, image files, other files) in `folder`, sorted; hidden names are skipped."""
  _, folders, files = next(os.walk(folder, onerror=_raise))
  images, others = _by_extension(folder, files)
  return [os.path.join(folder, f) for f in _visible(folders)], images, others


def _files_below(folder):
  """(image files, other files) anywhere below `folder`, sorted; hidden names are skipped."""
  images, others = [], []
  for parent, folders, files in os.walk(folder, onerror=_raise, followlinks=True):
    folders[:] = _visible(folders)
    found_images, found_others = _by_extension(parent, files)
    images += found_images
    others += found_others
  return sorted(images), others


def _by_extension(parent, names):
  """(image paths, other paths) of the visible file `names` in `parent`."""
  images, others = [], []
  for name in _visible(names):
    (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(
        os.path.join(parent, name))
  return images, others


def _visible(names):
  return sorted(name for name in names if not name.startswith('.'))


def _raise(error):
  raise error


def _decode_all(paths):
  """{path: _Decoded}, every file decoded completely, in parallel, with a progress line."""
  decoded, failures = {}, 0
  with console.ProgressLine(len(paths), unit='images', desc='checking') as progress:
    for done, (path, result) in enumerate(zip(paths, _parallel_map(_decode, paths)), 1):
      decoded[path] = result
      failures += bool(result.failure)
      progress.update(done, bad=failures)
  return decoded


def _decode(path):
  try:
    with Image.open(path) as image:
      image.load()
      return _Decoded(image.format, image.mode, image.size)
  except Image.UnidentifiedImageError:
    return _Decoded(failure='not an image format PIL reads')
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types for bad files.
    return _Decoded(failure=f'{type(e).__name__}: {e}')


def _stored_format(decoded):
  return 'jpeg' if decoded.format in _JPEG_FORMATS else 'png'


def _keeps_file(decoded):
  """Whether TF decodes the file's own bytes to 3 channels (tf.io.decode_image, decode_jpeg)."""
  return decoded.format == 'PNG' or (decoded.format in _JPEG_FORMATS and
                                     decoded.mode in ('L', 'RGB'))


def _stored_bytes(path, decoded):
  """The encoded image stored for the file at `path`: its bytes, or an RGB re-encoding."""
  if _keeps_file(decoded):
    with open(path, 'rb') as f:
      return f.read()
  with Image.open(path) as image:
    rgb = image.convert('RGB')
  encoded = io.BytesIO()
  image_format = _stored_format(decoded)
  rgb.save(encoded, format=image_format, **({'quality': _JPEG_QUALITY}
                                            if image_format == 'jpeg' else {}))
  return encoded.getvalue()


def _image_feature(decoded):
  """The 'image' feature of the stored images: 3 channels, fixed shape if all sizes agree."""
  sizes = {d.size for d in decoded}
  width, height = sizes.pop() if len(sizes) == 1 else (None, None)
  formats = {_stored_format(d) for d in decoded}
  return tfds.features.Image(shape=(height, width, 3),
                             encoding_format=formats.pop() if len(formats) == 1 else None)


def _parallel_map(fn, items):
  """fn(item) for each item, in order, computed in threads (PIL and file reads release the GIL)."""
  workers = len(os.sched_getaffinity(0))
  with futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) > 4 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


BUILDERS = {'fashion_mnist': _fashion_mnist, 'cifar10': _cifar10}  # name: split examples.


def _source_example(name):
  return {'fashion_mnist': 'IDX_DIR', 'cifar10': 'cifar-10-binary.tar.gz'}.get(name, 'IMAGE_DIR')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python -m simclr_jax.prepare_data NAME [--source=...] '
                         '[--data_dir=DIR] [--skip_bad_images] [--verbose]')
  console.quiet_third_party_logs(flags.FLAGS.verbose)
  try:
    path = prepare(argv[1], source=flags.FLAGS.source, data_dir=flags.FLAGS.data_dir,
                   skip_bad_images=flags.FLAGS.skip_bad_images)
  except UserError as e:
    console.fail('prepare_data', str(e))
  print(f'{argv[1]} is ready in {path}')


if __name__ == '__main__':
  # Defined here, not on import: data.py imports this module into programs with their own flags.
  flags.DEFINE_string('source', None, 'IDX folder, CIFAR-10 archive or image folder.')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default ~/tensorflow_datasets).')
  flags.DEFINE_bool('skip_bad_images', False,
                    'Leave out image files that cannot be decoded (default: refuse them).')
  flags.DEFINE_bool('verbose', False, 'Show the INFO and WARNING logs of TF, TFDS and JAX.')
  app.run(main)
