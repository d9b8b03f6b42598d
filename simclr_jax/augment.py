"""SimCLR image augmentation as TensorFlow ops for tf.data (google-research/simclr, TF2 code).

Every random choice is stateless: a view is a pure function of (image, seed), where `seed` is a
shape-[2] int tensor, split per op, so the same seed always gives the same view.

Images are uint8 `[H, W, 1 or 3]` tensors, or scalar `tf.string` JPEGs: a view of a JPEG samples
its crop window from the encoded image's shape and decodes only that window
(`tf.image.decode_and_crop_jpeg`). Views are float32 `[height, width, 3]`
in [0, 1], with no mean/std normalisation (as in the reference).

Deliberate differences from the reference code:
- the blur sigma is drawn per image (the reference draws one sigma per view per core batch, an
  artefact of its batched implementation; the paper describes per-image sampling);
- resizing is TF2's bicubic (`tf.image.resize`, Keys a=-0.5, half-pixel centres), as in `tf2/`.
"""

import functools

import tensorflow as tf

from simclr_jax import augment_params


def random_view(image, seed, *, height, width, color_strength=1.0, blur_probability=0.5,
                brightness='multiplicative', crop_min_area=augment_params.CROP_AREA_RANGE[0]):
  """One SimCLR training view: crop, flip, colour distortion, blur; float32 [height, width, 3].

  `color_strength=0` turns colour distortion off entirely (jitter and grayscale) and
  `blur_probability=0` turns blur off: crop + flip only is the light view for linear evaluation
  and fine-tuning. The crop and the flip of a seed do not depend on the other settings.
  `crop_min_area` is the smallest crop as a fraction of the image (0.08 officially).
  """
  crop_seed, flip_seed, color_seed, blur_seed = _split(seed, 4)
  view = random_resized_crop(image, crop_seed, height=height, width=width,
                             min_area=crop_min_area)
  view = tf.image.stateless_random_flip_left_right(view, flip_seed)
  if color_strength:
    view = color_distortion(view, color_seed, strength=color_strength, brightness=brightness)
  view = tf.clip_by_value(view, 0.0, 1.0)
  if blur_probability:
    view = random_blur(view, blur_seed, probability=blur_probability)
  return view


def eval_view(image, *, height, width, crop_fraction=augment_params.EVAL_CROP_FRACTION):
  """Evaluation view: central crop of `crop_fraction` of the image, bicubic resize; float32 [0, 1].

  Targets of at most 32 pixels high (CIFAR-size data) are resized without cropping, as in the
  reference.
  """
  window = None
  if height > augment_params.SMALL_IMAGE_SIZE:
    window = center_crop_window(image_shape(image), height=height, width=width,
                                crop_fraction=crop_fraction)
  view = _resize(decode_window(image, window), height, width)
  return tf.clip_by_value(view, 0.0, 1.0)


def image_shape(image):
  """[H, W, C] int32 of a uint8 image or (without decoding it) of a JPEG string."""
  if image.dtype == tf.string:
    return tf.image.extract_jpeg_shape(image)
  return tf.shape(image)


def decode_window(image, window=None):
  """The [y, x, h, w] `window` (None: everything) of a uint8 image or JPEG, as uint8."""
  if image.dtype == tf.string:
    if window is None:
      return tf.io.decode_jpeg(image, channels=3)
    return tf.image.decode_and_crop_jpeg(image, window, channels=3)
  if window is None:
    return image
  y, x, h, w = tf.unstack(window)
  return tf.image.crop_to_bounding_box(image, y, x, h, w)


