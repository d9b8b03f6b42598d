"""SimCLR augmentation in jnp, on the accelerator, with one key per view.

Two entry points:
- `random_views`: whole training views of uint8 images (crop, flip, colour distortion, blur), for
  the in-memory source (simclr_jax/memory_data.py), where the dataset lives on the devices;
- `augment_views`: colour distortion and blur of float views, for `config.augment.on_device`,
  where the host (simclr_jax/augment.py) crops and flips.

The ops, their parameters and their order mirror augment.py's TF ops (constants in
augment_params.py); the random draws come from JAX keys, so a view is not the one the host would
make from the same example. Every function takes one image, one key and static settings, and has
no Python control flow on traced values, so it vmaps, jits and shards. Per-pixel maths is
elementwise float32; the resize's matmuls ask for HIGHEST precision (TPUs default to bfloat16).

Deliberate difference from host augmentation, in `augment_views` only: the jitter starts from the
clipped host view (the host jitters the unclipped bicubic resize), which matters only where the
resize overshoots [0, 1].
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from simclr_jax import augment_params

_LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale.
_BRIGHTNESS = {'multiplicative': jnp.multiply, 'additive': jnp.add}  # Additive: adjust_brightness.
_KEYS_CUBIC_A = -0.5  # tf.image.resize's bicubic (half-pixel centres).
_CUBIC_TABLE_SIZE = 1024  # TF reads the cubic weights from a table over [0, 1] of this resolution.


def random_views(images, keys, *, height, width, color_strength, blur_probability,
                 brightness='multiplicative', crop_min_area=augment_params.CROP_AREA_RANGE[0]):
  """`random_view` of each uint8 image [B, H, W, C] with each of its keys [B, V].

  Returns float32 views [B, V, height, width, 3].
  """
  view_fn = functools.partial(random_view, height=height, width=width,
                              color_strength=color_strength, blur_probability=blur_probability,
                              brightness=brightness, crop_min_area=crop_min_area)
  return jax.vmap(jax.vmap(view_fn, (None, 0)))(images, keys)


def augment_views(views, key, *, color_strength, blur_probability, brightness='multiplicative'):
  """Colour distortion, then blur, of every view of a batch [B, V, H, W, 3]; same shape.

  View v of image i uses the key fold_in(fold_in(key, i), v). Call it on the global batch (under
  jit, not inside shard_map), so that views do not depend on the number of devices.
  """
  num_images, num_views = views.shape[:2]
  keys = view_keys(key, jnp.arange(num_images), num_views)
  view_fn = functools.partial(augment_view, color_strength=color_strength,
                              blur_probability=blur_probability, brightness=brightness)
  return jax.vmap(jax.vmap(view_fn))(views, keys)


def view_keys(key, example_ids, num_views):
  """Keys [B, num_views]: fold_in(fold_in(key, example_ids[b]), v), whatever a view's position."""

  def example_keys(example_id):
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, example_id),
                                                   jnp.arange(num_views))

  return jax.vmap(example_keys)(jnp.asarray(example_ids))


def random_view(image, key, *, height, width, color_strength=1.0, blur_probability=0.5,
                brightness='multiplicative', crop_min_area=augment_params.CROP_AREA_RANGE[0]):
  """One training view of a uint8 image [H, W, 1 or 3]: float32 [height, width, 3] in [0, 1].

  As `augment.random_view`: random resized crop, flip, colour distortion, clip, blur.
  `color_strength=0` or `blur_probability=0` turns that part off; crop + flip only is the light
  view for classifiers. The crop and the flip of a key do not depend on the other settings.
  """
  crop_key, flip_key, color_blur_key = jax.random.split(key, 3)
  view = random_resized_crop(image, crop_key, height=height, width=width, min_area=crop_min_area)
  view = random_flip(view, flip_key)
  return augment_view(view, color_blur_key, color_strength=color_strength,
                      blur_probability=blur_probability, brightness=brightness)


def augment_view(image, key, *, color_strength, blur_probability, brightness='multiplicative'):
  """Colour distortion, clip to [0, 1], blur; 0 turns either off, as in `augment.random_view`."""
  color_key, blur_key = jax.random.split(key)
  if color_strength:
    image = color_distortion(image, color_key, strength=color_strength, brightness=brightness)
  image = jnp.clip(image, 0.0, 1.0)
  if blur_probability:
    image = random_blur(image, blur_key, probability=blur_probability)
  return image


