r"""Writes a grid of pretraining views: rows original / view 1 / view 2, one column per image.

    python -m simclr_jax.visualize_augmentations --config=configs/default.py --out=views.png \
        [--num_images=8] [--config.augment.color_strength=1.0]

The views come from the pretraining pipeline's own preprocessing (epoch 0 seeds) applied to the
first images of config.train_split, so the picture shows exactly what the encoder is fed.
"""

from absl import app
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags
import numpy as np

from simclr_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Training config.')
_OUT = flags.DEFINE_string('out', 'views.png', 'Where to write the image grid.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'Images (columns) in the grid.')


def originals_and_views(config, num_images):
  """The first `num_images` examples: [(original uint8 [H, W, C], views float32 [2, h, w, 3])]."""
  builder = data.load_builder(config.dataset, config.data_dir)
  image_feature = builder.info.features['image']
  preprocess = data.pretrain_preprocess_fn(config, builder.info.features, epoch=0)
  ds = data.read_split(builder, config.train_split).take(num_images).map(
      lambda example: (image_feature.decode_example(example['image']),
                       preprocess(example)['views']))
  return list(ds.as_numpy_iterator())


def plot_grid(examples, path):
  """Saves rows original / view 1 / view 2 of `examples` to `path`."""
  fig, axes = plt.subplots(3, len(examples), figsize=(1.6 * len(examples), 5), squeeze=False)
  for column, (original, views) in enumerate(examples):
    images = [np.broadcast_to(original, original.shape[:2] + (3,)), views[0], views[1]]
    for row, image in enumerate(images):
      axes[row, column].imshow(image)
      axes[row, column].axis('off')
  for row, title in enumerate(['original', 'view 1', 'view 2']):
    axes[row, 0].set_title(title, loc='left', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  config = _CONFIG.value
  data.ensure_prepared(config.dataset, config.data_dir)
  plot_grid(originals_and_views(config, _NUM_IMAGES.value), _OUT.value)
  print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
