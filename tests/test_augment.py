"""Tests of the SimCLR augmentation ops (simclr_jax/augment.py)."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_frequency
from simclr_jax import augment
from simclr_jax import augment_params

NUM_DRAWS = 400


def _colourful(height, width, seed=0):
  """A uint8 RGB image whose channels differ everywhere."""
  rng = np.random.RandomState(seed)
  image = rng.randint(0, 200, (height, width, 3)).astype(np.uint8)
  image[..., 1] = (image[..., 0].astype(int) + 40) % 256  # Green never equals red.
  return image


def _jpeg(height, width):
  """A smooth colourful JPEG (scalar string tensor)."""
  y, x = np.mgrid[:height, :width]
  image = np.stack([x * 255 // width, y * 255 // height, (x + y) // 4 % 256], -1)
  return tf.io.encode_jpeg(image.astype(np.uint8), quality=95)


@pytest.mark.parametrize('make_image,size', [
    (lambda: np.random.RandomState(1).randint(0, 256, (28, 28, 1)).astype(np.uint8), 28),
    (lambda: _colourful(32, 32), 32),
    (lambda: tf.io.decode_jpeg(_jpeg(375, 500)), 64),  # A decoded JPEG.
    (lambda: _jpeg(375, 500), 64),  # An encoded JPEG, decoded inside the crop window.
])
def test_views_shape_dtype_range(make_image, size):
  image = tf.constant(make_image())
  for seed in range(3):
    view = augment.random_view(image, tf.constant([seed, 7]), height=size, width=size,
                               blur_probability=1.0)
    assert view.shape == (size, size, 3) and view.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(view)) and float(tf.reduce_max(view)) <= 1.0
  view = augment.eval_view(image, height=size, width=size)
  assert view.shape == (size, size, 3) and view.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(view)) and float(tf.reduce_max(view)) <= 1.0


def test_jpeg_views_match_decoded_views():
  encoded = _jpeg(120, 160)
  decoded = tf.io.decode_jpeg(encoded, channels=3)
  for seed in range(5):
    kwargs = dict(height=48, width=48, blur_probability=0.5)
    from_jpeg = augment.random_view(encoded, tf.constant([seed, 1]), **kwargs)
    from_array = augment.random_view(decoded, tf.constant([seed, 1]), **kwargs)
    assert from_jpeg.shape == (48, 48, 3)
    np.testing.assert_allclose(from_jpeg, from_array, atol=0.05)
  np.testing.assert_allclose(augment.eval_view(encoded, height=48, width=48),
                             augment.eval_view(decoded, height=48, width=48), atol=0.05)


def test_same_seed_same_view_and_seeds_differ():
  image = tf.constant(_colourful(32, 32))
  view = lambda seed: augment.random_view(image, tf.constant(seed), height=32, width=32)
  np.testing.assert_array_equal(view([3, 4]), view([3, 4]))
  assert not np.allclose(view([3, 4]), view([3, 5]))


def _draws(fn):
  """fn(seed) for NUM_DRAWS seeds, as one numpy array (traced once by tf.data)."""
  seeds = tf.data.Dataset.range(NUM_DRAWS).map(lambda i: tf.stack([i, tf.constant(11, tf.int64)]))
  return np.stack(list(seeds.map(fn).batch(NUM_DRAWS).as_numpy_iterator())[0])


def test_grayscale_and_jitter_frequencies():
  image = tf.constant(_colourful(32, 32))
  size = dict(height=32, width=32, blur_probability=0.0)
  full = _draws(lambda s: augment.random_view(image, s, color_strength=0.5, **size))
  # Crop and flip of a seed do not depend on the colour settings, so a view without jitter and
  # without grayscale equals the crop+flip-only view of the same seed.
  plain = _draws(lambda s: augment.random_view(image, s, color_strength=0.0, **size))
  gray = np.all(np.abs(full - full[..., :1]) < 1e-6, axis=(1, 2, 3))
  changed = np.any(np.abs(full - plain) > 1e-6, axis=(1, 2, 3))
  assert_frequency(gray, augment_params.GRAYSCALE_PROBABILITY)
  assert_frequency(changed[~gray], augment_params.JITTER_PROBABILITY)
  assert not np.any(np.all(np.abs(plain - plain[..., :1]) < 1e-6, axis=(1, 2, 3)))


def test_color_distortion_frequencies_without_crop():
  image = tf.image.convert_image_dtype(_colourful(16, 16), tf.float32)
  out = _draws(lambda s: augment.color_distortion(image, s, strength=1.0))
  gray = np.all(np.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3))
  jittered = np.any(np.abs(out - image.numpy()) > 1e-6, axis=(1, 2, 3))
  assert_frequency(gray, augment_params.GRAYSCALE_PROBABILITY)
  assert_frequency(jittered[~gray], augment_params.JITTER_PROBABILITY)


def test_additive_and_multiplicative_brightness():
  # On a uniform gray image contrast, saturation and hue change nothing: only brightness acts.
  gray = tf.fill([4, 4, 3], 0.5)
  jitter = lambda s, mode: augment.color_jitter(gray, s, strength=1.0, brightness=mode)[0, 0, 0]
  multiplied = _draws(lambda s: jitter(s, 'multiplicative'))
  added = _draws(lambda s: jitter(s, 'additive'))
  # 0.5 * U[0.2, 1.8] vs clip(0.5 + U[-0.8, 0.8]).
  assert 0.1 - 1e-6 <= multiplied.min() < 0.15 and 0.85 < multiplied.max() <= 0.9 + 1e-6
  assert 0.15 < (added == 0.0).mean() < 0.25 and 0.15 < (added == 1.0).mean() < 0.25
  with pytest.raises(ValueError, match='brightness'):
    augment.color_jitter(gray, tf.constant([0, 0]), strength=1.0, brightness='gamma')


def test_gaussian_blur_matches_hand_computed_kernel():
  sigma, radius = 1.3, 2
  impulse = np.zeros((15, 15, 3), np.float32)
  impulse[7, 7] = 1.0
  blurred = augment.gaussian_blur(tf.constant(impulse), sigma, radius=radius).numpy()
  x = np.arange(-radius, radius + 1)
  g = np.exp(-x**2 / (2 * sigma**2))
  g /= g.sum()
  expected = np.zeros((15, 15))
  expected[5:10, 5:10] = np.outer(g, g)
  np.testing.assert_allclose(blurred[..., 0], expected, atol=1e-6)
  np.testing.assert_allclose(blurred[..., 2], expected, atol=1e-6)
  # Zero `SAME` padding: a constant image gets darker corners, sum of the in-image taps squared.
  ones = augment.gaussian_blur(tf.ones([15, 15, 1]), sigma, radius=radius).numpy()
  np.testing.assert_allclose(ones[0, 0, 0], g[radius:].sum()**2, rtol=1e-5)
  np.testing.assert_allclose(ones[7, 7, 0], 1.0, rtol=1e-5)


@pytest.mark.parametrize('size,radius', [(32, 1), (64, 3), (224, 11)])
def test_blur_kernel_size_is_a_tenth_of_the_image(size, radius):
  impulse = np.zeros((size, size, 3), np.float32)
  impulse[size // 2, size // 2] = 1.0
  extents = []
  for seed in range(10):  # Small sigmas underflow the outer taps, so take the widest blur.
    blurred = augment.random_blur(tf.constant(impulse), tf.constant([seed, 0]), probability=1.0)
    rows, cols = np.nonzero(blurred.numpy()[..., 0] > 0)
    extents.append((rows.max() - rows.min(), cols.max() - cols.min()))
  assert max(extents) == (2 * radius, 2 * radius)


def test_random_crop_windows_follow_the_inception_crop_ranges():
  windows = _draws(lambda s: augment.random_crop_window(tf.constant([100, 200, 3]), s))
  y, x, h, w = windows.T
  area = h * w / (100 * 200)
  assert area.min() >= 0.1 - 0.01 and area.max() <= 1.0  # min_object_covered=0.1
  assert (w / h).min() >= 0.75 - 0.05 and (w / h).max() <= 4 / 3 + 0.05
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 100).all() and (x + w <= 200).all()
  assert len(set(map(tuple, windows))) > NUM_DRAWS // 2


def test_center_crop_window_is_the_reference_one():
  # 0.875 of the 375-pixel short side: rint(328.125) = 328; offsets (375-328+1)//2 = 24 and
  # (500-328+1)//2 = 86.
  window = augment.center_crop_window(tf.constant([375, 500, 3]), height=224, width=224,
                                      crop_fraction=0.875)
  np.testing.assert_array_equal(window, [24, 86, 328, 328])


def test_eval_view_of_small_images_is_not_cropped():
  image = _colourful(32, 32)
  view = augment.eval_view(tf.constant(image), height=32, width=32)
  np.testing.assert_allclose(view, image / 255.0, atol=1e-6)