def eval_view(image, *, height, width, crop_fraction=augment_params.EVAL_CROP_FRACTION):
  """As `augment.eval_view`: centre crop (targets over 32 px), bicubic resize, clip to [0, 1]."""
  window = (0, 0) + image.shape[:2]
  if height > augment_params.SMALL_IMAGE_SIZE:
    window = center_crop_window(image.shape, height=height, width=width,
                                crop_fraction=crop_fraction)
  return jnp.clip(resize_window(image, window, height=height, width=width), 0.0, 1.0)


def center_crop_window(shape, *, height, width, crop_fraction):
  """`augment.center_crop_window` of a static shape [H, W, C]: Python ints (y, x, h, w)."""
  image_h, image_w = shape[:2]
  aspect_ratio = width / height
  if aspect_ratio > image_w / image_h:
    crop_h, crop_w = crop_fraction / aspect_ratio * image_w, crop_fraction * image_w
  else:
    crop_h, crop_w = crop_fraction * image_h, crop_fraction * aspect_ratio * image_h
  crop_h, crop_w = (int(np.rint(np.float32(size))) for size in (crop_h, crop_w))
  return (image_h - crop_h + 1) // 2, (image_w - crop_w + 1) // 2, crop_h, crop_w


def random_resized_crop(image, key, *, height, width, min_area=augment_params.CROP_AREA_RANGE[0]):
  """Random Inception crop of a uint8 image, resized to float32 [height, width, 3]; not clipped."""
  window = random_crop_window(image.shape, key, aspect_ratio=width / height, min_area=min_area)
  return resize_window(image, window, height=height, width=width)


def random_crop_window(shape, key, *, aspect_ratio=1.0,
                       min_area=augment_params.CROP_AREA_RANGE[0]):
  """Inception-crop window [y, x, h, w] (int32) of an image of static `shape` [H, W, C].

  The sampling of TF's `sample_distorted_bounding_box` as `augment.random_crop_window` calls it:
  per attempt an aspect ratio uniform in (3/4, 4/3) x `aspect_ratio` (w / h), an integer height
  uniform between the rounded heights of area fractions `min_area` (0.08 officially) and 1
  (capped so the rounded width fits), width round(h * ratio), one height nudge when rounding
  leaves the area range, at least 10% of the image covered, offsets uniform with an exclusive
  upper bound. The 100 attempts are
  drawn at once and the first valid one wins; the whole image if none is.
  """
  image_h, image_w = shape[:2]
  # One draw for everything: each random op costs seconds of XLA compile time.
  ratio_u, height_u, y_u, x_u = jax.random.uniform(key, (4, augment_params.CROP_MAX_ATTEMPTS))
  low, high = (r * aspect_ratio for r in augment_params.CROP_ASPECT_RANGE)
  ratio = low + ratio_u * (high - low)
  min_pixels, max_pixels = (np.float32(a) * image_w * image_h
                            for a in (min_area, augment_params.CROP_AREA_RANGE[1]))

  def rounded(x):  # C's lrintf: to nearest, ties to even.
    return jnp.round(x).astype(jnp.int32)

  min_h = rounded(jnp.sqrt(min_pixels / ratio))
  max_h = rounded(jnp.sqrt(max_pixels / ratio))
  widest_h = jnp.floor((image_w + 0.5) / ratio).astype(jnp.int32)
  widest_h = jnp.where(rounded(widest_h * ratio) > image_w, widest_h - 1, widest_h)
  max_h = jnp.minimum(jnp.where(rounded(max_h * ratio) > image_w, widest_h, max_h), image_h)
  min_h = jnp.minimum(min_h, max_h)
  h = min_h + _uniform_int(height_u, max_h - min_h + 1)
  w = rounded(h * ratio)
  grow = w * h < min_pixels
  h = jnp.where(grow, h + 1, h)
  w = jnp.where(grow, rounded(h * ratio), w)
  shrink = w * h > max_pixels
  h = jnp.where(shrink, h - 1, h)
  w = jnp.where(shrink, rounded(h * ratio), w)
  area = (w * h).astype(jnp.float32)
  covered = area / (image_h * image_w) >= augment_params.CROP_MIN_OBJECT_COVERED
  valid = ((area >= min_pixels) & (area <= max_pixels) & (h > 0) & (h <= image_h) & (w > 0)
           & (w <= image_w) & covered)
  y = _uniform_int(y_u, image_h - h)
  x = _uniform_int(x_u, image_w - w)
  first = jnp.argmax(valid)
  window = jnp.stack([y[first], x[first], h[first], w[first]])
  return jnp.where(valid[first], window, jnp.array([0, 0, image_h, image_w], jnp.int32))


def _uniform_int(u, n):
  """Integers uniform in [0, n) from u ~ U[0, 1) (0 where n <= 1); bias below n / 2**23."""
  return jnp.clip(jnp.floor(u * n).astype(jnp.int32), 0, jnp.maximum(n - 1, 0))


