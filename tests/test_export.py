"""export: a run's variables under documented names, in .npz and safetensors files that an
independent reader reads back; torchvision names that torchvision's ResNet loads."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import TINY_NUM_CLASSES, write_random_run
from simclr_jax import export
from simclr_jax.errors import UserError

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _read_safetensors(path):
  """An independent reader of the format: u64 header size, JSON header, buffers."""
  dtypes = {'F32': '<f4', 'I64': '<i8'}
  with open(path, 'rb') as f:
    size = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(size))
    buffers = f.read()
  metadata = header.pop('__metadata__')
  tensors = {name: np.frombuffer(buffers[a:b], dtypes[info['dtype']]).reshape(info['shape'])
             for name, info in header.items() for a, b in [info['data_offsets']]}
  return tensors, metadata


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  return workdir, *write_random_run(workdir)


def test_flax_names_hold_every_variable_in_both_formats(tiny_run, tmp_path):
  workdir, _, variables = tiny_run
  expected = {}
  for collection in ('params', 'batch_stats'):
    for path, value in traverse_util.flatten_dict(variables[collection]).items():
      expected['/'.join(path)] = value
  encoder = {k: v for k, v in expected.items() if k.startswith('encoder/')}
  assert 'encoder/stage1_block1/bn1/mean' in encoder and 'encoder/conv_init/kernel' in encoder

  export.run(workdir, str(tmp_path / 'e.npz'))
  with np.load(tmp_path / 'e.npz') as written:
    metadata = json.loads(str(written['__metadata__']))
    assert set(written) - {'__metadata__'} == set(encoder)
    for name, value in encoder.items():
      np.testing.assert_array_equal(written[name], value)
  assert json.loads(metadata['model'])['depth'] == 18 and metadata['num_classes'] == '0'

  export.run(workdir, str(tmp_path / 'all.safetensors'), head=True)
  tensors, metadata = _read_safetensors(tmp_path / 'all.safetensors')
  assert set(tensors) == set(expected)  # encoder, head and the classifier ('probe').
  for name, value in expected.items():
    np.testing.assert_array_equal(tensors[name], value)
  assert metadata['num_classes'] == str(TINY_NUM_CLASSES) and metadata['image_size'] == '16'


def test_safetensors_package_reads_the_fallback_writer(tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  tensors = {'a/kernel': np.arange(6, dtype=np.float32).reshape(2, 3),
             'b': np.asarray(7, np.int64), 'c': np.ones((5,), np.float32)}
  export.write_safetensors(str(tmp_path / 'x.safetensors'), tensors, {'k': 'v'})
  read = safetensors_numpy.load_file(str(tmp_path / 'x.safetensors'))
  for name, value in tensors.items():
    np.testing.assert_array_equal(read[name], value)


def _torchvision_resnet18_keys(downsample_stages=(2, 3, 4)):
  """The state_dict keys of torchvision.models.resnet18, written out from its structure."""
  norm = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
  keys = ['conv1.weight', *(f'bn1.{n}' for n in norm), 'fc.weight', 'fc.bias']
  for stage in range(1, 5):
    for block in range(2):
      prefix = f'layer{stage}.{block}'
      for i in (1, 2):
        keys += [f'{prefix}.conv{i}.weight', *(f'{prefix}.bn{i}.{n}' for n in norm)]
      if block == 0 and stage in downsample_stages:
        keys += [f'{prefix}.downsample.0.weight', *(f'{prefix}.downsample.1.{n}' for n in norm)]
  return keys


def test_torchvision_names_are_resnet18s_state_dict(tmp_path):
  workdir = str(tmp_path / 'run')
  _, variables = write_random_run(workdir, cifar_stem=False, layout='torchvision')
  tensors = export.run(workdir, str(tmp_path / 'tv.npz'), head=True, names='torchvision')
  assert sorted(tensors) == sorted(_torchvision_resnet18_keys())
  assert len(tensors) == 122
  encoder = variables['params']['encoder']
  np.testing.assert_array_equal(tensors['layer2.0.conv1.weight'],
                                encoder['stage2_block1']['conv1']['kernel'].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(tensors['layer3.1.bn2.running_var'],
                                variables['batch_stats']['encoder']['stage3_block2']['bn2']['var'])
  np.testing.assert_array_equal(tensors['fc.weight'], variables['params']['probe']['kernel'].T)


@pytest.mark.parametrize('model, message', [
    ({'cifar_stem': True, 'layout': 'torchvision'}, 'CIFAR stem'),
    ({'cifar_stem': False}, 'layout simclr projects'),
])
def test_torchvision_names_refuse_other_layouts(tmp_path, model, message):
  workdir = str(tmp_path / 'run')
  write_random_run(workdir, **model)
  with pytest.raises(UserError, match=message):
    export.run(workdir, str(tmp_path / 'x.npz'), names='torchvision')
  with pytest.raises(UserError, match='must end in'):
    export.run(workdir, str(tmp_path / 'x.pt'))
  assert not os.path.exists(tmp_path / 'x.npz')


def test_torchvision_resnet18_computes_the_same_features(tmp_path):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  workdir = str(tmp_path / 'run')
  net, variables = write_random_run(workdir, image_size=32, cifar_stem=False, layout='torchvision',
                              width_multiplier=1, zero_init_last_bn=False)
  tensors = export.run(workdir, str(tmp_path / 'tv.safetensors'), names='torchvision')
  model = torchvision.models.resnet18()
  model.fc = torch.nn.Identity()
  # TF-'SAME' max-pooling (the official code's), as export's docstring tells users.
  model.maxpool = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.MaxPool2d(3, 2))
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
  model.eval()
  images = np.random.default_rng(2).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    features = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  expected = net.apply(variables, jnp.asarray(images), train=False)['h']
  assert np.std(expected) > 0.01
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
