"""convert_checkpoint: the variables of every released architecture (recorded from the official
code in tests/fixtures) map onto the Flax model, with everything else reported; and a converted
TF1 checkpoint computes h, z and the classifier's logits of an independent TF reference of the
official forward pass."""

import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from simclr_jax import convert_checkpoint
from simclr_jax import checkpointing
from simclr_jax import eval_setup
from simclr_jax import mesh as mesh_lib
from simclr_jax import models
from simclr_jax.errors import UserError
from tests.fixtures import official_tf1

pytestmark = pytest.mark.usefixtures('fast_compiles')

MEMORY = {'memory': [65536, 128], 'memory_ptr': []}  # A MoCo queue (names are a guess).


def _released_checkpoint_shapes(name):
  """The variables of a released checkpoint: the model (fixture), a Momentum slot per trainable
  variable, global_step and, for SimCLR v2, an EMA copy of base_model/head_contrastive and MoCo
  memory."""
  model = dict(official_tf1.architectures()[name]['variables'])
  trainable = [n for n in model if not n.endswith(('moving_mean', 'moving_variance'))]
  shapes = {**model, **{f'{n}/Momentum': model[n] for n in trainable}, 'global_step': []}
  if name.startswith('simclrv2'):
    shapes.update({f'ema_model/{n}': s for n, s in model.items()
                   if not n.startswith('head_supervised')})
    shapes.update(MEMORY)
  return model, shapes


# One of each kind (test_models checks the parameter counts of all of them): v1, v2 without and
# with selective kernels, and the largest.
@pytest.mark.parametrize('name', ['simclrv1/ResNet50_4x', 'simclrv2/r50_1x_sk0',
                                  'simclrv2/r101_2x_sk1', 'simclrv2/r152_3x_sk1'])
def test_released_checkpoints_map_onto_the_model(name):
  facts = official_tf1.architectures()[name]
  model, shapes = _released_checkpoint_shapes(name)
  path = f'/ckpt/simclrv2/pretrained/{name.split("/")[1]}/model.ckpt-250228'
  plan = convert_checkpoint.plan_conversion(shapes, checkpoint_path=path)
  config = plan.model_config
  assert (config['depth'], config['width_multiplier'], config['sk_ratio']) == (
      facts['depth'], facts['width_multiplier'], facts['sk_ratio'])
  assert (config['proj_num_layers'], plan.num_classes, plan.image_size) == (
      facts['proj_num_layers'], 1000, 224)
  assert set(plan.mapping) == set(model)
  assert len(set(plan.mapping.values())) == len(model)
  unmapped = plan.unmapped
  assert sorted(unmapped['optimizer slots']) == sorted(n for n in shapes if 'Momentum' in n)
  assert unmapped['training step'] == ['global_step']
  if name.startswith('simclrv2'):
    assert sorted(unmapped['MoCo memory']) == sorted(MEMORY)
    ema = sorted(n for n in shapes if n.startswith('ema_model/'))
    assert unmapped['EMA weights (pass --ema to convert them instead)'] == ema

    with_ema = convert_checkpoint.plan_conversion(shapes, ema=True, checkpoint_path=path)
    assert set(with_ema.mapping) == set(ema) | {n for n in model if 'head_supervised' in n}
    assert sorted(with_ema.unmapped['trained weights, replaced by their EMA (--ema)']) == sorted(
        n for n in model if 'head_supervised' not in n)
    assert any('no EMA copy of 2 variables' in note for note in with_ema.notes)


@pytest.mark.parametrize('folder, selector', [
    ('pretrained', 0), ('finetuned_100pct', 0), ('finetuned_1pct', 1), ('finetuned_10pct', 1),
    ('supervised', None), ('my_run', None)])
def test_what_the_classifier_reads_follows_the_release_folder(folder, selector):
  _, shapes = _released_checkpoint_shapes('simclrv2/r50_1x_sk0')
  path = f'gs://simclr-checkpoints/simclrv2/{folder}/r50_1x_sk0/model.ckpt-37535'
  assert convert_checkpoint.release_ft_proj_selector(path) == selector
  if selector is None:
    with pytest.raises(UserError, match='--ft_proj_selector'):
      convert_checkpoint.plan_conversion(shapes, checkpoint_path=path)
  else:
    plan = convert_checkpoint.plan_conversion(shapes, checkpoint_path=path)
    assert plan.model_config['probe_proj_layers'] == selector
  explicit = convert_checkpoint.plan_conversion(shapes, ft_proj_selector=1, checkpoint_path=path)
  assert explicit.model_config['probe_proj_layers'] == 1


def test_v1_checkpoints_need_no_selector():
  _, shapes = _released_checkpoint_shapes('simclrv1/ResNet50_1x')
  plan = convert_checkpoint.plan_conversion(shapes, checkpoint_path='ResNet50_1x/model.ckpt-1')
  assert plan.model_config['proj_mode'] == 'none' and plan.model_config['probe_proj_layers'] == 0
  assert plan.model_config['proj_dim'] == 2048


