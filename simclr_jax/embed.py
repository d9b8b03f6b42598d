r"""Features of your own images from a run's checkpoint: h, z and, where it has one, the
classifier's logits.

    python -m simclr_jax.embed --workdir=W --input=X --out=F.npz [--step=N] [--batch_size=B]

X is a .npy of float images in [0, 1], [N, H, W, 3] (or grayscale [N, H, W, 1] / [N, H, W]), or a
folder of image files (read in sorted order, decoded as RGB). Every image gets the evaluation view
of run_eval.py (`augment_device.eval_view`: a 0.875 centre crop above 32 px, bicubic resize to the
checkpoint's image size); --noresize feeds the .npy images as they are. F.npz holds `h` [N, F],
`z` [N, D], `logits` [N, C] where the model has a classifier (a fine-tuned or converted supervised
head, or a pretraining run's online probe), and `files` for a folder. One process.
"""

import functools
import os

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging

from simclr_jax import augment_device
from simclr_jax import checkpointing
from simclr_jax import cli
from simclr_jax import console
from simclr_jax import eval_setup
from simclr_jax import mesh as mesh_lib
from simclr_jax.errors import UserError

# As simclr_jax.prepare_data.IMAGE_EXTENSIONS (not imported: it imports TensorFlow Datasets).
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def read_npy(path: str) -> np.ndarray:
  """Float images in [0, 1] from a .npy as float32 [N, H, W, 1 or 3]; UserError otherwise."""
  try:
    images = np.load(path, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f'Cannot read {path} as a .npy array: {str(e).splitlines()[0]}') from e
  if images.ndim == 3:
    images = images[..., None]
  if (not np.issubdtype(images.dtype, np.floating) or images.ndim != 4
      or images.shape[-1] not in (1, 3) or not images.shape[0]):
    raise UserError(f'{path} holds {images.dtype} {list(images.shape)}; expected float images '
                    'in [0, 1] of shape [N, H, W, 3], [N, H, W, 1] or [N, H, W].')
  images = np.asarray(images, np.float32)
  if images.min() < 0 or images.max() > 1:
    raise UserError(f'{path} has values in [{images.min():g}, {images.max():g}]; scale the '
                    'images to [0, 1] (e.g. uint8 / 255).')
  return images


def read_folder(folder: str) -> tuple[list[np.ndarray], list[str]]:
  """The image files of `folder` (not its subfolders), sorted, as uint8 RGB arrays."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  # Only folders need PIL.
  files = sorted(name for name in os.listdir(folder)
                 if name.lower().endswith(IMAGE_EXTENSIONS)
                 and os.path.isfile(os.path.join(folder, name)))
  if not files:
    raise UserError(f'No image files ({" ".join(IMAGE_EXTENSIONS)}) in {folder}.')
  images = []
  for name in files:
    try:
      with Image.open(os.path.join(folder, name)) as image:
        images.append(np.asarray(image.convert('RGB')))
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many types for bad files.
      raise UserError(f'Cannot decode {os.path.join(folder, name)}: '
                      f'{str(e).splitlines()[0]}') from e
  return images, files


@functools.partial(jax.jit, static_argnames=('size',))
def _uint8_eval_view(image, size):
  return augment_device.eval_view(image, height=size, width=size)


@functools.partial(jax.jit, static_argnames=('size',))
def _float_eval_views(images, size):
  # eval_view reads pixel values 0..255 (it divides by 255), as the datasets store them.
  view = functools.partial(augment_device.eval_view, height=size, width=size)
  return jax.vmap(view)(images * 255.0)


def read_input(path: str, image_size: int, resize: bool = True) -> tuple[np.ndarray, list]:
  """(float32 [N, S, S, 3] model inputs in [0, 1], file names or []) of a .npy or a folder."""
  if os.path.isdir(path):
    images, files = read_folder(path)
    # One compilation per distinct image shape.
    return np.stack([np.asarray(_uint8_eval_view(image, image_size)) for image in images]), files
  if not os.path.isfile(path) or not path.endswith('.npy'):
    raise UserError(f'--input={path} is neither a .npy file nor a folder of images.')
  images = read_npy(path)
  if not resize:
    return np.broadcast_to(images, images.shape[:3] + (3,)), []
  views = [np.asarray(_float_eval_views(images[i:i + 256], image_size))
           for i in range(0, len(images), 256)]
  return np.concatenate(views), []


@functools.partial(jax.jit, static_argnames=('model',))
def _outputs(variables, images, model):
  return {name: mesh_lib.shard_along_data(value)
          for name, value in model.apply(variables, images, train=False).items()}


def embed(encoder: eval_setup.Encoder, images: np.ndarray, mesh: jax.sharding.Mesh,
          batch_size: int) -> dict:
  """{'h', 'z'[, 'logits']} of float32 model inputs [N, S, S, 3], in inference mode, in batches
  of `batch_size` sharded over the mesh (the last one padded, so there is one compilation)."""
  mesh_lib.check_global_batch_size(batch_size, mesh)
  devices = mesh.devices.size
  batch_size = min(batch_size, -(-len(images) // devices) * devices)  # No more padding than needed.
  sharding = mesh_lib.batch_sharded(mesh)
  parts = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:],
                                             batch.dtype)])
    outputs = _outputs(encoder.variables, jax.device_put(padded, sharding), encoder.model)
    parts.append({k: np.asarray(v)[:len(batch)] for k, v in outputs.items()})
  result = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
  if 'probe_logits' in result:
    result['logits'] = result.pop('probe_logits')
  return result


def run(workdir: str, input_path: str, out: str, *, step: int | None = None,
        batch_size: int = 256, resize: bool = True) -> dict:
  """Embeds the images of `input_path` with the checkpoint of `workdir` and writes `out`."""
  if not out.endswith('.npz'):
    raise UserError(f'--out={out} must end in .npz.')
  mesh = mesh_lib.create_mesh()
  mesh_lib.check_global_batch_size(batch_size, mesh)
  saved = checkpointing.open_saved_run(workdir, step)
  images, files = read_input(input_path, saved.meta['image_size'], resize)
  with jax.set_mesh(mesh):
    encoder = eval_setup.restore_encoder(saved, mesh)
    result = embed(encoder, images, mesh, batch_size)
  saved.checkpointer.close()
  if files:
    result['files'] = np.asarray(files)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **result)
  logging.info('%d images of %s, step %d of %s -> %s (%s)', len(images), input_path,
               saved.step, workdir, out,
               ', '.join(f'{k} {list(v.shape)}' for k, v in result.items()))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_third_party_logs(verbose=False)
  cli.run_main('embed', lambda: run(
      _WORKDIR.value, _INPUT.value, _OUT.value, step=_STEP.value,
      batch_size=_BATCH_SIZE.value, resize=_RESIZE.value))


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a run (pretrained, fine-tuned, '
                                 'distilled or converted).', required=True)
  _INPUT = flags.DEFINE_string('input', None, '.npy of float images in [0, 1], or a folder of '
                               'image files.', required=True)
  _OUT = flags.DEFINE_string('out', None, 'The .npz to write.', required=True)
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Images per batch (global).')
  _RESIZE = flags.DEFINE_bool('resize', True, 'Give .npy images the evaluation view (centre '
                              'crop above 32 px, resize); --noresize feeds them as they are.')
  app.run(main, flags_parser=cli.parse_flags('embed'))
