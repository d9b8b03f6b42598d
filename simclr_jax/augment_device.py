"""SimCLR colour distortion and blur in jnp, for augmenting on the accelerator.

The device half of `config.augment.on_device`: the host (simclr_jax/augment.py) crops and flips,
and the train step applies `augment_views` to the global batch. The ops and their parameter
ranges mirror augment.py's TF ops; the random draws come from JAX keys, so a view is not the one
the host would make from the same example.

Each function takes one float32 image [H, W, 3] in [0, 1], one key and static settings, and has
no Python control flow on traced values, so it vmaps, jits and shards; `augment_views` vmaps over
a batch. Per-pixel maths is elementwise float32 (no matmul or conv, whose default precision on
TPU would be bfloat16).

Deliberate difference from host augmentation: the jitter starts from the clipped host view (the
host jitters the unclipped bicubic resize), which matters only where the resize overshoots [0, 1].
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from simclr_jax import augment_params

_LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale.
_BRIGHTNESS = {'multiplicative': jnp.multiply, 'additive': jnp.add}  # Additive: adjust_brightness.


def augment_views(views, key, *, color_strength, blur_probability, brightness='multiplicative'):
  """Colour distortion, then blur, of every view of a batch [B, V, H, W, 3]; same shape.

  View v of image i uses the key fold_in(fold_in(key, i), v). Call it on the global batch (under
  jit, not inside shard_map), so that views do not depend on the number of devices.
  """
  num_images, num_views = views.shape[:2]

  def image_keys(i):
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, i),
                                                   jnp.arange(num_views))

  keys = jax.vmap(image_keys)(jnp.arange(num_images))
  view_fn = functools.partial(augment_view, color_strength=color_strength,
                              blur_probability=blur_probability, brightness=brightness)
  return jax.vmap(jax.vmap(view_fn))(views, keys)


def augment_view(image, key, *, color_strength, blur_probability, brightness='multiplicative'):
  """Colour distortion, then blur; 0 turns either off, as in `augment.random_view`."""
  color_key, blur_key = jax.random.split(key)
  if color_strength:
    image = color_distortion(image, color_key, strength=color_strength, brightness=brightness)
  if blur_probability:
    image = random_blur(image, blur_key, probability=blur_probability)
  return image


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