@pytest.mark.parametrize('edit, message', [
    (lambda s: s.update({'resnet/conv2d/kernel': [3]}), 'neither SimCLR model weights'),
    (lambda s: s.update({'base_model/conv2d_5/kernel_extra': [3]}), 'Unknown variable'),
    (lambda s: s.update({'base_model/conv2d_5/kernel': [3, 3, 64, 65]}), 'conv2d_5/kernel has'),
    (lambda s: s.pop('base_model/batch_normalization_3/moving_mean'), 'does not fill'),
    (lambda s: s.pop('base_model/conv2d_52/kernel'), 'no ResNet'),
    (lambda s: [s.pop(n) for n in list(s) if n.startswith('base_model')], 'no base_model'),
])
def test_checkpoints_it_cannot_convert_exactly_are_errors(edit, message):
  shapes = dict(official_tf1.architectures()['simclrv1/ResNet50_1x']['variables'])
  edit(shapes)
  with pytest.raises(UserError, match=message):
    convert_checkpoint.plan_conversion(shapes)


# Exactness on small models with the released naming.

def _suffix(i):
  return f'_{i}' if i else ''


class _OfficialForward:
  """The official TF1 forward pass (resnet.py, model_util.py) in inference mode, with tf.nn ops
  on the checkpoint's values, taking base_model's conv2d_N / batch_normalization_N in the order
  the official code creates them."""

  def __init__(self, values, depth, sk_ratio, cifar_stem):
    self.values, self.sk_ratio, self.cifar_stem = values, sk_ratio, cifar_stem
    self.blocks = models.STAGE_SIZES[depth]
    self.bottleneck = depth >= 50
    self.convs = self.norms = 0

  def conv(self, x, stride=1):
    kernel = self.values[f'base_model/conv2d{_suffix(self.convs)}/kernel']
    self.convs += 1
    if stride > 1:  # fixed_padding
      total = kernel.shape[0] - 1
      before, after = total // 2, total - total // 2
      x = tf.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])
    return tf.nn.conv2d(x, kernel, stride, 'SAME' if stride == 1 else 'VALID')

  def norm(self, x, relu=True):
    prefix = f'base_model/batch_normalization{_suffix(self.norms)}'
    self.norms += 1
    return batch_norm(x, self.values, prefix, relu)

  def sk_conv(self, x, stride):
    x = self.norm(self.conv(x, stride))
    streams = tf.stack(tf.split(x, 2, axis=3))
    summary = tf.reduce_mean(tf.reduce_sum(streams, 0), [1, 2], keepdims=True)
    summary = self.norm(self.conv(summary))
    mixing = tf.nn.softmax(tf.stack(tf.split(self.conv(summary), 2, axis=3)), axis=0)
    return tf.reduce_sum(streams * mixing, 0)

  def block(self, x, stride, project):
    shortcut = x
    if project:
      if self.sk_ratio > 0:
        if stride > 1:
          shortcut = tf.pad(shortcut, [[0, 0], [0, 1], [0, 1], [0, 0]])
        shortcut = tf.nn.avg_pool2d(shortcut, 2, stride, 'SAME' if stride == 1 else 'VALID')
        shortcut = self.norm(self.conv(shortcut), relu=False)
      else:
        shortcut = self.norm(self.conv(shortcut, stride), relu=False)
    if self.bottleneck:
      x = self.norm(self.conv(x))
      x = self.sk_conv(x, stride) if self.sk_ratio > 0 else self.norm(self.conv(x, stride))
      x = self.norm(self.conv(x), relu=False)
    else:
      x = self.norm(self.conv(x, stride))
      x = self.norm(self.conv(x), relu=False)
    return tf.nn.relu(x + shortcut)

  def __call__(self, images):
    x = tf.constant(images)
    if self.cifar_stem:
      x = self.norm(self.conv(x))
    else:
      if self.sk_ratio > 0:
        x = self.norm(self.conv(x, 2))
        x = self.norm(self.conv(x))
        x = self.norm(self.conv(x))
      else:
        x = self.norm(self.conv(x, 2))
      x = tf.nn.max_pool2d(x, 3, 2, 'SAME')
    for group, num_blocks in enumerate(self.blocks):
      for i in range(num_blocks):
        x = self.block(x, 2 if group > 0 and i == 0 else 1, project=i == 0)
    return tf.reduce_mean(x, [1, 2]).numpy()


def batch_norm(x, values, prefix, relu):
  x = (x - values[f'{prefix}/moving_mean']) * tf.math.rsqrt(
      values[f'{prefix}/moving_variance'] + 1e-5) * values[f'{prefix}/gamma']
  if f'{prefix}/beta' in values:
    x += values[f'{prefix}/beta']
  return tf.nn.relu(x) if relu else x


