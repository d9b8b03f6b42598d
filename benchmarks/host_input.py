r"""Host input throughput of the pretraining pipeline, in images/s (each image = 2 views).

    python benchmarks/host_input.py [--batches=20] [--data_dir=/tmp/host_input_tfds]

Runs `tfds_data.pretrain_batches` (TFDS read, shuffle, decode, two augmented views, batching) on two
synthetic TFDS datasets, built once in --data_dir:
  32:  32x32 RGB PNGs (CIFAR-10 size), CIFAR recipe: colour strength 0.5, no blur, batch 256;
  224: 500x375 JPEGs (ImageNet-like), ImageNet recipe: 224x224 crops through the
       decode-and-crop path, colour strength 1.0, blur p=0.5, batch 64.
Each case runs in a child process pinned to one core and in one using every core this process
may use. Besides wall-clock images/s it reports images per CPU-second of the all-cores run (CPU
time of all the process's threads), a per-core figure that other load on the machine hardly
changes. Prints one JSON object and a table.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

import bench_util

sys.path.insert(0, bench_util.ROOT)

_BATCHES = flags.DEFINE_integer('batches', 20, 'Timed batches per run, after 3 warm-up ones.')
_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/host_input_tfds', 'Synthetic datasets here.')
_CASE = flags.DEFINE_string('case', None, 'Internal: run one case in this process.')
_CORES = flags.DEFINE_integer('cores', None, 'Internal: pin the case to this many cores.')

CASES = {
    '32': dict(dataset='bench_png32', image_size=32, batch_size=256, color_strength=0.5,
               blur_probability=0.0, num_examples=8192, shape=(32, 32)),
    '224': dict(dataset='bench_jpeg500x375', image_size=224, batch_size=64, color_strength=1.0,
                blur_probability=0.5, num_examples=2048, shape=(375, 500)),
}


def build_dataset(case, data_dir):
  """Stores the synthetic dataset of `case` in data_dir unless it is there; returns bytes/image."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = CASES[case]
  jpeg = case == '224'
  try:
    builder = tfds.builder(spec['dataset'], data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    rng = np.random.RandomState(0)
    height, width = spec['shape']

    def image(i):
      if not jpeg:
        return tf.io.encode_png(rng.randint(0, 256, (height, width, 3)).astype(np.uint8)).numpy()
      # Smooth random colour fields plus noise: JPEG sizes like ImageNet's (~100 kB).
      field = tf.image.resize(rng.uniform(0, 255, (1, 12, 16, 3)), [height, width], 'bicubic')[0]
      pixels = np.clip(field.numpy() + rng.normal(0, 12, (height, width, 3)), 0, 255)
      return tf.io.encode_jpeg(pixels.astype(np.uint8), quality=90).numpy()

    examples = ((i, {'image': image(i), 'label': i % 10}) for i in range(spec['num_examples']))
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=spec['dataset'], version='1.0.0', data_dir=data_dir, split_datasets={'train':
                                                                                    examples},
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(height, width, 3),
                                         encoding_format='jpeg' if jpeg else 'png'),
            'label': tfds.features.ClassLabel(num_classes=10)}))
  return builder.info.splits['train'].num_bytes / spec['num_examples']


def run_case(case, data_dir, num_batches):
  """Images/s of `pretrain_batches` for `case` in this process."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from simclr_jax import data  # pylint: disable=g-import-not-at-top
  from simclr_jax import tfds_data  # pylint: disable=g-import-not-at-top
  spec = CASES[case]
  data_config = default.get_data_config()
  data_config.update(dict(dataset=spec['dataset'], data_dir=data_dir,
                          image_size=spec['image_size'],
                          shuffle_buffer=spec['num_examples'] // 4))
  data_config.augment.color_strength = spec['color_strength']
  data_config.augment.blur_probability = spec['blur_probability']
  start = time.perf_counter()
  batches = tfds_data.pretrain_batches(data.open_split(data_config, 'train'), seed=0,
                                       batch_size=spec['batch_size'], process_index=0,
                                       process_count=1)
  for _ in range(3):
    next(batches)
  warmup_s = time.perf_counter() - start
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(batches)
  images = num_batches * spec['batch_size']
  return dict(images_per_s=round(images / (time.perf_counter() - start), 1),
              images_per_cpu_s=round(images / (time.process_time() - start_cpu), 1),
              warmup_s=round(warmup_s, 2))


def _child(case, cores, data_dir, num_batches):
  """Runs one case in a child process pinned to `cores` cores; returns its result."""
  command = [sys.executable, os.path.abspath(__file__), f'--case={case}', f'--cores={cores}',
             f'--data_dir={data_dir}', f'--batches={num_batches}']
  output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CASE.value:  # Child: pin, then import TensorFlow (its thread pools size to the cores).
    bench_util.pin_to_first_cores(_CORES.value)
    print(json.dumps(run_case(_CASE.value, _DATA_DIR.value, _BATCHES.value)))
    return
  all_cores = len(os.sched_getaffinity(0))
  results = dict(cpu=bench_util.cpu_model(), cores=all_cores, date=time.strftime('%Y-%m-%d'),
                 cases={})
  for case in CASES:
    bytes_per_image = build_dataset(case, _DATA_DIR.value)
    runs = {cores: _child(case, cores, _DATA_DIR.value, _BATCHES.value)
            for cores in sorted({1, all_cores})}
    results['cases'][case] = dict(
        bytes_per_encoded_image=round(bytes_per_image), **CASES[case],
        one_core_images_per_s=runs[1]['images_per_s'],
        all_cores_images_per_s=runs[all_cores]['images_per_s'],
        images_per_cpu_s=runs[all_cores]['images_per_cpu_s'],
        first_batches_s=runs[all_cores]['warmup_s'])
  print(json.dumps(results, indent=1))
  print(f'\n{"case":>5} {"1 core img/s":>13} {f"{all_cores} cores img/s":>14} '
        f'{"img/CPU-s":>10} {"first 3 batches s":>18}')
  for case, r in results['cases'].items():
    print(f'{case:>5} {r["one_core_images_per_s"]:>13} {r["all_cores_images_per_s"]:>14} '
          f'{r["images_per_cpu_s"]:>10} {r["first_batches_s"]:>18}')


if __name__ == '__main__':
  app.run(main)
