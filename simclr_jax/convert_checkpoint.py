r"""Converts a released TF1 SimCLR checkpoint (v1 or v2) into this project's model.

    python -m simclr_jax.convert_checkpoint --checkpoint=PATH/model.ckpt-N --workdir=DIR \
        [--ema] [--ft_proj_selector=0|1]

writes DIR as a pretraining workdir that run_eval.py evaluates (docs/converting.md). The depth,
width and selective kernels are read off the variables; every variable is mapped in the order the
official code created it (tf.layers numbers conv2d_N and batch_normalization_N in that order, and
the Flax model calls its layers in the same order), every shape is checked, and every variable
left out (optimizer slots, global_step, the EMA copy unless --ema, MoCo memory) is reported by
name. A variable of any other kind is an error.

What `head_supervised` reads cannot be told from the variables (h and the first projection
layer's output have the same size). For the SimCLR v2 release folders it is known: the linear-eval
head of `pretrained/` and the classifier of `finetuned_100pct/` read h, those of `finetuned_1pct/`
and `finetuned_10pct/` read the first projection layer (the README's fine-tuning command sets
ft_proj_selector=1; v2 paper and google-research/simclr#109). Elsewhere, a checkpoint holding both
heads needs --ft_proj_selector (0: h, k: the k-th projection layer, as the official flag).
"""

import dataclasses
import os
import re
import sys

from absl import app, flags, logging
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from configs import default
from simclr_jax import checkpointing
from simclr_jax import models
from simclr_jax.errors import UserError

# TF1 variable scopes and the SimCLRModel parts they become.
_SCOPES = {'base_model': 'encoder', 'head_contrastive': 'head', 'head_supervised': 'probe'}
_EMA = 'ema_model/'
# Checkpoint variables that are not model weights; the official load_and_inference colab leaves
# out the same ones ('global_step', 'Momentum', 'ema', 'memory') when it counts parameters.
_NOT_MODEL = (('training step', re.compile(r'global_step')),
              ('optimizer slots', re.compile(r'/Momentum$')),
              ('MoCo memory', re.compile(r'memory')))
# ft_proj_selector of the classifiers in gs://simclr-checkpoints/simclrv2/<folder>/.
RELEASE_FT_PROJ_SELECTOR = {'pretrained': 0, 'finetuned_100pct': 0,
                            'finetuned_1pct': 1, 'finetuned_10pct': 1}
# TF variable -> (Flax collection, leaf) for layers with a kernel and for BatchNorm layers.
_KERNEL_LEAVES = {'kernel': ('params', 'kernel'), 'bias': ('params', 'bias')}
_NORM_LEAVES = {'gamma': ('params', 'scale'), 'beta': ('params', 'bias'),
                'moving_mean': ('batch_stats', 'mean'), 'moving_variance': ('batch_stats', 'var')}


@dataclasses.dataclass(frozen=True)
class Converted:
  """A released checkpoint as this project's model."""
  model_config: dict       # configs/default.py's `model` group, for models.create_model.
  variables: dict          # {'params', 'batch_stats'} of the SimCLRModel, float32 NumPy arrays.
  num_classes: int         # Outputs of the 'probe' (head_supervised); 0 without one.
  image_size: int          # 224; 32 for a CIFAR-stem model.
  step: int                # The checkpoint's global_step (0 without one).
  unmapped: dict           # Why left out -> names of the checkpoint variables not converted.
  report: str              # What was converted and, by name, everything left out.


@dataclasses.dataclass(frozen=True)
class Plan:
  """What converting a checkpoint does, decided from its variable names and shapes alone."""
  model_config: dict
  num_classes: int
  image_size: int
  mapping: dict            # TF variable name -> (collection, Flax path).
  unmapped: dict
  notes: tuple


def _layer_key(layer: str) -> tuple:
  """Creation order of tf.layers names in one scope: the counters tf.layers appended to each
  name component (conv2d -> 0, conv2d_7 -> 7; nl_2/batch_normalization -> (2, 0))."""
  return tuple(int(m.group(1)) if (m := re.search(r'_(\d+)$', part)) else 0
               for part in layer.split('/'))


def _tf_layers(names, scope: str) -> tuple[list[str], list[str]]:
  """The layers of `scope` with a kernel (conv2d, dense) and the BatchNorm layers, each in
  creation order, as variable-name prefixes."""
  layers = sorted({name.rsplit('/', 1)[0] for name in names if name.startswith(scope + '/')},
                  key=_layer_key)
  norms = [layer for layer in layers if layer.rsplit('/', 1)[-1].startswith('batch_normalization')]
  return [layer for layer in layers if layer not in norms], norms


