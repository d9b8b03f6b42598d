"""Tests of the on-device augmentation (simclr_jax/augment_device.py), against TF."""

import functools
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_frequency, tiny_pretrain_config
from simclr_jax import augment
from simclr_jax import augment_device
from simclr_jax import augment_params
from simclr_jax import mesh as mesh_lib
from simclr_jax import pretrain

NUM_DRAWS = 400
TF_BRIGHTNESS = {'multiplicative': lambda x, factor: x * factor,  # As augment.py.
                 'additive': tf.image.adjust_brightness}


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _image(height=20, width=24, seed=0):
  """float32 RGB in [0, 1] with a gray, a black, a pure red and a two-equal-channels pixel."""
  image = np.random.RandomState(seed).rand(height, width, 3).astype(np.float32)
  image[0, :4] = [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.1]]
  return image


def _keys(num, seed=0):
  return jax.random.split(jax.random.key(seed), num)


def _draws(fn, image):
  """jit(vmap(fn))(image, key) for NUM_DRAWS keys, as numpy."""
  return np.asarray(jax.jit(jax.vmap(fn, (None, 0)))(image, _keys(NUM_DRAWS)))


def test_hsv_conversions_match_tf():
  image = _image()
  np.testing.assert_allclose(augment_device.rgb_to_hsv(image), tf.image.rgb_to_hsv(image),
                             atol=1e-6)
  np.testing.assert_allclose(augment_device.hsv_to_rgb(image), tf.image.hsv_to_rgb(image),
                             atol=1e-6)


@pytest.mark.parametrize('op,tf_op,params', [
    (augment_device.adjust_contrast, tf.image.adjust_contrast, (0.2, 1.8)),
    (augment_device.adjust_saturation, tf.image.adjust_saturation, (0.2, 1.8)),
    (augment_device.adjust_hue, tf.image.adjust_hue, (-0.2, 0.03, 0.2)),
])
def test_jitter_ops_match_tf(op, tf_op, params):
  image = _image()
  for param in params:
    np.testing.assert_allclose(op(image, param), tf_op(image, param), atol=2e-6)


def test_grayscale_matches_tf():
  image = _image()
  np.testing.assert_allclose(augment_device.to_grayscale(image), augment.to_grayscale(image),
                             atol=1e-6)


@pytest.mark.parametrize('sigma,radius', [(0.1, 1), (0.8, 2), (2.0, 3)])
def test_gaussian_blur_matches_tf(sigma, radius):
  image = _image()
  np.testing.assert_allclose(augment_device.gaussian_blur(image, sigma, radius=radius),
                             augment.gaussian_blur(image, sigma, radius=radius), atol=1e-6)


@pytest.mark.parametrize('brightness', ['multiplicative', 'additive'])
def test_jitter_applies_ops_in_order_clipping_after_each(brightness):
  image = _image()
  params = np.array([1.7 if brightness == 'multiplicative' else 0.3, 1.8, 0.3, 0.15], np.float32)
  tf_ops = [TF_BRIGHTNESS[brightness], tf.image.adjust_contrast, tf.image.adjust_saturation,
            tf.image.adjust_hue]
  outputs = []
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
    expected = tf.constant(image)
    for op in order:
      expected = tf.clip_by_value(tf_ops[op](expected, params[op]), 0.0, 1.0)
    actual = augment_device.apply_jitter(image, order, params, brightness=brightness)
    np.testing.assert_allclose(actual, expected, atol=2e-6, err_msg=str(order))
    outputs.append(actual)
  assert not np.allclose(outputs[0], outputs[1])


@pytest.mark.parametrize('brightness,strength,brightness_range', [
    ('multiplicative', 0.5, (0.6, 1.4)),
    ('multiplicative', 1.5, (0.0, 2.2)),  # The factor never goes negative.
    ('additive', 0.5, (-0.4, 0.4)),
])
def test_sample_jitter_orders_and_ranges(brightness, strength, brightness_range):
  sample = jax.vmap(lambda key: augment_device.sample_jitter(key, strength=strength,
                                                             brightness=brightness))
  orders, params = jax.device_get(sample(_keys(NUM_DRAWS)))
  np.testing.assert_array_equal(np.sort(orders, axis=1), np.tile(np.arange(4), (NUM_DRAWS, 1)))
  assert len({tuple(order) for order in orders}) == 24  # All permutations occur.
  d = 0.8 * strength
  ranges = [brightness_range, (1 - d, 1 + d), (1 - d, 1 + d), (-0.2 * strength, 0.2 * strength)]
  for column, (low, high) in zip(params.T, ranges):
    assert low <= column.min() < low + 0.05 * (high - low)
    assert high - 0.05 * (high - low) < column.max() <= high


