"""The data API of pretraining and evaluation: open a split once, then draw global batches.

`open_split(data_config, split)` reads what a split holds (examples, classes, image shape) once;
the batch functions take that `Split` and only their own arguments, and yield global arrays on
the mesh, ready for a jitted step:

  pretrain_batches    what the train step consumes at each step, and `make_views`, the part of
                      the step that turns it into two views per image;
  eval_batches        every example once, evaluation views, padded, with a mask;
  classifier_batches  labelled training batches with the light augmentation (crop + flip).

Two sources, `data_config.source`:
  tfds    tf.data on each host (simclr_jax/tfds_data.py, the only module here that imports
          TensorFlow): reading, decoding, crops and, unless augment.on_device, colour distortion
          and blur; batches reach the devices as float32 views.
  memory  the whole split as uint8 arrays on every device (simclr_jax/memory_data.py, no
          TensorFlow needed): the step draws its batch and makes every view itself, so pretraining
          moves nothing from the host after the start. For datasets that fit in device memory.

Steps and epochs (the official code's counting): training runs N * epochs // B + 1 steps with
int(round(warmup_epochs * N // B)) warmup steps, and the data position of step s is batch
s % (N // B) of epoch s // (N // B) (the incomplete last batch of an epoch is dropped), so a run
resumed at step s sees exactly the batches an uninterrupted run sees.
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from simclr_jax import augment_device
from simclr_jax import errors
from simclr_jax import memory_data
from simclr_jax import mesh as mesh_lib

SOURCES = ('tfds', 'memory')


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset, opened once: what it holds, and the handle its source reads."""
  config: ml_collections.ConfigDict  # The data settings it was opened with (`config.data`).
  split: str
  num_examples: int
  num_classes: int | None            # None: the dataset has no labels.
  image_shape: tuple                 # (H, W, C); H and W are None when images vary in size.
  reader: Any                        # tfds: the TFDS builder; memory: (images, labels or None).

  @property
  def name(self) -> str:
    return f'{self.config.dataset} {self.split}'


def stand_in_split(data_config: ml_collections.ConfigDict, num_examples: int,
                   num_classes: int | None) -> Split:
  """A Split with no data behind it, at data_config.image_size: for building a train step that
  is fed made-up batches (benchmarks, tests)."""
  size = data_config.image_size
  return Split(data_config, 'stand-in', num_examples, num_classes, (size, size, 3), None)


def prepare(data_config: ml_collections.ConfigDict) -> None:
  """Prepares data_config.dataset if needed (from local files, or a TFDS download).

  Call it on one process per file system first (distributed.process_0_first). The memory source
  prepares only TFDS's own datasets, and only where TensorFlow is installed; otherwise it reads
  plain files (memory_data.load_split).
  """
  if data_config.source == 'memory' and not memory_data.tensorflow_available():
    return
  from simclr_jax import prepare_data  # pylint: disable=g-import-not-at-top  # Imports TensorFlow.
  if data_config.source == 'memory' and not prepare_data.is_registered(data_config.dataset):
    return
  prepare_data.ensure_prepared(data_config.dataset, data_config.data_dir)


