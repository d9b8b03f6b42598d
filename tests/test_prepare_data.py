"""Tests of building TFDS datasets from local files (simclr_jax/prepare_data.py)."""

import collections
import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from conftest import store_tiny_dataset
from simclr_jax import prepare_data
from simclr_jax.errors import UserError

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
CIFAR_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
               'truck']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _quiet():
  tfds.disable_progress_bar()


def _idx(path):
  """Reads an IDX file independently of the code under test: header, then uint8 data."""
  with gzip.open(path) as f:
    raw = f.read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
  return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason='needs dataset-fashion-mnist')
def test_fashion_mnist_from_idx_files(tmp_path):
  data_dir = str(tmp_path)
  prepare_data.ensure_prepared('fashion_mnist', data_dir)  # Builds it from the local files.
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  assert builder.info.splits['train'].num_examples == 60_000
  assert builder.info.splits['test'].num_examples == 10_000
  label = builder.info.features['label']
  assert label.num_classes == 10 and label.names[0] == 'T-shirt/top'
  assert label.names[9] == 'Ankle boot'
  assert builder.info.features['image'].shape == (28, 28, 1)
  for split, prefix in [('train', 'train'), ('test', 't10k')]:
    images = _idx(f'{FASHION_MNIST}/{prefix}-images-idx3-ubyte.gz')
    labels = _idx(f'{FASHION_MNIST}/{prefix}-labels-idx1-ubyte.gz')
    assert labels[0] == 9  # Both splits start with an ankle boot.
    batches = tfds.load('fashion_mnist', split=split, data_dir=data_dir).batch(10_000)
    loaded = {k: np.concatenate([b[k] for b in tfds.as_numpy(batches)]) for k in ('image', 'label')}
    assert loaded['image'].shape == (len(images), 28, 28, 1)
    expected = collections.Counter(zip(map(bytes, images), labels.tolist()))
    found = collections.Counter(zip(map(bytes, loaded['image'][..., 0]),
                                    loaded['label'].tolist()))
    assert found == expected
    first = [i for i, image in enumerate(loaded['image']) if np.array_equal(image[..., 0],
                                                                            images[0])]
    assert [loaded['label'][i] for i in first] == [labels[0]] * len(first) and first


def _cifar_arrays(rng, count):
  return rng.randint(0, 256, (count, 3, 32, 32)).astype(np.uint8), rng.randint(0, 10, count)


def _cifar_archive(path, kind, batches):
  """A tiny cifar-10-{binary,python}.tar.gz with `batches` {name: (images NCHW, labels)}."""
  files = {}
  if kind == 'binary':
    for name, (images, labels) in batches.items():
      files[f'cifar-10-batches-bin/{name}.bin'] = np.concatenate(
          [labels[:, None].astype(np.uint8), images.reshape(len(images), -1)], axis=1).tobytes()
    files['cifar-10-batches-bin/batches.meta.txt'] = ('\n'.join(CIFAR_NAMES) + '\n\n').encode()
  else:
    for name, (images, labels) in batches.items():
      files[f'cifar-10-batches-py/{name}'] = pickle.dumps(
          {b'labels': labels.tolist(), b'data': images.reshape(len(images), -1)}, protocol=2)
    files['cifar-10-batches-py/batches.meta'] = pickle.dumps(
        {b'label_names': [n.encode() for n in CIFAR_NAMES]}, protocol=2)
  with tarfile.open(path, 'w:gz') as tar:
    for name, content in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))