def _flax_layers(model: models.SimCLRModel, image_size: int):
  """Abstract variables of `model` and the paths of its Conv/Dense and BatchNorm layers, each in
  the order the forward pass calls them."""
  kernels, norms = [], []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      if isinstance(context.module, (nn.Conv, nn.Dense)):
        kernels.append(context.module.path)
      elif isinstance(context.module, nn.BatchNorm):
        norms.append(context.module.path)
    return next_fun(*args, **kwargs)

  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  return variables, kernels, norms


def _encoder_config(shapes: dict) -> dict:
  """depth, width_multiplier, cifar_stem and sk_ratio of `base_model/`, assuming the official
  layout (stem, then a projection shortcut first in every stage); the full shape check that
  follows catches anything else."""
  convs, norms = _tf_layers(shapes, 'base_model')
  if not convs or not norms:
    raise UserError('The checkpoint has no base_model/ variables, so it is not a SimCLR TF1 '
                    'checkpoint.')
  missing = [layer for layer in convs if f'{layer}/kernel' not in shapes]
  missing += [layer for layer in norms if f'{layer}/gamma' not in shapes]
  if missing:
    raise UserError(f'The checkpoint has incomplete layers: {", ".join(missing)}.')
  kernels = [shapes[f'{layer}/kernel'] for layer in convs]
  bottleneck = kernels[-1][:2] == [1, 1]
  selective_kernels = len(convs) > len(norms)  # The SK mixing conv has no BatchNorm.
  deep_stem = len(kernels) > 1 and kernels[0][:2] == kernels[1][:2] == [3, 3]
  stem_convs = 3 if deep_stem else 1
  convs_per_block = (5 if selective_kernels else 3) if bottleneck else 2
  blocks, rest = divmod(len(convs) - stem_convs - 4, convs_per_block)
  depths = [depth for depth, sizes in models.STAGE_SIZES.items()
            if sum(sizes) == blocks and (models.feature_dim(depth) == 2048) == bottleneck]
  if rest or len(depths) != 1 or (selective_kernels and not bottleneck):
    raise UserError(f'base_model/ has {len(convs)} convolutions and {len(norms)} BatchNorm '
                    'layers, which is no ResNet of the official SimCLR code.')
  width = shapes[f'{norms[-1]}/gamma'][0] / models.feature_dim(depths[0])
  return {'depth': depths[0], 'width_multiplier': int(width) if width == int(width) else width,
          'cifar_stem': kernels[0][:2] == [3, 3] and not deep_stem,
          'sk_ratio': 0.0625 if selective_kernels else 0.0}


def _head_config(shapes: dict) -> dict:
  """proj_mode, proj_num_layers and proj_dim of `head_contrastive/` ('none' without one)."""
  kernels, _ = _tf_layers(shapes, 'head_contrastive')
  if not kernels:
    return {'proj_mode': 'none', 'proj_num_layers': 0, 'proj_dim': 0}
  mode = 'linear' if kernels == ['head_contrastive/l_0/dense'] else 'nonlinear'
  return {'proj_mode': mode, 'proj_num_layers': len(kernels),
          'proj_dim': shapes[f'{kernels[-1]}/kernel'][-1]}


def release_ft_proj_selector(checkpoint_path: str) -> int | None:
  """ft_proj_selector of a checkpoint in a SimCLR v2 release folder (None elsewhere)."""
  for part in reversed(os.path.normpath(checkpoint_path).split(os.sep)):
    if part in RELEASE_FT_PROJ_SELECTOR:
      return RELEASE_FT_PROJ_SELECTOR[part]
  return None


def _not_model(name: str) -> str | None:
  return next((why for why, pattern in _NOT_MODEL if pattern.search(name)), None)


def _source_names(shapes: dict, ema: bool) -> tuple[dict, dict, list[str]]:
  """{model variable: checkpoint variable to read}, the unconverted variables by reason, notes."""
  model_names = sorted(n for n in shapes if n.split('/', 1)[0] in _SCOPES and not _not_model(n))
  sources = {name: _EMA + name if ema and _EMA + name in shapes else name for name in model_names}
  notes = []
  if ema:
    if not any(name.startswith(_EMA) for name in shapes):
      raise UserError('--ema: the checkpoint has no ema_model/ variables.')
    kept = [name for name in model_names if sources[name] == name]
    if kept:
      notes.append(f'--ema: no EMA copy of {len(kept)} variables, converted as trained: '
                   f'{", ".join(kept)}.')
  unmapped, unexpected = {}, []
  for name in sorted(set(shapes) - set(sources.values())):
    if name in sources:
      reason = 'trained weights, replaced by their EMA (--ema)'
    elif name.startswith(_EMA) and not ema:
      reason = 'EMA weights (pass --ema to convert them instead)'
    else:
      reason = _not_model(name)
    if reason:
      unmapped.setdefault(reason, []).append(name)
    else:
      unexpected.append(name)
  if unexpected:
    raise UserError(f'The checkpoint has {len(unexpected)} variables that are neither SimCLR '
                    f'model weights nor known extras: {", ".join(unexpected[:10])}'
                    f'{", ..." if len(unexpected) > 10 else ""}.')
  return sources, unmapped, notes


