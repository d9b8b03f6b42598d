"""embed: a run's h, z and logits of a .npy or a folder of images, as the model computes them."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import TINY_IMAGE_SIZE, write_random_run
from simclr_jax import embed
from simclr_jax import models
from simclr_jax.errors import UserError

pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, model, variables): a checkpoint with non-trivial BatchNorm statistics."""
  workdir = str(tmp_path_factory.mktemp('run'))
  return workdir, *write_random_run(workdir, zero_init_last_bn=False)


def _images(n=10):
  return np.random.default_rng(1).integers(0, 256, (n, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3),
                                           dtype=np.uint8)


def test_npy_gives_the_models_outputs_in_inference_mode(run, tmp_path):
  workdir, model, variables = run
  images = _images() / np.float32(255)
  np.save(tmp_path / 'x.npy', images.astype(np.float32))
  # 10 images in batches of 8: a padded last batch. At the checkpoint's own size (16 px) the
  # evaluation view (no crop, bicubic resize by 1) leaves the images as they are.
  result = embed.run(workdir, str(tmp_path / 'x.npy'), str(tmp_path / 'f.npz'), batch_size=8)
  expected = model.apply(variables, jnp.asarray(images, jnp.float32), train=False)
  assert np.std(expected['h']) > 0.01 and np.std(expected['probe_logits']) > 1e-4
  with np.load(tmp_path / 'f.npz') as written:
    assert sorted(written) == ['h', 'logits', 'z']
    for name, key in (('h', 'h'), ('z', 'z'), ('logits', 'probe_logits')):
      assert written[name].shape == expected[key].shape
      np.testing.assert_allclose(written[name], expected[key], rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(written[name], result[name])


def test_grayscale_and_folder_inputs_match_the_npy(run, tmp_path):
  workdir, _, _ = run
  images = _images(6)
  gray = images[..., 0]
  np.save(tmp_path / 'rgb.npy', (np.repeat(gray[..., None], 3, -1) / 255).astype(np.float32))
  np.save(tmp_path / 'gray.npy', (gray / 255).astype(np.float32))
  folder = tmp_path / 'folder'
  folder.mkdir()
  for i, image in enumerate(images):  # Named so that sorted order is not numeric order.
    Image.fromarray(image).save(folder / f'{(5 - i) * 7 % 6}.png')
  order = [(5 - i) * 7 % 6 for i in range(6)]
  (folder / 'notes.txt').write_text('not an image')
  rgb = embed.run(workdir, str(tmp_path / 'rgb.npy'), str(tmp_path / 'a.npz'), batch_size=8)
  from_gray = embed.run(workdir, str(tmp_path / 'gray.npy'), str(tmp_path / 'b.npz'),
                        batch_size=8)
  np.testing.assert_allclose(from_gray['h'], rgb['h'], rtol=1e-5, atol=1e-6)
  np.save(tmp_path / 'colour.npy', (images / 255).astype(np.float32))
  colour = embed.run(workdir, str(tmp_path / 'colour.npy'), str(tmp_path / 'c.npz'),
                     batch_size=8)
  from_folder = embed.run(workdir, str(folder), str(tmp_path / 'd.npz'), batch_size=8)
  assert list(from_folder['files']) == [f'{k}.png' for k in range(6)]
  rows = np.argsort(order)  # Row k of the folder's result is the image saved as k.png.
  np.testing.assert_allclose(from_folder['h'], colour['h'][rows], rtol=1e-4, atol=1e-5)


def test_larger_images_are_centre_cropped_and_resized(run, tmp_path):
  """A 40 px image, 2x2 blocks of a 20 px one: its 35 px centre crop resized to 16 px is not the
  image itself, so the result differs from --noresize of the 16 px image, and the view path's
  shape checks out."""
  workdir, model, variables = run
  images = (_images(2) / 255).astype(np.float32)
  big = np.kron(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), np.ones((1, 2, 2, 1)))
  np.save(tmp_path / 'big.npy', big.astype(np.float32))
  result = embed.run(workdir, str(tmp_path / 'big.npy'), str(tmp_path / 'f.npz'), batch_size=8)
  assert result['h'].shape == (2, models.feature_dim(18, 0.125))
  as_is = embed.run(workdir, str(tmp_path / 'big.npy'), str(tmp_path / 'g.npz'), batch_size=8,
                    resize=False)
  expected = model.apply(variables, jnp.asarray(big), train=False)['h']
  np.testing.assert_allclose(as_is['h'], expected, rtol=1e-4, atol=1e-5)
  assert not np.allclose(result['h'], as_is['h'], rtol=1e-3)


@pytest.mark.parametrize('case, message', [
    ('uint8', 'expected float images in'),
    ('range', 'scale the images to'),
    ('shape', 'expected float images in'),
    ('empty_folder', 'No image files'),
    ('bad_image', 'Cannot decode'),
    ('missing', 'neither a .npy file nor a folder'),
    ('out', 'must end in .npz'),
    ('batch', 'not divisible by the 8 devices'),
])
def test_bad_input_is_one_line_before_compute(run, tmp_path, case, message):
  workdir, _, _ = run
  path, out, batch_size = str(tmp_path / 'x.npy'), str(tmp_path / 'f.npz'), 8
  if case == 'uint8':
    np.save(path, _images(2))
  elif case == 'range':
    np.save(path, _images(2).astype(np.float32))
  elif case == 'shape':
    np.save(path, np.zeros((2, 16, 16, 2), np.float32))
  elif case in ('empty_folder', 'bad_image'):
    path = str(tmp_path / 'folder')
    os.makedirs(path)
    if case == 'bad_image':
      with open(os.path.join(path, 'a.jpg'), 'w') as f:
        f.write('not a jpeg')
  elif case == 'missing':
    path = str(tmp_path / 'none.npy')
  elif case == 'out':
    out = str(tmp_path / 'f.npy')
  elif case == 'batch':
    batch_size = 12
  with pytest.raises(UserError, match=message) as error:
    embed.run(workdir, path, out, batch_size=batch_size)
  assert '\n' not in str(error.value)