def random_crop_window(shape, seed, *, aspect_ratio=1.0,
                       min_area=augment_params.CROP_AREA_RANGE[0]):
  """Inception-crop window [y, x, h, w] of an image of `shape` [H, W, C], TF sampling semantics.

  Area fraction in (min_area, 1) (0.08 officially), aspect ratio (3/4, 4/3) times the target's
  `aspect_ratio` (w / h), at least 10% of the image covered, 100 attempts, the whole image as
  fallback.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed,
      min_object_covered=augment_params.CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=[r * aspect_ratio for r in augment_params.CROP_ASPECT_RANGE],
      area_range=(min_area, augment_params.CROP_AREA_RANGE[1]),
      max_attempts=augment_params.CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  return tf.concat([begin[:2], size[:2]], axis=0)


def center_crop_window(shape, *, height, width, crop_fraction):
  """Centred window [y, x, h, w] with the target's aspect ratio, `crop_fraction` of the image."""
  image_h = tf.cast(shape[0], tf.float32)
  image_w = tf.cast(shape[1], tf.float32)
  aspect_ratio = width / height
  crop_h, crop_w = tf.cond(
      aspect_ratio > image_w / image_h,
      lambda: (crop_fraction / aspect_ratio * image_w, crop_fraction * image_w),
      lambda: (crop_fraction * image_h, crop_fraction * aspect_ratio * image_h))
  crop_h = tf.cast(tf.math.rint(crop_h), tf.int32)
  crop_w = tf.cast(tf.math.rint(crop_w), tf.int32)
  return tf.stack([(shape[0] - crop_h + 1) // 2, (shape[1] - crop_w + 1) // 2, crop_h, crop_w])


def random_resized_crop(image, seed, *, height, width,
                        min_area=augment_params.CROP_AREA_RANGE[0]):
  """Random Inception crop resized (bicubic) to [height, width, 3]; float32, not clipped."""
  window = random_crop_window(image_shape(image), seed, aspect_ratio=width / height,
                              min_area=min_area)
  return _resize(decode_window(image, window), height, width)


def color_distortion(image, seed, *, strength, brightness='multiplicative'):
  """With p=0.8 colour jitter of `strength`, then with p=0.2 grayscale (3 channels)."""
  jitter_apply_seed, jitter_seed, gray_apply_seed = _split(seed, 3)
  image = _maybe_apply(lambda x: color_jitter(x, jitter_seed, strength=strength,
                                              brightness=brightness),
                       image, augment_params.JITTER_PROBABILITY, jitter_apply_seed)
  return _maybe_apply(to_grayscale, image, augment_params.GRAYSCALE_PROBABILITY, gray_apply_seed)


def color_jitter(image, seed, *, strength, brightness='multiplicative'):
  """Brightness, contrast, saturation (0.8 s) and hue (0.2 s) in a random order, clip after each."""
  if brightness not in _BRIGHTNESS:
    raise ValueError(f'brightness must be one of {sorted(_BRIGHTNESS)}, got {brightness!r}.')
  order_seed, *op_seeds = _split(seed, 5)
  ops = [_BRIGHTNESS[brightness], _contrast, _saturation, _hue]
  order = tf.argsort(tf.random.stateless_uniform([len(ops)], order_seed))
  for position in range(len(ops)):  # Unrolled: a tf.while_loop here is ~1.5x slower.
    branches = [functools.partial(op, image, s, strength) for op, s in zip(ops, op_seeds)]
    image = tf.clip_by_value(tf.switch_case(order[position], branches), 0.0, 1.0)
  return image


def to_grayscale(image):
  """Luma grayscale (0.2989, 0.5870, 0.1140) repeated to 3 channels."""
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def random_blur(image, seed, *, probability):
  """With `probability`, Gaussian blur with sigma ~ U(0.1, 2.0); clipped to [0, 1]."""
  apply_seed, sigma_seed = _split(seed, 2)
  sigma = tf.random.stateless_uniform([], sigma_seed, *augment_params.BLUR_SIGMA_RANGE)
  radius = image.shape[0] // 10 // 2
  blurred = _maybe_apply(lambda x: gaussian_blur(x, sigma, radius=radius), image, probability,
                         apply_seed)
  return tf.clip_by_value(blurred, 0.0, 1.0)


def gaussian_kernel(sigma, *, radius):
  """Normalised 1-D Gaussian weights at -radius..radius."""
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  weights = tf.exp(-tf.square(x) / (2.0 * tf.square(tf.cast(sigma, tf.float32))))
  return weights / tf.reduce_sum(weights)


def gaussian_blur(image, sigma, *, radius):
  """Separable Gaussian blur of an [H, W, C] image with zero `SAME` padding (as the reference)."""
  kernel = gaussian_kernel(sigma, radius=radius)
  channels = image.shape[-1]
  horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  blurred = tf.nn.depthwise_conv2d(image[None], horizontal, [1, 1, 1, 1], 'SAME')
  blurred = tf.nn.depthwise_conv2d(blurred, vertical, [1, 1, 1, 1], 'SAME')
  return blurred[0]


def _multiplicative_brightness(image, seed, strength):
  delta = 0.8 * strength
  return image * tf.random.stateless_uniform([], seed, max(1.0 - delta, 0.0), 1.0 + delta)


def _additive_brightness(image, seed, strength):
  delta = 0.8 * strength
  return image + tf.random.stateless_uniform([], seed, -delta, delta)


def _contrast(image, seed, strength):
  factor = tf.random.stateless_uniform([], seed, 1.0 - 0.8 * strength, 1.0 + 0.8 * strength)
  return tf.image.adjust_contrast(image, factor)


def _saturation(image, seed, strength):
  factor = tf.random.stateless_uniform([], seed, 1.0 - 0.8 * strength, 1.0 + 0.8 * strength)
  return tf.image.adjust_saturation(image, factor)


def _hue(image, seed, strength):
  delta = tf.random.stateless_uniform([], seed, -0.2 * strength, 0.2 * strength)
  return tf.image.adjust_hue(image, delta)


_BRIGHTNESS = {'multiplicative': _multiplicative_brightness, 'additive': _additive_brightness}


def _maybe_apply(fn, image, probability, seed):
  return tf.cond(tf.random.stateless_uniform([], seed) < probability,
                 lambda: fn(image), lambda: image)


def _resize(image, height, width):
  """uint8 [h, w, 1 or 3] -> float32 [height, width, 3] in [0, 1] (bicubic can overshoot)."""
  image = tf.image.convert_image_dtype(image, tf.float32)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return tf.ensure_shape(tf.image.resize(image, [height, width], method='bicubic'),
                         [height, width, 3])


def _split(seed, num):
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))