def plan_conversion(shapes: dict, *, ema: bool = False, ft_proj_selector: int | None = None,
                    checkpoint_path: str = '') -> Plan:
  """Decides the whole conversion from {checkpoint variable name: shape}; UserError for a
  checkpoint it cannot convert exactly."""
  shapes = {name: list(shape) for name, shape in shapes.items()}
  sources, unmapped, notes = _source_names(shapes, ema)
  model_shapes = {name: shapes[source] for name, source in sources.items()}
  config = {**_encoder_config(model_shapes), 'zero_init_last_bn': True,
            **_head_config(model_shapes), 'dtype': 'float32', 'layout': 'simclr'}
  if config['proj_mode'] == 'none':
    config['proj_dim'] = models.feature_dim(config['depth'], config['width_multiplier'])
    notes.append('No head_contrastive/ (SimCLR v1 checkpoints were released without it): '
                 "converted with proj_mode='none', so z = h.")

  probe = 'head_supervised/linear_layer/dense'
  num_classes = model_shapes[f'{probe}/kernel'][-1] if f'{probe}/kernel' in model_shapes else 0
  if ft_proj_selector is None:
    ft_proj_selector = 0
    if num_classes and config['proj_mode'] != 'none':
      ft_proj_selector = release_ft_proj_selector(checkpoint_path)
      if ft_proj_selector is None:
        raise UserError(
            f'{checkpoint_path or "The checkpoint"} holds head_supervised/ and head_contrastive/ '
            'but is not in a SimCLR v2 release folder (pretrained, finetuned_{1,10,100}pct), so '
            'what the classifier reads is unknown: pass --ft_proj_selector=0 (h) or 1 (the first '
            'projection layer, SimCLR v2 fine-tuning on 1%/10% of the labels).')
      reads = 'h' if ft_proj_selector == 0 else 'the first projection layer'
      notes.append(f'head_supervised reads {reads} (ft_proj_selector={ft_proj_selector}, as in '
                   'its release folder).')
  config['probe_proj_layers'] = ft_proj_selector
  image_size = 32 if config['cifar_stem'] else 224

  model = models.create_model(ml_collections.ConfigDict(config), num_classes=num_classes)
  variables, flax_kernels, flax_norms = _flax_layers(model, image_size)
  layers = {}
  for name in model_shapes:
    layer, leaf = name.rsplit('/', 1)
    layers.setdefault(layer, []).append(leaf)
  mapping = {}
  for scope, part in _SCOPES.items():
    tf_kernels, tf_norms = _tf_layers(model_shapes, scope)
    for tf_layers, paths, leaves in ((tf_kernels, flax_kernels, _KERNEL_LEAVES),
                                     (tf_norms, flax_norms, _NORM_LEAVES)):
      paths = [path for path in paths if path[0] == part]
      if len(tf_layers) != len(paths):
        raise UserError(f'{scope}/ has {len(tf_layers)} layers of a kind of which the model '
                        f'{config} has {len(paths)}.')
      for layer, path in zip(tf_layers, paths):
        for leaf in layers[layer]:
          if leaf not in leaves:
            raise UserError(f'Unknown variable {layer}/{leaf}.')
          collection, flax_leaf = leaves[leaf]
          mapping[sources[f'{layer}/{leaf}']] = (collection, path + (flax_leaf,))

  expected = {(collection, path): x.shape for collection in variables
              for path, x in traverse_util.flatten_dict(variables[collection]).items()}
  for name, key in mapping.items():
    if key not in expected:
      raise UserError(f'{name} has no counterpart {"/".join(key[1])} in the model {config}.')
    if tuple(shapes[name]) != expected[key]:
      raise UserError(f'{name} has shape {tuple(shapes[name])}, but {"/".join(key[1])} of the '
                      f'model {config} has {expected[key]}.')
  missing = sorted('/'.join(path) for _, path in set(expected) - set(mapping.values()))
  if missing:
    raise UserError(f'The checkpoint does not fill the model {config}: no {", ".join(missing)}.')
  return Plan(config, num_classes, image_size, mapping, unmapped, tuple(notes))


