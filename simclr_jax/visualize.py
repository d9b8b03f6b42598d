r"""Pictures of a run: training curves, or the augmented views the encoder is fed.

    python -m simclr_jax.visualize --workdir=runs/fmnist_cpu --out=curves.png
    python -m simclr_jax.visualize --config=configs/default.py --out=views.png

--workdir plots loss, contrastive accuracy, online-probe accuracy and the kNN monitor from
metrics.jsonl against epochs, with the top-1 of every evaluation in eval/results.jsonl (e.g. kNN
of several checkpoints: `run_eval.py --workdir=RUN --config.protocol=knn --step=N`). --config
writes a grid of rows original / view 1 / view 2, made by the pretraining pipeline's own
preprocessing (epoch 0 seeds) of the first images of config.data.train_split: exactly what the
encoder is fed.
"""

import json
import os
import re

from absl import app, flags
import numpy as np
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags

from simclr_jax import console  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config whose views to draw.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run whose curves to draw.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the PNG.', required=True)
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'Images in the views grid.')


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def originals_and_views(config, num_images):
  """The first `num_images` examples: [(original uint8 [H, W, C], views float32 [2, h, w, 3])]."""
  # Imported here: TensorFlow loads after console.quiet_third_party_logs, and curves need none.
  from simclr_jax import data  # pylint: disable=g-import-not-at-top
  from simclr_jax import tfds_data  # pylint: disable=g-import-not-at-top
  data.prepare(config.data)
  split = data.open_split(config.data, config.data.train_split)
  image_feature = split.reader.info.features['image']
  preprocess = tfds_data.pretrain_preprocess_fn(config.data, split.reader.info.features,
                                                seed=config.seed, epoch=0)
  ds = tfds_data.read_split(split.reader, split.split).take(num_images).map(
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


def plot_curves(workdir: str, path: str) -> None:
  """Loss and accuracies against epochs for the run in `workdir`."""
  records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  if not records:
    raise ValueError(f'{workdir}/metrics.jsonl is missing or empty; pretrain first.')
  epochs_per_step = records[-1]['epoch'] / records[-1]['step']
  epochs = [r['epoch'] for r in records]
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
  loss_ax.plot(epochs, [r['loss'] for r in records], label='loss (2 x NT-Xent)')
  loss_ax.plot(epochs, [r['chance_loss'] for r in records], '--', label='chance: 2 log(2N-1)')
  loss_ax.set(xlabel='epoch', title='pretraining loss')
  for key, label in (('contrastive_acc', 'contrastive top-1'), ('probe_acc', 'online probe')):
    if key in records[0]:
      acc_ax.plot(epochs, [r[key] for r in records], label=f'{label} (train batches)')
  monitored = [r for r in records if 'knn_top1' in r]
  if monitored:
    acc_ax.plot([r['epoch'] for r in monitored], [r['knn_top1'] for r in monitored], 's-',
                label='kNN monitor top-1 (held out)')
  evals = {}
  for r in read_jsonl(os.path.join(workdir, 'eval', 'results.jsonl')):
    for key, value in r.items():
      if key.endswith('/top1'):
        name = re.sub(r'_step\d+$', '', key[:-len('/top1')])  # Evaluations of one protocol.
        evals.setdefault(name, {})[r['step'] * epochs_per_step] = value
  for name, points in sorted(evals.items()):
    xs = sorted(points)
    acc_ax.plot(xs, [points[x] for x in xs], 'o-', label=f'{name} top-1 (test)')
  acc_ax.set(xlabel='epoch', ylim=(0, 1), title='accuracy')
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  if (_WORKDIR.value is None) == (_CONFIG.value is None):
    raise app.UsageError('Give exactly one of --workdir (curves) or --config (views).')
  console.quiet_third_party_logs(verbose=False)
  if _WORKDIR.value is not None:
    plot_curves(_WORKDIR.value, _OUT.value)
  else:
    plot_grid(originals_and_views(_CONFIG.value, _NUM_IMAGES.value), _OUT.value)
  print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