def open_split(data_config: ml_collections.ConfigDict, split: str) -> Split:
  """Opens `split` of data_config.dataset, which must be prepared; raises UserError if unusable."""
  if data_config.source not in SOURCES:
    raise errors.UserError(f'Unknown data source {data_config.source!r}; expected one of '
                           f'{SOURCES}.')
  if data_config.source == 'memory':
    images, labels = memory_data.load_split(data_config.dataset, split,
                                            data_dir=data_config.data_dir)
    # Classes of integer labels 0..C-1 (the memory source has no dataset metadata to ask).
    num_classes = None if labels is None else int(labels.max()) + 1
    return Split(data_config, split, len(images), num_classes, images.shape[1:],
                 (images, labels))
  from simclr_jax import tfds_data  # pylint: disable=g-import-not-at-top  # Imports TensorFlow.
  builder = tfds_data.load_builder(data_config.dataset, data_config.data_dir)
  return Split(data_config, split, tfds_data.num_examples(builder, split),
               tfds_data.num_classes(builder), builder.info.features['image'].shape, builder)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches in one pass over the data (the incomplete last batch is dropped)."""
  return num_examples // batch_size


def train_steps(num_examples: int, batch_size: int, num_epochs: float,
                num_train_steps: int = -1) -> int:
  """num_train_steps if > 0, else the official N * epochs // B + 1."""
  if num_train_steps > 0:
    return num_train_steps
  return int(num_examples * num_epochs // batch_size) + 1


def warmup_steps(num_examples: int, batch_size: int, warmup_epochs: float) -> int:
  """The official int(round(warmup_epochs * N // B))."""
  return int(round(warmup_epochs * num_examples // batch_size))


def eval_steps(num_examples: int, batch_size: int) -> int:
  """Batches of `eval_batches`: every example once, the last batch padded."""
  return -(-num_examples // batch_size)


def check_pretrain_split(split: Split, batch_size: int) -> None:
  """Raises UserError when `split` cannot feed pretraining at data_config.image_size."""
  height, width, _ = split.image_shape
  image_size = split.config.image_size
  if height and width and image_size > max(height, width):
    raise errors.UserError(
        f'config.data.image_size={image_size} exceeds the {height}x{width} images of '
        f'{split.config.dataset}: every view would be upsampled. Use '
        f'--config.data.image_size={max(height, width)} or less.')
  if not steps_per_epoch(split.num_examples, batch_size):
    raise errors.UserError(f'batch_size={batch_size} exceeds the {split.num_examples} examples '
                           f'of {split.name}.')


def check_labelled(split: Split, purpose: str) -> None:
  if split.num_classes is None:
    raise errors.UserError(f'{split.config.dataset} has no labels, which {purpose} needs; use a '
                           'labelled dataset or split.')


def pretrain_batches(split: Split, mesh: jax.sharding.Mesh, *, seed: int, batch_size: int,
                     start_step: int = 0) -> Iterator[dict]:
  """The inputs of steps start_step + 1, start_step + 2, ...: global arrays on `mesh`.

  tfds: {'views': float32 [B, 2, H, W, 3], 'label': int32 [B]} made on the hosts (-1 without
  labels); rows i of `views` are two views of one image. memory: the whole split, the same
  arrays at every step (the step draws its batch).
  """
  if split.config.source == 'memory':
    return itertools.repeat(_on_device(split.reader, mesh))
  from simclr_jax import tfds_data  # pylint: disable=g-import-not-at-top
  batches = tfds_data.pretrain_batches(split, seed=seed, batch_size=batch_size,
                                       start_step=start_step)
  return mesh_lib.prefetch_to_device(batches, mesh, split.config.prefetch_batches)


def make_views(split: Split, *, seed: int,
               batch_size: int) -> Callable[[Any, jax.Array, jax.Array], tuple]:
  """The view-making part of the train step: (batch, step, key) -> (views, labels).

  views are float32 [B, 2, H, W, 3], sharded over the mesh's data axis; `key` is the step's key.
  tfds: the host made the views, or (augment.on_device) only crops and flips and colour
  distortion and blur run here. memory: the step's examples are drawn and every view is made
  here (memory_data.pretrain_batch).
  """
  augment, size = split.config.augment, split.config.image_size
  if split.config.source == 'memory':
    def memory_views(arrays, step, key):
      del key  # Views are keyed by (seed, epoch, example, view), whatever the step's key.
      batch = memory_data.pretrain_batch(
          arrays['images'], arrays['labels'], step, seed=seed, batch_size=batch_size,
          steps_per_epoch=steps_per_epoch(split.num_examples, batch_size), height=size,
          width=size, color_strength=augment.color_strength,
          blur_probability=augment.blur_probability, brightness=augment.brightness,
          crop_min_area=augment.crop_min_area)
      return batch['views'], batch['label']
    return memory_views
  if host_color_augmentation(split.config):
    return lambda batch, step, key: (batch['views'], batch['label'])

  def device_augmented(batch, step, key):
    del step
    views = augment_device.augment_views(
        batch['views'], key, color_strength=augment.color_strength,
        blur_probability=augment.blur_probability, brightness=augment.brightness)
    return views, batch['label']

  return device_augmented


def host_color_augmentation(data_config: ml_collections.ConfigDict) -> bool:
  """Whether the tfds hosts apply colour distortion and blur (else the step does)."""
  return data_config.source == 'tfds' and not data_config.augment.on_device


def eval_batches(split: Split, mesh: jax.sharding.Mesh, *, batch_size: int) -> Iterator[dict]:
  """{'image': float32 [B, H, W, 3], 'label': int32 [B], 'mask': bool [B]}, global arrays.

  `eval_steps(num_examples, batch_size)` batches of evaluation views (0.875 centre crop above
  32 px, bicubic resize): every example of the split once with mask True, then padding with mask
  False.
  """
  check_labelled(split, 'evaluation')
  if split.config.source == 'memory':
    return _memory_eval_batches(split, mesh, batch_size)
  from simclr_jax import tfds_data  # pylint: disable=g-import-not-at-top
  batches = tfds_data.eval_batches(split, batch_size=batch_size)
  return mesh_lib.prefetch_to_device(batches, mesh, split.config.prefetch_batches)


def example_labels(split: Split) -> tuple[np.ndarray, np.ndarray]:
  """(example ids, labels) of every example of the split, in a fixed order."""
  check_labelled(split, 'choosing a labelled subset')
  if split.config.source == 'memory':
    return np.arange(split.num_examples), split.reader[1]
  from simclr_jax import tfds_data  # pylint: disable=g-import-not-at-top
  return tfds_data.example_labels(split)


def classifier_batches(split: Split, mesh: jax.sharding.Mesh, *, seed: int, batch_size: int,
                       example_ids=None) -> Iterator[dict]:
  """Endless {'image', 'label'} training batches (crop + flip), reshuffled every epoch.

  `example_ids` (from `example_labels`), if given, restricts training to those examples; every
  epoch has steps_per_epoch(number of examples, batch_size) full batches.
  """
  check_labelled(split, 'training a classifier')
  if split.config.source == 'memory':
    return _memory_classifier_batches(split, mesh, seed=seed, batch_size=batch_size,
                                      example_ids=example_ids)
  from simclr_jax import tfds_data  # pylint: disable=g-import-not-at-top
  batches = tfds_data.classifier_batches(split, seed=seed, batch_size=batch_size,
                                         example_ids=example_ids)
  return mesh_lib.prefetch_to_device(batches, mesh, split.config.prefetch_batches)


def _on_device(arrays, mesh: jax.sharding.Mesh) -> dict:
  """{'images', 'labels'} of host arrays, replicated on every device of `mesh`."""
  images, labels = arrays
  replicated = mesh_lib.replicated(mesh)
  put = lambda x: jax.make_array_from_process_local_data(replicated, x)
  return {'images': put(images), 'labels': None if labels is None else put(labels)}


def _memory_eval_batches(split: Split, mesh, batch_size: int) -> Iterator[dict]:
  """Evaluation views made on device; each process gives its contiguous part of every batch."""
  num_processes, process = jax.process_count(), jax.process_index()
  local_batch = batch_size // num_processes
  arrays = _on_device(split.reader, mesh)
  views = jax.jit(functools.partial(memory_data.eval_images, height=split.config.image_size,
                                    width=split.config.image_size),
                  out_shardings=mesh_lib.batch_sharded(mesh))
  for step in range(eval_steps(split.num_examples, batch_size)):
    rows = step * batch_size + process * local_batch + np.arange(local_batch)
    mask = rows < split.num_examples
    rows = np.where(mask, rows, 0)
    local = {'indices': rows.astype(np.int32), 'label': split.reader[1][rows].astype(np.int32),
             'mask': mask}
    batch = mesh_lib.to_global(local, mesh)
    yield {'image': views(arrays['images'], batch['indices']), 'label': batch['label'],
           'mask': batch['mask']}


def _memory_classifier_batches(split: Split, mesh, *, seed: int, batch_size: int,
                               example_ids=None) -> Iterator[dict]:
  images, labels = split.reader
  if example_ids is not None:
    images, labels = images[example_ids], labels[example_ids]
  arrays = _on_device((images, labels), mesh)
  batch_fn = jax.jit(functools.partial(
      memory_data.classifier_batch, seed=seed, batch_size=batch_size,
      steps_per_epoch=steps_per_epoch(len(images), batch_size), height=split.config.image_size,
      width=split.config.image_size), out_shardings=mesh_lib.batch_sharded(mesh))
  for step in itertools.count():
    yield batch_fn(arrays['images'], arrays['labels'], step)
