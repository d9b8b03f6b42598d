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

from simclr_jax import data
from simclr_jax import prepare_data

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
  data.ensure_prepared('fashion_mnist', data_dir)  # Builds it from the local files.
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
  if kind == 'binary':  # Through the command line.
    subprocess.run([sys.executable, '-m', 'simclr_jax.prepare_data', 'cifar10',
                    f'--source={archive}', f'--data_dir={data_dir}'], cwd=REPO, check=True,
                   capture_output=True)
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
  with pytest.raises(pickle.UnpicklingError, match='Refusing'):
    prepare_data.prepare('cifar10', source=archive, data_dir=str(tmp_path / 'tfds'))


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_labelled_image_folder(tmp_path):
  rng = np.random.RandomState(0)
  images = {f'{cls}/{i}.png': rng.randint(0, 256, (10, 12, 3)).astype(np.uint8)
            for cls in ('cats', 'dogs') for i in range(3 if cls == 'cats' else 2)}
  images['dogs/gray.png'] = rng.randint(0, 256, (10, 12)).astype(np.uint8)
  for name, array in images.items():
    _save(tmp_path / 'pets' / name, array)
  data_dir = str(tmp_path / 'tfds')
  path = prepare_data.prepare('my_pets', source=str(tmp_path / 'pets'), data_dir=data_dir)
  assert prepare_data.prepare('my_pets', source='ignored', data_dir=data_dir) == path
  builder = tfds.builder('my_pets', data_dir=data_dir)
  assert builder.info.features['label'].names == ['cats', 'dogs']
  assert builder.info.features['image'].shape == (10, 12, 3)
  examples = list(tfds.as_numpy(tfds.load('my_pets', split='train', data_dir=data_dir)))
  assert len(examples) == len(images)
  expected = {(np.stack([a] * 3, -1) if a.ndim == 2 else a).tobytes(): n.split('/')[0]
              for n, a in images.items()}
  found = {e['image'].tobytes(): ['cats', 'dogs'][e['label']] for e in examples}
  assert found == expected


def test_flat_jpeg_folder_without_labels(tmp_path):
  rng = np.random.RandomState(1)
  for i, height in enumerate([20, 24, 30]):
    _save(tmp_path / 'photos' / f'{i}.jpg', rng.randint(0, 256, (height, 16, 3)).astype(np.uint8))
  data_dir = str(tmp_path / 'tfds')
  prepare_data.prepare('photos', source=str(tmp_path / 'photos'), data_dir=data_dir)
  builder = tfds.builder('photos', data_dir=data_dir)
  assert 'label' not in builder.info.features
  assert builder.info.features['image'].shape == (None, None, 3)
  assert builder.info.features['image'].encoding_format == 'jpeg'
  shapes = sorted(e['image'].shape for e in tfds.as_numpy(
      tfds.load('photos', split='train', data_dir=data_dir)))
  assert shapes == [(20, 16, 3), (24, 16, 3), (30, 16, 3)]


def test_prepare_errors(tmp_path):
  with pytest.raises(ValueError, match='registered TFDS dataset'):
    prepare_data.prepare('mnist', source=str(tmp_path), data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='needs --source=cifar-10-binary.tar.gz'):
    prepare_data.prepare('cifar10', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='No .* images'):
    prepare_data.prepare('empty', source=str(tmp_path), data_dir=str(tmp_path / 'tfds'))
