r"""Writes a run's encoder (and with --head its projection head and classifier) as one flat file
of named arrays, for use outside this project.

    python -m simclr_jax.export --workdir=W --out=FILE.safetensors|FILE.npz [--step=N] [--head] \
        [--names=flax|torchvision]

Names (`--names=flax`, the default) are the Flax module paths joined by '/', the BatchNorm
statistics beside their parameters:
  encoder/conv_init/kernel                  conv kernels [kh, kw, in, out]
  encoder/bn_init/{scale,bias,mean,var}     BatchNorm (epsilon 1e-5)
  encoder/stage<i>_block<j>/{conv1,bn1,conv2,bn2,conv3,bn3,proj_conv,proj_bn}/...   i, j from 1
  encoder/stage<i>_block<j>/sk_conv/{conv,bn,reduce_conv,reduce_bn,mix_conv}/...   (SK-ResNets)
  head/dense<k>/kernel [in, out], head/bn<k>/..., head/dense_out, head/bn_out      (--head)
  probe/{kernel [in, classes], bias}        the classifier (--head, where the model has one)
`--names=torchvision` writes a state_dict that torchvision.models.resnet<depth> loads (ResNet-50
and deeper, or ResNet-18/34 with model.layout='torchvision'; no SK, no CIFAR stem): conv weights
[out, in, kh, kw], BatchNorm weight/bias/running_mean/running_var/num_batches_tracked, and with
--head the classifier as fc.weight [classes, in] / fc.bias (only a classifier that reads h).
torchvision builds width 1x; other widths need the channel counts changed. Its stem max-pool pads
one pixel on every side where the official code (and this project) pads TF-'SAME' (one after,
for even sizes): for identical features replace `model.maxpool` by
`nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2))` (after a ReLU, zero padding is
the same as -inf padding).

The file's metadata (safetensors `__metadata__`; `__metadata__` in the .npz, a JSON string)
holds the model config, image size, class count, step and the naming. Safetensors files are
written by the `safetensors` package where it is installed and by `write_safetensors` otherwise.
Models take float images in [0, 1], [N, H, W, 3] (NCHW for torchvision); no normalisation.
"""

import json
import os

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import traverse_util

from simclr_jax import checkpointing
from simclr_jax import cli
from simclr_jax import console
from simclr_jax import eval_setup
from simclr_jax import mesh as mesh_lib
from simclr_jax.errors import UserError

NAMES = ('flax', 'torchvision')
FORMATS = ('.safetensors', '.npz')
_SAFETENSORS_DTYPES = {np.dtype(np.float32): 'F32', np.dtype(np.int64): 'I64'}
_TORCH_NORM = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def flat_variables(variables: dict, head: bool = False) -> dict[str, np.ndarray]:
  """{'encoder/.../kernel': array} of {'params', 'batch_stats'}: the encoder, and with `head`
  the projection head and the classifier ('probe')."""
  parts = ('encoder', 'head', 'probe') if head else ('encoder',)
  flat = {}
  for collection in ('params', 'batch_stats'):
    for path, value in traverse_util.flatten_dict(variables[collection]).items():
      if path[0] in parts:
        flat['/'.join(path)] = np.asarray(value, np.float32)
  return dict(sorted(flat.items()))


def check_torchvision(model_config: dict) -> None:
  """UserError unless torchvision's ResNet has the same layers as `model_config`'s encoder."""
  reasons = []
  if model_config.get('sk_ratio', 0) > 0:
    reasons.append('it has selective kernels (sk_ratio > 0)')
  if model_config['cifar_stem']:
    reasons.append('it has the CIFAR stem')
  if model_config['depth'] < 50 and model_config.get('layout', 'simclr') != 'torchvision':
    reasons.append(f'ResNet-{model_config["depth"]} of layout simclr projects the shortcut of '
                   'its first block, which torchvision does not (train with '
                   "model.layout='torchvision')")
  if reasons:
    raise UserError(f'--names=torchvision: torchvision cannot load this encoder: '
                    f'{"; ".join(reasons)}. Export with --names=flax.')