@pytest.mark.parametrize('kind', ['binary', 'python'])
def test_cifar10_from_archive(tmp_path, kind):
  rng = np.random.RandomState(0)
  names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
  batches = {name: _cifar_arrays(rng, 2) for name in names}
  archive = str(tmp_path / f'cifar-10-{kind}.tar.gz')
  _cifar_archive(archive, kind, batches)
  data_dir = str(tmp_path / 'tfds')
  if kind == 'binary':  # Through the command line, which prints our lines only.
    result = _run_prepare_data('cifar10', f'--source={archive}', f'--data_dir={data_dir}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f'cifar10 is ready in {data_dir}/cifar10/3.0.2']
    assert result.stderr.splitlines() and not [
        line for line in result.stderr.splitlines() if not line.startswith('writing cifar10 ')]
  else:
    prepare_data.prepare('cifar10', source=archive, data_dir=data_dir)
  builder = tfds.builder('cifar10', data_dir=data_dir)
  assert builder.info.features['label'].names == CIFAR_NAMES
  assert set(builder.info.features) == {'id', 'image', 'label'}
  expected = {'train': [batches[n] for n in names[:5]], 'test': [batches['test_batch']]}
  for split, parts in expected.items():
    images = np.concatenate([p[0] for p in parts]).transpose(0, 2, 3, 1)
    labels = np.concatenate([p[1] for p in parts])
    examples = list(tfds.as_numpy(tfds.load('cifar10', split=split, data_dir=data_dir)))
    assert len(examples) == len(images)
    for example in examples:
      prefix, index = example['id'].decode().split('_')
      assert prefix == split
      np.testing.assert_array_equal(example['image'], images[int(index)])
      assert example['label'] == labels[int(index)]


def test_python_archive_with_code_is_refused(tmp_path):
  archive = str(tmp_path / 'cifar-10-python.tar.gz')
  with tarfile.open(archive, 'w:gz') as tar:
    content = b'cos\nsystem\n(S"true"\ntR.'  # A pickle that calls os.system('true').
    info = tarfile.TarInfo('cifar-10-batches-py/batches.meta')
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))
  with pytest.raises(UserError, match='Refusing to unpickle os.system'):
    prepare_data.prepare('cifar10', source=archive, data_dir=str(tmp_path / 'tfds'))


def _run_prepare_data(*args):
  return subprocess.run([sys.executable, '-m', 'simclr_jax.prepare_data', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def _save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _random_image(rng, height=10, width=12, channels=3):
  shape = (height, width) if channels == 1 else (height, width, channels)
  return rng.randint(0, 256, shape).astype(np.uint8)


def _as_rgb(array):
  return np.stack([array] * 3, -1) if array.ndim == 2 else array


def _load(name, split, data_dir):
  return list(tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir)))


def test_labelled_image_folder(tmp_path):
  rng = np.random.RandomState(0)
  images = {f'{cls}/{i}.png': _random_image(rng) for cls in ('cats', 'dogs')
            for i in range(3 if cls == 'cats' else 2)}
  images['dogs/gray.png'] = _random_image(rng, channels=1)
  images['dogs/puppies/nested.png'] = _random_image(rng)  # Class folders are read recursively.
  for name, array in images.items():
    _save(tmp_path / 'pets' / name, array)
  data_dir = str(tmp_path / 'tfds')
  path = prepare_data.prepare('my_pets', source=str(tmp_path / 'pets'), data_dir=data_dir)
  assert prepare_data.prepare('my_pets', source='ignored', data_dir=data_dir) == path
  builder = tfds.builder('my_pets', data_dir=data_dir)
  assert builder.info.features['label'].names == ['cats', 'dogs']
  assert builder.info.features['image'].shape == (10, 12, 3)
  assert builder.info.features['image'].encoding_format == 'png'
  examples = _load('my_pets', 'train', data_dir)
  assert len(examples) == len(images)
  expected = {_as_rgb(a).tobytes(): n.split('/')[0] for n, a in images.items()}
  found = {e['image'].tobytes(): ['cats', 'dogs'][e['label']] for e in examples}
  assert found == expected


def test_flat_jpeg_folder_without_labels(tmp_path):
  rng = np.random.RandomState(1)
  for i, height in enumerate([20, 24, 30]):
    _save(tmp_path / 'photos' / f'{i}.jpg', _random_image(rng, height, 16))
  (tmp_path / 'photos' / 'README.txt').write_text('not an image')  # Ignored.
  (tmp_path / 'photos' / '.DS_Store').write_bytes(b'\0')  # Hidden: ignored.
  data_dir = str(tmp_path / 'tfds')
  prepare_data.prepare('photos', source=str(tmp_path / 'photos'), data_dir=data_dir)
  builder = tfds.builder('photos', data_dir=data_dir)
  assert 'label' not in builder.info.features
  assert builder.info.features['image'].shape == (None, None, 3)
  assert builder.info.features['image'].encoding_format == 'jpeg'
  assert list(builder.info.splits) == ['train']
  shapes = sorted(e['image'].shape for e in _load('photos', 'train', data_dir))
  assert shapes == [(20, 16, 3), (24, 16, 3), (30, 16, 3)]