def test_color_distortion_frequencies():
  image = _image()
  out = _draws(lambda x, key: augment_device.color_distortion(x, key, strength=0.5), image)
  gray = np.all(np.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3))
  # Without jitter the output is the input or its grayscale, up to rounding, which differs
  # between jitted and eager code and between CPUs; any jitter moves some pixel far more.
  unjittered = np.where(gray[:, None, None, None], augment_device.to_grayscale(image), image)
  jittered = np.any(np.abs(out - unjittered) > 1e-4, axis=(1, 2, 3))
  assert_frequency(gray, augment_params.GRAYSCALE_PROBABILITY)
  assert_frequency(jittered, augment_params.JITTER_PROBABILITY)
  assert 0.0 <= out.min() and out.max() <= 1.0


def test_blur_frequency_radius_and_sigma_range():
  impulse = np.zeros((40, 40, 3), np.float32)  # Radius 40 // 10 // 2 = 2.
  impulse[20, 20] = 1.0
  out = _draws(lambda x, key: augment_device.random_blur(x, key, probability=0.3), impulse)
  blurred = np.any(out != impulse, axis=(1, 2, 3))  # Even sigma 0.1 leaks ~1e-22 into neighbours.
  assert_frequency(blurred, 0.3)
  support = np.any(out[blurred] > 0, axis=(0, 3))
  assert support.sum(0).max() == support.sum(1).max() == 5
  centres = out[blurred, 20, 20, 0]
  sharpest = np.asarray(augment_device.gaussian_blur(impulse, 0.1, radius=2))[20, 20, 0]
  widest = np.asarray(augment_device.gaussian_blur(impulse, 2.0, radius=2))[20, 20, 0]
  assert widest <= centres.min() and centres.max() <= sharpest
  assert len(np.unique(centres)) > 0.9 * len(centres)  # One sigma per image.


def _augment(views, key, **kwargs):
  kwargs = dict(dict(color_strength=1.0, blur_probability=0.5), **kwargs)
  return augment_device.augment_views(views, key, **kwargs)


def test_augment_views_is_deterministic_in_range_and_views_differ():
  image = _image(height=32, width=32)
  views = np.broadcast_to(image, (4, 2) + image.shape)  # Both views of every image alike.
  fn = jax.jit(_augment)
  out = np.asarray(fn(views, jax.random.key(0)))
  assert out.shape == views.shape and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_array_equal(out, fn(views, jax.random.key(0)))
  assert not np.allclose(out, fn(views, jax.random.key(1)))
  for i in range(4):
    assert not np.allclose(out[i, 0], out[i, 1])
  assert not np.allclose(out[0], out[1])
  np.testing.assert_array_equal(
      _augment(views, jax.random.key(0), color_strength=0, blur_probability=0), views)


def test_sharded_augment_views_match_one_device():
  views = np.random.RandomState(0).rand(8, 2, 20, 20, 3).astype(np.float32)
  key = jax.random.key(3)
  expected = jax.jit(_augment)(views, key)
  mesh = mesh_lib.create_mesh(jax.devices()[:4])
  sharding = mesh_lib.batch_sharded(mesh)
  with jax.set_mesh(mesh):
    actual = jax.jit(_augment)(jax.device_put(views, sharding), key)
  assert actual.sharding.is_equivalent_to(sharding, actual.ndim)
  np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_pretraining_with_on_device_augmentation(tiny_data_dir, tmp_path, monkeypatch):
  calls, step_keys = [], []
  augment_views = augment_device.augment_views

  def spy(views, key, **kwargs):
    calls.append((views.shape, kwargs))
    jax.debug.callback(step_keys.append, jax.random.key_data(key))
    return augment_views(views, key, **kwargs)

  monkeypatch.setattr(augment_device, 'augment_views', spy)
  config = tiny_pretrain_config(tiny_data_dir, num_train_steps=2)
  config.data.augment.on_device = True
  config.data.augment.blur_probability = 0.5
  pretrain.run(config, str(tmp_path))

  assert calls == [((16, 2, 16, 16, 3), dict(color_strength=0.5, blur_probability=0.5,
                                             brightness='multiplicative'))]
  assert len(step_keys) == 2 and not np.array_equal(*step_keys)  # A fresh key every step.
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [1, 2]
  assert all(np.isfinite(r['loss']) for r in records)