def official_heads(values, h, num_proj_layers, ft_proj_selector):
  """model_util.projection_head's hiddens_list and supervised_head's logits."""
  hiddens = [h]
  for j in range(num_proj_layers):
    x = hiddens[-1] @ values[f'head_contrastive/nl_{j}/dense/kernel']
    x = batch_norm(x, values, f'head_contrastive/nl_{j}/batch_normalization',
                   relu=j < num_proj_layers - 1)
    hiddens.append(np.asarray(x))
  logits = None
  if 'head_supervised/linear_layer/dense/kernel' in values:
    logits = (hiddens[ft_proj_selector] @ values['head_supervised/linear_layer/dense/kernel'] +
              values['head_supervised/linear_layer/dense/bias'])
  return hiddens[-1], logits


def _random_values(variables, seed):
  rng = np.random.default_rng(seed)
  values = {}
  for name, shape in variables:
    leaf = name.rsplit('/', 1)[1]
    if leaf == 'kernel':
      value = rng.normal(0, np.sqrt(1 / np.prod(shape[:-1])), shape)
    elif leaf in ('gamma', 'moving_variance'):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # beta, moving_mean, bias
      value = rng.normal(0, 0.3, shape)
    values[name] = value.astype(np.float32)
  return values


def _write_tf1_checkpoint(prefix, tensors):
  """A name-based TF1 checkpoint (what tf.compat.v1.train.Saver writes)."""
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])


def _max_relative_error(actual, expected):
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize('name, folder, image_size, ft_proj_selector', [
    ('tests/r50_w0.0625_sk1', 'finetuned_1pct', 64, 1),   # SimCLR v2 naming, SK, classifier on
                                                         # the first projection layer.
    ('tests/r50_w0.0625_sk0_v1', 'ResNet50_1x', 64, 0),   # SimCLR v1 naming, no projection head.
    ('tests/r18_w0.125_cifar', 'cifar_run', 32, 0),       # A TF1 CIFAR-10 pretraining run.
])
def test_converted_model_computes_what_the_official_model_computes(
    tmp_path, name, folder, image_size, ft_proj_selector):
  facts = official_tf1.architectures()[name]
  values = _random_values(facts['variables'], seed=0)
  extras = {'global_step': np.int64(1234),
            **{f'{n}/Momentum': np.zeros_like(v) for n, v in values.items() if 'kernel' in n}}
  prefix = str(tmp_path / folder / 'model.ckpt-1234')
  _write_tf1_checkpoint(prefix, {**values, **extras})

  converted = convert_checkpoint.convert(prefix)
  assert converted.step == 1234 and converted.num_classes == facts['num_classes']
  assert converted.model_config['probe_proj_layers'] == ft_proj_selector
  assert sorted(converted.unmapped) == ['optimizer slots', 'training step']
  assert 'global_step' in converted.report and 'conv2d_7/kernel/Momentum' in converted.report

  images = np.random.default_rng(1).uniform(0, 1, (3, image_size, image_size, 3))
  images = images.astype(np.float32)
  model = models.create_model(ml_collections.ConfigDict(converted.model_config),
                              num_classes=converted.num_classes)
  outputs = jax.jit(model.apply, static_argnames='train')(converted.variables, images,
                                                          train=False)
  h = _OfficialForward(values, facts['depth'], facts['sk_ratio'], facts['cifar_stem'])(images)
  z, logits = official_heads(values, h, facts['proj_num_layers'], ft_proj_selector)
  assert np.std(h) > 1e-2 and np.std(z) > 1e-2  # Nothing degenerate.
  assert _max_relative_error(np.asarray(outputs['h']), h) <= 1e-4
  assert _max_relative_error(np.asarray(outputs['z']), z) <= 1e-4
  if logits is not None:
    assert _max_relative_error(np.asarray(outputs['probe_logits']), logits) <= 1e-4


def test_write_workdir_is_restored_by_evaluation(tmp_path):
  facts = official_tf1.architectures()['tests/r18_w0.125_cifar']
  values = _random_values(facts['variables'], seed=2)
  prefix = str(tmp_path / 'run' / 'model.ckpt-7')
  _write_tf1_checkpoint(prefix, {**values, 'global_step': np.int64(7)})
  converted = convert_checkpoint.convert(prefix)
  workdir = str(tmp_path / 'workdir')
  convert_checkpoint.write_workdir(converted, workdir)

  saved = checkpointing.open_saved_run(workdir)
  assert saved.model_config.to_dict() == converted.model_config
  assert (saved.config.data.dataset, saved.meta['image_size']) == ('cifar10', 32)
  encoder = eval_setup.restore_encoder(saved, mesh_lib.create_mesh())
  saved.checkpointer.close()
  assert saved.step == encoder.step == 7
  restored = jax.device_get(encoder.variables)
  assert jax.tree.structure(restored) == jax.tree.structure(converted.variables)
  jax.tree.map(np.testing.assert_array_equal, restored, converted.variables)

  with pytest.raises(UserError, match='already holds checkpoints'):
    convert_checkpoint.write_workdir(converted, workdir)


def test_unreadable_checkpoint_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='Cannot read a TF checkpoint'):
    convert_checkpoint.convert(os.path.join(tmp_path, 'model.ckpt-1'))