def test_split_folders_with_classes(tmp_path):
  """train/test/validation with classes (test lacks one), and an unlabelled split beside them."""
  rng = np.random.RandomState(2)
  layout = {'train': {'bird': 2, 'cat': 3, 'dog': 1}, 'test': {'cat': 1, 'dog': 2},
            'validation': {'bird': 1, 'ant': 1}}
  images = {}
  for split, counts in layout.items():
    for cls, count in counts.items():
      for i in range(count):
        images[split, cls, i] = _random_image(rng, channels=1 if i else 3)
        _save(tmp_path / 'zoo' / split / cls / f'{i}.png', images[split, cls, i])
  unlabelled = [_random_image(rng) for _ in range(2)]
  for i, array in enumerate(unlabelled):
    _save(tmp_path / 'zoo' / 'unlabelled' / f'{i}.png', array)
  data_dir = str(tmp_path / 'tfds')
  prepare_data.prepare('zoo', source=str(tmp_path / 'zoo'), data_dir=data_dir)
  builder = tfds.builder('zoo', data_dir=data_dir)
  names = ['ant', 'bird', 'cat', 'dog']  # The union of all splits' classes, sorted.
  assert builder.info.features['label'].names == names
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      'train': 6, 'test': 3, 'validation': 2, 'unlabelled': 2}
  for split in layout:
    expected = collections.Counter((_as_rgb(a).tobytes(), names.index(cls))
                                   for (s, cls, _), a in images.items() if s == split)
    found = collections.Counter((e['image'].tobytes(), int(e['label']))
                                for e in _load('zoo', split, data_dir))
    assert found == expected, split
  found = collections.Counter((e['image'].tobytes(), int(e['label']))
                              for e in _load('zoo', 'unlabelled', data_dir))
  assert found == collections.Counter((a.tobytes(), -1) for a in unlabelled)


def test_split_folders_without_labels(tmp_path):
  rng = np.random.RandomState(3)
  for split, count in [('train', 3), ('test', 2)]:
    for i in range(count):
      _save(tmp_path / 'pics' / split / f'{i}.jpg', _random_image(rng, 16, 16))
  data_dir = str(tmp_path / 'tfds')
  prepare_data.prepare('pics', source=str(tmp_path / 'pics'), data_dir=data_dir)
  builder = tfds.builder('pics', data_dir=data_dir)
  assert 'label' not in builder.info.features
  assert builder.info.features['image'].shape == (16, 16, 3)
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      'train': 3, 'test': 2}


def test_images_converted_to_rgb(tmp_path):
  """A CMYK JPEG stays a JPEG (re-encoded), a GIF becomes a PNG; RGB content is kept."""
  rng = np.random.RandomState(4)
  blocks = np.kron(_random_image(rng, 2, 2), np.ones((16, 16, 1), np.uint8))  # One per MCU.
  _save(tmp_path / 'jpegs' / 'rgb.jpg', blocks, quality=100)
  Image.fromarray(blocks).convert('CMYK').save(tmp_path / 'jpegs' / 'cmyk.jpg', quality=100)
  data_dir = str(tmp_path / 'tfds')
  prepare_data.prepare('jpegs', source=str(tmp_path / 'jpegs'), data_dir=data_dir)
  assert tfds.builder('jpegs', data_dir=data_dir).info.features['image'].encoding_format == 'jpeg'
  for example in _load('jpegs', 'train', data_dir):
    assert np.abs(example['image'].astype(int) - blocks).mean() < 8  # Not inverted (~100).

  _save(tmp_path / 'mixed' / 'b.jpg', blocks)
  Image.fromarray(_random_image(rng, 6, 6)).convert('P').save(tmp_path / 'mixed' / 'a.gif')
  prepare_data.prepare('mixed', source=str(tmp_path / 'mixed'), data_dir=data_dir)
  builder = tfds.builder('mixed', data_dir=data_dir)
  assert builder.info.features['image'].encoding_format is None  # JPEG and PNG bytes.
  assert builder.info.features['image'].shape == (None, None, 3)
  gif = np.asarray(Image.open(tmp_path / 'mixed' / 'a.gif').convert('RGB'))
  images = sorted((e['image'] for e in _load('mixed', 'train', data_dir)), key=len)
  np.testing.assert_array_equal(images[0], gif)
  assert images[1].shape == blocks.shape


def _bad_image_folder(root):
  rng = np.random.RandomState(5)
  for i in range(3):
    _save(root / 'ok' / f'{i}.png', _random_image(rng))
  png = io.BytesIO()
  Image.fromarray(_random_image(rng, 64, 64)).save(png, format='PNG')
  (root / 'ok' / 'truncated.png').write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
  (root / 'ok' / 'text.jpg').write_text('This is not a JPEG.')
  (root / 'ok' / 'notes.txt').write_text('Not an image by its name: ignored.')
  return [str(root / 'ok' / 'text.jpg'), str(root / 'ok' / 'truncated.png')]