# Whole views from uint8 images: crop, resize, flip (random_view).

NUM_CROPS = 4000


def _uint8_image(shape, seed=0):
  return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


def _two_sample_z(a, b):
  """Per-category z of the difference of two samples' frequencies (pooled binomial variance)."""
  categories = sorted(set(a) | set(b))
  counts_a = np.array([np.sum(a == c) for c in categories])
  counts_b = np.array([np.sum(b == c) for c in categories])
  pooled = (counts_a + counts_b) / (len(a) + len(b))
  sigma = np.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
  return (counts_a / len(a) - counts_b / len(b)) / sigma


@pytest.mark.parametrize('shape,aspect_ratio,min_area', [
    ((28, 28, 1), 1.0, 0.08), ((5, 7, 3), 1.0, 0.08), ((24, 40, 3), 1.5, 0.08),
    ((28, 28, 1), 1.0, 0.3)])
def test_crop_windows_follow_tf_sample_distorted_bounding_box(shape, aspect_ratio, min_area):
  sample = jax.jit(jax.vmap(lambda key: augment_device.random_crop_window(
      shape, key, aspect_ratio=aspect_ratio, min_area=min_area)))
  ours = np.asarray(sample(_keys(NUM_CROPS)))
  tf_seeds = tf.random.experimental.stateless_split([7, 11], NUM_CROPS)
  tf_sample = tf.function(lambda seeds: tf.map_fn(lambda seed: augment.random_crop_window(
      tf.constant(shape), seed, aspect_ratio=aspect_ratio, min_area=min_area), seeds))
  theirs = np.asarray(tf_sample(tf_seeds))

  def statistics(windows):
    y, x, h, w = windows.T
    area = h * w / (shape[0] * shape[1])
    return {'area': np.digitize(area, np.linspace(0, 1, 11)),
            'aspect': np.digitize(w / h, np.linspace(0.5, 2.5, 11)),
            'y': np.digitize(y / shape[0], np.linspace(0, 1, 6)),
            'x': np.digitize(x / shape[1], np.linspace(0, 1, 6))}

  for name, ours_stat in statistics(ours).items():
    z = _two_sample_z(ours_stat, statistics(theirs)[name])
    assert np.abs(z).max() < 4, (name, z)
  # Every crop covers at least min_area and min_object_covered (0.1) of the image.
  fractions = ours[:, 2] * ours[:, 3] / (shape[0] * shape[1])
  assert fractions.min() >= max(min_area, 0.1) - 1e-6
  if shape[0] * shape[1] < 50:  # Few distinct sizes: compare them one by one.
    sizes = lambda windows: windows[:, 2] * 100 + windows[:, 3]
    assert np.abs(_two_sample_z(sizes(ours), sizes(theirs))).max() < 4


def test_crop_windows_fit_and_never_touch_the_far_edges_unless_full():
  shape = (20, 30, 3)
  windows = np.asarray(jax.jit(jax.vmap(lambda key: augment_device.random_crop_window(
      shape, key)))(_keys(NUM_CROPS)))
  y, x, h, w = windows.T
  assert np.all((y >= 0) & (x >= 0) & (h >= 1) & (w >= 1))
  assert np.all(h * w >= 0.1 * shape[0] * shape[1])  # min_object_covered, above the 0.08 area.
  # TF draws offsets in [0, H - h): a crop shorter than the image never reaches its last row.
  assert np.all(np.where(h < shape[0], y + h < shape[0], y == 0))
  assert np.all(np.where(w < shape[1], x + w < shape[1], x == 0))
  assert np.all((w / h > 0.75 * 0.8) & (w / h < 4 / 3 * 1.25))


