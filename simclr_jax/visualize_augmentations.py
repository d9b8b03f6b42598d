r"""Writes a grid of pretraining views: rows original / view 1 / view 2.

    python -m simclr_jax.visualize_augmentations --config=configs/default.py --out=views.png \
        [--num_images=8] [--config.augment.color_strength=1.0]

The same as `python -m simclr_jax.visualize --config=...` (see simclr_jax/visualize.py).
"""

from absl import app

from simclr_jax import visualize

if __name__ == '__main__':
  app.run(visualize.main)