def resize_window(image, window, *, height, width):
  """The window [y, x, h, w] of a uint8 image [H, W, 1 or 3] resized to float32 [height, width, 3].

  tf.image.resize(crop, 'bicubic') of the crop scaled to [0, 1], a single channel repeated to three
  (as `augment._resize`): Keys cubic a=-0.5 with TF's table of 1024 fractions, half-pixel centres,
  no antialiasing, taps outside the window dropped and the others renormalised. Separable [out, in]
  weight matrices let the window be traced while every shape stays static
  (jax.image.scale_and_translate would read the pixels beyond the window's edges instead).
  """
  y, x, h, w = (window[i] for i in range(4))
  rows = _resize_weights(y, h, image.shape[0], height)
  columns = _resize_weights(x, w, image.shape[1], width)
  image = image.astype(jnp.float32) / 255.0
  resized = jnp.einsum('yh,hwc,xw->yxc', rows, image, columns, precision=lax.Precision.HIGHEST)
  return jnp.broadcast_to(resized, (height, width, 3))


def _resize_weights(start, size, in_size, out_size):
  """[out_size, in_size]: output i reads input start + (i + 0.5) * size / out_size - 0.5."""
  scale = jnp.asarray(size, jnp.float32) / out_size
  centre = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
  base = jnp.floor(centre)
  fraction = jnp.round((centre - base) * _CUBIC_TABLE_SIZE) / _CUBIC_TABLE_SIZE
  offsets = jnp.arange(-1, 3)
  taps = base.astype(jnp.int32)[:, None] + offsets  # In the window's coordinates.
  weights = jnp.where((taps >= 0) & (taps < size), _keys_cubic(fraction[:, None] - offsets), 0.0)
  weights = weights / weights.sum(-1, keepdims=True)
  return jnp.sum(weights[..., None] * (start + taps[..., None] == jnp.arange(in_size)), axis=1)


def _keys_cubic(x):
  """Keys' cubic convolution kernel with a = -0.5 (zero beyond |x| = 2)."""
  a, x = _KEYS_CUBIC_A, jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return jnp.where(x <= 1.0, near, jnp.where(x < 2.0, far, 0.0))


def random_flip(image, key):
  """Left-right mirror of an [H, W, C] image with probability 1/2."""
  return _maybe(key, augment_params.FLIP_PROBABILITY, image[:, ::-1], image)


def color_distortion(image, key, *, strength, brightness='multiplicative'):
  """With p=0.8 colour jitter of `strength`, then with p=0.2 grayscale (3 channels)."""
  jitter_apply_key, jitter_key, gray_apply_key = jax.random.split(key, 3)
  jittered = color_jitter(image, jitter_key, strength=strength, brightness=brightness)
  image = _maybe(jitter_apply_key, augment_params.JITTER_PROBABILITY, jittered, image)
  return _maybe(gray_apply_key, augment_params.GRAYSCALE_PROBABILITY, to_grayscale(image), image)


def color_jitter(image, key, *, strength, brightness='multiplicative'):
  """Brightness, contrast, saturation (0.8 s) and hue (0.2 s) in a random order, clip after each."""
  if brightness not in _BRIGHTNESS:
    raise ValueError(f'brightness must be one of {sorted(_BRIGHTNESS)}, got {brightness!r}.')
  order, params = sample_jitter(key, strength=strength, brightness=brightness)
  return apply_jitter(image, order, params, brightness=brightness)


def sample_jitter(key, *, strength, brightness='multiplicative'):
  """A random order of the 4 jitter ops and their parameters [4], uniform as in augment.py.

  Brightness factor in [max(0, 1 - 0.8 s), 1 + 0.8 s] (multiplicative) or delta in [-0.8 s, 0.8 s]
  (additive); contrast and saturation factors in [1 - 0.8 s, 1 + 0.8 s]; hue delta in ±0.2 s.
  """
  d = 0.8 * strength
  brightness_range = {'multiplicative': (max(1.0 - d, 0.0), 1.0 + d), 'additive': (-d, d)}
  low, high = zip(brightness_range[brightness], (1.0 - d, 1.0 + d), (1.0 - d, 1.0 + d),
                  (-0.2 * strength, 0.2 * strength))
  order_key, params_key = jax.random.split(key)
  params = jax.random.uniform(params_key, (4,), minval=jnp.array(low), maxval=jnp.array(high))
  return jax.random.permutation(order_key, 4), params