@pytest.mark.parametrize('image_shape,window,size', [
    ((28, 30, 3), (0, 0, 28, 30), (28, 28)),   # Whole image, slightly downscaled.
    ((28, 30, 3), (3, 5, 10, 13), (28, 28)),   # Upscaled window inside the image.
    ((28, 30, 3), (0, 0, 5, 7), (32, 32)),     # At the top-left corner.
    ((28, 30, 3), (10, 20, 18, 10), (16, 16)),  # Touching the bottom-right edges.
    ((28, 30, 3), (27, 29, 1, 1), (8, 8)),     # One pixel.
    ((28, 30, 1), (5, 5, 20, 20), (7, 9)),     # Grayscale, downscaled, non-square output.
])
def test_resize_window_matches_tf_bicubic_resize_of_the_crop(image_shape, window, size):
  image = _uint8_image(image_shape)
  y, x, h, w = window
  crop = tf.image.convert_image_dtype(image[y:y + h, x:x + w], tf.float32)
  expected = tf.image.resize(tf.image.grayscale_to_rgb(crop) if image_shape[-1] == 1 else crop,
                             size, method='bicubic')
  resize = jax.jit(augment_device.resize_window, static_argnames=('height', 'width'))
  actual = resize(image, np.array(window), height=size[0], width=size[1])  # A traced window.
  np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_flips_are_mirror_images_half_the_time():
  image = _image()
  out = _draws(augment_device.random_flip, image)
  flipped = np.all(out == image[:, ::-1], axis=(1, 2, 3))
  assert np.all(flipped | np.all(out == image, axis=(1, 2, 3)))
  assert_frequency(flipped, 0.5)


def _random_view(image, key, **kwargs):
  kwargs = dict(dict(height=24, width=24, color_strength=1.0, blur_probability=0.5), **kwargs)
  return augment_device.random_view(image, key, **kwargs)


@pytest.mark.parametrize('channels', [1, 3])
def test_random_view_shape_range_and_determinism(channels):
  image = _uint8_image((30, 36, channels))
  out = _draws(_random_view, image)
  assert out.shape == (NUM_DRAWS, 24, 24, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  assert len({view.tobytes() for view in out}) == NUM_DRAWS
  np.testing.assert_allclose(out[0], jax.jit(_random_view)(image, _keys(NUM_DRAWS)[0]), atol=1e-6)
  if channels == 1:  # Every op keeps a gray image gray.
    np.testing.assert_allclose(out, np.broadcast_to(out[..., :1], out.shape), atol=1e-6)


def test_light_random_view_keeps_colours():
  """With colour and blur off a uniform image stays exactly its colour, whatever the crop."""
  image = np.broadcast_to(np.array([40, 130, 220], np.uint8), (30, 36, 3))
  out = _draws(functools.partial(_random_view, color_strength=0, blur_probability=0), image)
  np.testing.assert_allclose(out, np.broadcast_to([40 / 255, 130 / 255, 220 / 255], out.shape),
                             atol=1e-6)


def test_random_views_use_one_key_per_view():
  images = _uint8_image((3, 20, 20, 3))
  keys = augment_device.view_keys(jax.random.key(0), np.array([5, 9, 2]), 2)
  settings = dict(height=16, width=16, color_strength=0.5, blur_probability=0.0)
  out = jax.jit(functools.partial(augment_device.random_views, **settings))(images, keys)
  assert out.shape == (3, 2, 16, 16, 3)
  expected = _random_view(images[1], jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 9),
                                                        1), **settings)
  np.testing.assert_allclose(out[1, 1], expected, atol=1e-6)


@pytest.mark.parametrize('image_shape,size', [((40, 48, 3), (36, 36)), ((96, 96, 3), (64, 64)),
                                              ((28, 28, 1), (28, 28)), ((32, 32, 3), (24, 24))])
def test_eval_view_matches_tf(image_shape, size):
  image = _uint8_image(image_shape)
  expected = augment.eval_view(tf.constant(image), height=size[0], width=size[1])
  actual = augment_device.eval_view(image, height=size[0], width=size[1])
  np.testing.assert_allclose(actual, expected, atol=1e-4)
