"""SimCLR's augmentation parameters, shared by the TF (augment.py) and JAX (augment_device.py) ops.

A module of constants only, so that the device path reads them without importing TensorFlow.
"""

CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 100
FLIP_PROBABILITY = 0.5
JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2
BLUR_SIGMA_RANGE = (0.1, 2.0)
SMALL_IMAGE_SIZE = 32  # Eval views of images up to this size are not centre-cropped.
EVAL_CROP_FRACTION = 0.875