def apply_jitter(image, order, params, *, brightness='multiplicative'):
  """Ops (brightness, contrast, saturation, hue) in `order`, op i with params[i], clipping each."""
  ops = (_BRIGHTNESS[brightness], adjust_contrast, adjust_saturation, adjust_hue)
  order, params = jnp.asarray(order), jnp.asarray(params)

  def apply_op(position, image):
    op = order[position]
    return jnp.clip(lax.switch(op, ops, image, params[op]), 0.0, 1.0)

  # A loop: unrolled, XLA fuses across positions and recomputes (4x slower, 2x the compile on CPU).
  return lax.fori_loop(0, len(ops), apply_op, image)


def adjust_contrast(image, factor):
  """tf.image.adjust_contrast: (x - mean) * factor + mean, with per-channel means."""
  mean = image.mean(axis=(-3, -2), keepdims=True)
  return (image - mean) * factor + mean


def adjust_saturation(image, factor):
  """tf.image.adjust_saturation: HSV saturation times `factor`, clipped to [0, 1]."""
  hue, saturation, value = jnp.unstack(rgb_to_hsv(image), axis=-1)
  return hsv_to_rgb(jnp.stack([hue, jnp.clip(saturation * factor, 0.0, 1.0), value], -1))


def adjust_hue(image, delta):
  """tf.image.adjust_hue: HSV hue plus `delta`, modulo 1."""
  hue, saturation, value = jnp.unstack(rgb_to_hsv(image), axis=-1)
  return hsv_to_rgb(jnp.stack([jnp.mod(hue + delta, 1.0), saturation, value], -1))


def rgb_to_hsv(image):
  """tf.image.rgb_to_hsv of [..., 3]: hue in [0, 1) (0 for grays), saturation, value."""
  red, green, blue = image[..., 0], image[..., 1], image[..., 2]
  value = image.max(-1)
  chroma = value - image.min(-1)
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
  norm = (1.0 / 6.0) / jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(red == value, norm * (green - blue),
                  jnp.where(green == value, norm * (blue - red) + 2.0 / 6.0,
                            norm * (red - green) + 4.0 / 6.0))
  hue = jnp.where(chroma > 0, hue, 0.0)
  return jnp.stack([jnp.where(hue < 0, hue + 1.0, hue), saturation, value], -1)


def hsv_to_rgb(image):
  """tf.image.hsv_to_rgb of [..., 3] (hue in [0, 1])."""
  hue, saturation, value = image[..., :1] * 6.0, image[..., 1:2], image[..., 2:]
  rgb = jnp.concatenate([jnp.abs(hue - 3.0) - 1.0, 2.0 - jnp.abs(hue - 2.0),
                         2.0 - jnp.abs(hue - 4.0)], -1)
  return (1.0 - saturation + saturation * jnp.clip(rgb, 0.0, 1.0)) * value


def to_grayscale(image):
  """Luma grayscale (0.2989, 0.5870, 0.1140) repeated to 3 channels."""
  gray = (image * jnp.array(_LUMA_WEIGHTS)).sum(-1, keepdims=True)
  return jnp.broadcast_to(gray, image.shape)


def random_blur(image, key, *, probability):
  """With `probability`, Gaussian blur with sigma ~ U(0.1, 2.0); clipped to [0, 1].

  The kernel radius is static, (height // 10) // 2 as in `augment.random_blur`.
  """
  apply_key, sigma_key = jax.random.split(key)
  low, high = augment_params.BLUR_SIGMA_RANGE
  sigma = jax.random.uniform(sigma_key, (), minval=low, maxval=high)
  blurred = gaussian_blur(image, sigma, radius=image.shape[0] // 10 // 2)
  return jnp.clip(_maybe(apply_key, probability, blurred, image), 0.0, 1.0)


def gaussian_kernel(sigma, *, radius):
  """Normalised 1-D Gaussian weights at -radius..radius."""
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-jnp.square(x) / (2.0 * jnp.square(sigma)))
  return weights / weights.sum()


def gaussian_blur(image, sigma, *, radius):
  """Separable Gaussian blur of an [H, W, C] image with zero `SAME` padding (as augment.py)."""
  kernel = gaussian_kernel(sigma, radius=radius)
  return _filter_1d(_filter_1d(image, kernel, axis=1), kernel, axis=0)


def _filter_1d(image, kernel, *, axis):
  """Zero-padded `SAME` filtering with a symmetric odd-length kernel, as a sum of shifted copies."""
  radius = kernel.shape[0] // 2
  padding = [(0, 0)] * image.ndim
  padding[axis] = (radius, radius)
  padded = jnp.pad(image, padding)
  size = image.shape[axis]
  return sum(kernel[k] * lax.slice_in_dim(padded, k, k + size, axis=axis)
             for k in range(kernel.shape[0]))


def _maybe(key, probability, applied, original):
  return jnp.where(jax.random.bernoulli(key, probability), applied, original)