def test_bad_images_are_refused(tmp_path):
  bad = _bad_image_folder(tmp_path / 'imgs')
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(UserError) as error:
    prepare_data.prepare('shaky', source=str(tmp_path / 'imgs'), data_dir=data_dir)
  message = str(error.value)
  assert '\n' not in message and message.startswith('2 of 5 image files cannot be decoded')
  assert all(path in message for path in bad) and '--skip_bad_images' in message
  assert not os.path.exists(os.path.join(data_dir, 'shaky'))  # Nothing written.


def test_bad_images_are_skipped(tmp_path, caplog):
  bad = _bad_image_folder(tmp_path / 'imgs')
  data_dir = str(tmp_path / 'tfds')
  with caplog.at_level('WARNING'):
    path = prepare_data.prepare('shaky', source=str(tmp_path / 'imgs'), data_dir=data_dir,
                                skip_bad_images=True)
  assert any('Left out 2 of 5 image files' in r.getMessage() for r in caplog.records)
  skipped = (tmp_path / 'tfds' / 'shaky' / '1.0.0' / prepare_data.SKIPPED_IMAGES_FILE)
  assert str(skipped).startswith(str(path))
  assert sorted(line.split('\t')[0] for line in skipped.read_text().splitlines()) == bad
  builder = tfds.builder('shaky', data_dir=data_dir)
  assert builder.info.splits['train'].num_examples == 3
  assert builder.info.features['label'].names == ['ok']


def test_prepare_errors(tmp_path):
  with pytest.raises(UserError, match='registered TFDS dataset .* tfds build mnist'):
    prepare_data.prepare('mnist', source=str(tmp_path), data_dir=str(tmp_path))
  with pytest.raises(UserError, match='needs --source=cifar-10-binary.tar.gz'):
    prepare_data.prepare('cifar10', data_dir=str(tmp_path))
  with pytest.raises(UserError, match='is not a file'):
    prepare_data.prepare('cifar10', source=str(tmp_path / 'none.tar.gz'), data_dir=str(tmp_path))
  with pytest.raises(UserError,
                     match="lacks train-images-idx3-ubyte.gz .*Fashion-MNIST's four IDX"):
    prepare_data.prepare('fashion_mnist', source=str(tmp_path), data_dir=str(tmp_path))
  with pytest.raises(UserError, match='must be lower case'):
    prepare_data.prepare('My-Images', source=str(tmp_path), data_dir=str(tmp_path))
  with pytest.raises(UserError, match='give --source=DIR'):
    prepare_data.prepare('images', data_dir=str(tmp_path))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='No images'):
    prepare_data.prepare('empty', source=str(tmp_path / 'empty'), data_dir=str(tmp_path))
  for folder in ('mixed/train/a', 'mixed/cats'):  # A split folder beside a class folder.
    _save(tmp_path / folder / '0.png', np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(UserError, match=r'split folders \(train\) beside other entries \(cats\)'):
    prepare_data.prepare('mixed', source=str(tmp_path / 'mixed'), data_dir=str(tmp_path))
  _save(tmp_path / 'loose' / 'a' / '0.png', np.zeros((4, 4, 3), np.uint8))
  _save(tmp_path / 'loose' / '1.png', np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(UserError, match='class folders beside 1 loose images'):
    prepare_data.prepare('loose', source=str(tmp_path / 'loose'), data_dir=str(tmp_path))


def test_missing_source_is_one_line_and_exit_2(tmp_path):
  result = _run_prepare_data('my_images', f'--source={tmp_path}/missing',
                             f'--data_dir={tmp_path}')
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f'prepare_data: error: --source={tmp_path}/missing does not exist; give a folder of images.']
  assert not result.stdout


def test_ensure_prepared(tmp_path, monkeypatch):
  data_dir = store_tiny_dataset(str(tmp_path / 'tfds'))

  def offline(*args, **kwargs):
    raise ConnectionError('Name or service not known\nmore details')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
  monkeypatch.setattr(prepare_data, 'prepare', offline)
  prepare_data.ensure_prepared('tiny_images', data_dir)  # Prepared: nothing to do.
  with pytest.raises(UserError) as error:
    prepare_data.ensure_prepared('mnist', data_dir)
  message = str(error.value)
  assert '\n' not in message and 'ConnectionError' in message and 'tfds build mnist' in message
  with pytest.raises(UserError, match='Unknown dataset .*prepare_data my_pictures --source'):
    prepare_data.ensure_prepared('my_pictures', data_dir)