def _report(checkpoint_path: str, plan: Plan, num_mapped: int, ema: bool) -> str:
  c = plan.model_config
  lines = [f'{checkpoint_path}: ResNet-{c["depth"]} {c["width_multiplier"]}x'
           f'{" SK" if c["sk_ratio"] else ""}{" (CIFAR stem)" if c["cifar_stem"] else ""}, '
           f'projection head {c["proj_mode"]}'
           f'{" with %d layers" % c["proj_num_layers"] if c["proj_mode"] != "none" else ""}, '
           f'{plan.num_classes or "no"} classes; {num_mapped} variables converted'
           f'{" (EMA weights)" if ema else ""}.', *plan.notes]
  for reason, names in sorted(plan.unmapped.items()):
    lines.append(f'Left out, {reason} ({len(names)}): {", ".join(names)}.')
  return '\n'.join(lines)


def convert(checkpoint_path: str, *, ema: bool = False,
            ft_proj_selector: int | None = None) -> Converted:
  """Reads a TF1 SimCLR checkpoint (`.../model.ckpt-N`) into this project's model (see module
  docstring); `ema` converts the EMA weights of SimCLR v2 pretrained checkpoints instead."""
  try:
    reader = tf.train.load_checkpoint(checkpoint_path)
  except (ValueError, tf.errors.OpError) as e:
    raise UserError(f'Cannot read a TF checkpoint at {checkpoint_path} (give the prefix, e.g. '
                    f'.../model.ckpt-250228): {str(e).splitlines()[0]}') from e
  plan = plan_conversion(reader.get_variable_to_shape_map(), ema=ema,
                         ft_proj_selector=ft_proj_selector, checkpoint_path=checkpoint_path)
  flat = {(collection, *path): np.asarray(reader.get_tensor(name), np.float32)
          for name, (collection, path) in plan.mapping.items()}
  variables = traverse_util.unflatten_dict(flat)
  has_step = reader.has_tensor('global_step')
  return Converted(
      model_config=plan.model_config, variables=variables, num_classes=plan.num_classes,
      image_size=plan.image_size, step=int(reader.get_tensor('global_step')) if has_step else 0,
      unmapped=plan.unmapped, report=_report(checkpoint_path, plan, len(plan.mapping), ema))


def write_workdir(converted: Converted, workdir: str) -> None:
  """Writes `workdir` as a pretraining run would (config.json and an Orbax checkpoint at the
  checkpoint's step) so that run_eval.py evaluates the converted model."""
  checkpointing.check_new_workdir(workdir, '--workdir')
  config = default.get_config()
  config.model = ml_collections.ConfigDict(converted.model_config)
  imagenet = converted.image_size == 224
  config.data.update(dataset='imagenet2012' if imagenet else 'cifar10',
                     image_size=converted.image_size, train_split='train',
                     eval_split='validation' if imagenet else 'test')
  checkpointing.save_network(workdir, config, converted.num_classes, converted.variables,
                             converted.step)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines would bury the report.
  workdir = _WORKDIR.value
  try:
    converted = convert(_CHECKPOINT.value, ema=_EMA_FLAG.value,
                        ft_proj_selector=_FT_PROJ_SELECTOR.value)
    write_workdir(converted, workdir)
  except UserError as e:
    print(f'convert_checkpoint: error: {e}', file=sys.stderr)
    sys.exit(2)
  with open(os.path.join(workdir, 'conversion_report.txt'), 'w') as f:
    f.write(converted.report + '\n')
  print(converted.report)
  print(f'Wrote {workdir}: evaluate it with python run_eval.py --workdir={workdir}')


if __name__ == '__main__':
  _CHECKPOINT = flags.DEFINE_string(
      'checkpoint', None, 'TF1 checkpoint prefix, e.g. .../model.ckpt-250228.', required=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Empty directory to write the converted run to.',
                                 required=True)
  _EMA_FLAG = flags.DEFINE_boolean('ema', False, 'Convert the EMA weights (ema_model/) of SimCLR '
                                   'v2 pretrained checkpoints instead of the trained ones.')
  _FT_PROJ_SELECTOR = flags.DEFINE_integer(
      'ft_proj_selector', None, 'What head_supervised reads: 0 = h, k = the k-th projection '
      'layer. Default: known for the SimCLR v2 release folders (docs/converting.md).')
  app.run(main)