def torchvision_names(flat: dict[str, np.ndarray], probe_reads_h: bool) -> dict[str, np.ndarray]:
  """The torchvision ResNet state_dict of the `flat_variables` of an encoder (and classifier)."""
  state = {}
  for name, value in flat.items():
    parts = name.split('/')
    if parts[0] == 'head':
      continue  # torchvision's ResNet has no projection head.
    if parts[0] == 'probe':
      if not probe_reads_h:
        raise UserError('--names=torchvision --head: the classifier reads a projection layer, '
                        "not h, so it is no torchvision fc; export with --names=flax.")
      state['fc.bias' if parts[1] == 'bias' else 'fc.weight'] = (
          value if parts[1] == 'bias' else value.T)
      continue
    *modules, layer, leaf = parts[1:]
    prefix = 'conv1' if layer == 'conv_init' else 'bn1' if layer == 'bn_init' else None
    if modules:
      stage, block = modules[0].removeprefix('stage').split('_block')
      layer = {'proj_conv': 'downsample.0', 'proj_bn': 'downsample.1'}.get(layer, layer)
      prefix = f'layer{stage}.{int(block) - 1}.{layer}'
    if leaf == 'kernel':
      state[f'{prefix}.weight'] = value.transpose(3, 2, 0, 1)
    else:
      state[f'{prefix}.{_TORCH_NORM[leaf]}'] = value
      state.setdefault(f'{prefix}.num_batches_tracked', np.zeros((), np.int64))
  return dict(sorted(state.items()))


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]):
  """The safetensors format: an 8-byte little-endian header length, a JSON header of
  {name: {dtype, shape, data_offsets}} and `__metadata__`, then the raw little-endian buffers."""
  header, offset = {'__metadata__': metadata}, 0
  buffers = []
  for name, value in tensors.items():
    data = np.ascontiguousarray(value, value.dtype.newbyteorder('<')).tobytes()
    header[name] = {'dtype': _SAFETENSORS_DTYPES[value.dtype], 'shape': list(value.shape),
                    'data_offsets': [offset, offset + len(data)]}
    buffers.append(data)
    offset += len(data)
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # Buffers start 8-byte aligned.
  with open(path, 'wb') as f:
    f.write(len(encoded).to_bytes(8, 'little'))
    f.write(encoded)
    for data in buffers:
      f.write(data)


def save(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """`tensors` as .safetensors (the package's writer if installed) or .npz."""
  if path.endswith('.npz'):
    np.savez(path, **tensors, __metadata__=np.asarray(json.dumps(metadata)))
    return
  try:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    write_safetensors(path, tensors, metadata)
  else:
    safetensors_numpy.save_file(tensors, path, metadata=metadata)


def run(workdir: str, out: str, *, step: int | None = None, head: bool = False,
        names: str = 'flax') -> dict[str, np.ndarray]:
  """Exports the checkpoint of `step` (default: the latest) of `workdir` to `out`."""
  if not out.endswith(FORMATS):
    raise UserError(f'--out={out} must end in {" or ".join(FORMATS)}.')
  if names not in NAMES:
    raise UserError(f'Unknown --names={names}; expected one of {NAMES}.')
  saved = checkpointing.open_saved_run(workdir, step)
  model_config = saved.meta['model']
  if names == 'torchvision':
    check_torchvision(model_config)
  mesh = mesh_lib.create_mesh(jax.devices()[:1])
  variables = jax.device_get(eval_setup.restore_encoder(saved, mesh).variables)
  saved.checkpointer.close()
  tensors = flat_variables(variables, head)
  if names == 'torchvision':
    tensors = torchvision_names(tensors, model_config.get('probe_proj_layers', 0) == 0)
  metadata = {'format': f'simclr_jax {names} names', 'model': json.dumps(model_config),
              'image_size': str(saved.meta['image_size']),
              'num_classes': str(saved.meta['num_classes'] if head else 0),
              'step': str(saved.step), 'input': 'float images in [0, 1], no normalisation'}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  save(out, tensors, metadata)
  logging.info('%d arrays (%d numbers) of step %d of %s -> %s', len(tensors),
               sum(v.size for v in tensors.values()), saved.step, workdir, out)
  return tensors


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_third_party_logs(verbose=False)
  cli.run_main('export', lambda: run(_WORKDIR.value, _OUT.value, step=_STEP.value,
                                     head=_HEAD.value, names=_NAMES.value))


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a run (pretrained, fine-tuned, '
                                 'distilled or converted).', required=True)
  _OUT = flags.DEFINE_string('out', None, 'FILE.safetensors or FILE.npz to write.', required=True)
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  _HEAD = flags.DEFINE_bool('head', False, 'Also the projection head and the classifier.')
  _NAMES = flags.DEFINE_enum('names', 'flax', NAMES, 'flax: module paths; torchvision: a '
                             'state_dict torchvision.models.resnet* loads.')
  app.run(main, flags_parser=cli.parse_flags('export'))
