"""ResNet, projection head and SimCLRModel: sizes, shapes, initialisation, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from simclr_jax import losses, models
from simclr_jax.errors import UserError
from tests.fixtures import official_tf1


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _init(module, x, **kwargs):
  return jax.jit(lambda x: module.init(jax.random.key(0), x, **kwargs))(x)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _abstract_variables(module, image_size=32, batch=2):
  x = jnp.zeros((batch, image_size, image_size, 3))
  return jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))


def _tiny_resnet(**kwargs):
  return models.ResNet(18, width_multiplier=0.125, cifar_stem=True, **kwargs)


@pytest.mark.parametrize('depth, expected', [
    (50, 23_508_032),  # torchvision resnet50 (25,557,032) without its fc layer (2048*1000 + 1000).
    (18, 11_176_512),  # torchvision resnet18 (11,689,512) without its fc layer (512*1000 + 1000).
])
def test_parameter_counts(depth, expected):
  params = _abstract_variables(models.ResNet(depth, layout='torchvision'))['params']
  assert _count(params) == expected
  cifar_params = _abstract_variables(
      models.ResNet(depth, cifar_stem=True, layout='torchvision'))['params']
  # Only the stem conv changes: 7x7x3x64 -> 3x3x3x64 weights.
  assert _count(params) - _count(cifar_params) == 7 * 7 * 3 * 64 - 3 * 3 * 3 * 64
  assert cifar_params['conv_init']['kernel'].shape == (3, 3, 3, 64)


def _basic_block_parameters(c_in, c, project):
  """3x3 conv c_in->c, BN, 3x3 conv c->c, BN (scale + bias), and a 1x1 conv + BN shortcut."""
  convs = 9 * c_in * c + 9 * c * c + (c_in * c if project else 0)
  return convs + 2 * c * (3 if project else 2)


@pytest.mark.parametrize('layout, expected', [('simclr', 11_173_056), ('torchvision', 11_168_832)])
def test_resnet18_layouts(layout, expected):
  # CIFAR stem: 3x3x3x64 conv and BN; the official layout projects in the first block of every
  # stage, torchvision only where the shape changes (not in stage 1).
  count = 3 * 3 * 3 * 64 + 2 * 64
  c_in = 64
  for stage, c in enumerate((64, 128, 256, 512)):
    count += _basic_block_parameters(c_in, c, project=stage > 0 or layout == 'simclr')
    count += _basic_block_parameters(c, c, project=False)
    c_in = c
  assert count == expected
  params = _abstract_variables(models.ResNet(18, cifar_stem=True, layout=layout))['params']
  assert _count(params) == expected
  assert ('proj_conv' in params['stage1_block1']) == (layout == 'simclr')
  assert all('proj_conv' not in params[f'stage{i}_block2'] for i in range(1, 5))


def test_layout_does_not_change_bottleneck_resnets():
  count = {layout: _count(_abstract_variables(models.ResNet(50, layout=layout))['params'])
           for layout in models.LAYOUTS}
  assert count['simclr'] == count['torchvision'] == 23_508_032


@pytest.mark.parametrize('name', sorted(official_tf1.architectures()))
def test_parameter_counts_match_the_official_code(name):
  """Trainable parameters of base_model/ and head_contrastive/ in the official TF1 graphs of the
  released architectures (and of small ones), recorded in tests/fixtures."""
  facts = official_tf1.architectures()[name]
  encoder = models.ResNet(facts['depth'], facts['width_multiplier'],
                          cifar_stem=facts['cifar_stem'], sk_ratio=facts['sk_ratio'])
  assert _count(_abstract_variables(encoder)['params']) == facts['encoder_trainable_parameters']
  head_count = 0
  if facts['proj_num_layers']:
    head = models.ProjectionHead(num_layers=facts['proj_num_layers'], proj_dim=facts['proj_dim'])
    h = jnp.zeros((2, models.feature_dim(facts['depth'], facts['width_multiplier'])))
    variables = jax.eval_shape(lambda: head.init(jax.random.key(0), h, train=False))
    head_count = _count(variables['params'])
  assert head_count == facts['head_contrastive_trainable_parameters']


@pytest.mark.parametrize('depth, width, dim', [
    (18, 1, 512), (18, 2, 1024), (34, 1, 512), (34, 2, 1024), (50, 1, 2048), (50, 2, 4096),
    (18, 0.25, 128), (50, 0.125, 256),
])
def test_feature_dim_and_output_shape(depth, width, dim):
  assert models.feature_dim(depth, width) == dim
  module = models.ResNet(depth, width_multiplier=width)
  variables = _abstract_variables(module)
  h = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((3, 32, 32, 3)), train=False), variables)
  assert h.shape == (3, dim) and h.dtype == jnp.float32


@pytest.mark.parametrize('cifar_stem, image_size, stage_sizes', [
    (False, 64, (16, 8, 4, 2)),  # 7x7/2 conv and 3x3/2 max-pool: /4 before stage 1.
    (True, 32, (32, 16, 8, 4)),
    (False, 224, (56, 28, 14, 7)),
])
def test_stems_and_stage_strides(cifar_stem, image_size, stage_sizes):
  module = models.ResNet(50, width_multiplier=0.125, cifar_stem=cifar_stem)
  x = jnp.zeros((1, image_size, image_size, 3))

  def forward(x):
    return module.init_with_output(jax.random.key(0), x, train=False,
                                   capture_intermediates=True)

  (_, variables) = jax.eval_shape(forward, x)
  outputs = variables['intermediates']
  last_blocks = ['stage1_block3', 'stage2_block4', 'stage3_block6', 'stage4_block3']
  for name, size in zip(last_blocks, stage_sizes):
    assert outputs[name]['__call__'][0].shape[1:3] == (size, size), name


def test_strided_convs_use_symmetric_padding():
  # On an even input, XLA 'SAME' would pad a 7x7/2 conv by (2, 3); the official code pads (3, 3).
  module = models.ResNet(18, width_multiplier=0.125)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))

  @jax.jit
  def stem_output(x):
    variables = module.init(jax.random.key(0), x, train=False)
    _, state = module.apply(variables, x, train=False, capture_intermediates=True)
    return variables['params']['conv_init']['kernel'], state['intermediates']['conv_init']

  kernel, stem = stem_output(x)
  expected = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                          precision='highest')
  np.testing.assert_allclose(stem['__call__'][0], expected, rtol=1e-5, atol=1e-5)


def test_conv_init_is_truncated_lecun_normal():
  params = _init(_tiny_resnet(), jnp.zeros((1, 8, 8, 3)), train=False)['params']
  kernel = np.asarray(params['stage4_block1']['conv2']['kernel'])  # fan_in = 3 * 3 * 64.
  std = np.sqrt(1 / (3 * 3 * 64))
  np.testing.assert_allclose(kernel.std(), std, rtol=0.02)
  assert np.abs(kernel).max() <= 2 * std / 0.87962566 + 1e-6  # Truncated at 2 stddevs.
  assert np.abs(kernel).max() > 1.9 * std / 0.87962566


@pytest.mark.parametrize('depth, last_bn, zero_init, layout', [
    (18, 'bn2', True, 'torchvision'), (18, 'bn2', False, 'simclr'), (50, 'bn3', True, 'simclr'),
])
def test_zero_init_last_bn(depth, last_bn, zero_init, layout):
  module = models.ResNet(depth, width_multiplier=0.125, cifar_stem=True,
                         zero_init_last_bn=zero_init, layout=layout)
  params = _init(module, jnp.zeros((1, 8, 8, 3)), train=False)['params']
  blocks = {name: p for name, p in params.items() if name.startswith('stage')}
  assert len(blocks) == (8 if depth == 18 else 16)
  for block in blocks.values():
    np.testing.assert_array_equal(block[last_bn]['scale'], 0.0 if zero_init else 1.0)
    np.testing.assert_array_equal(block['bn1']['scale'], 1.0)
    if 'proj_bn' in block:
      np.testing.assert_array_equal(block['proj_bn']['scale'], 1.0)
  # Projection shortcuts in the first block of every stage, except where torchvision keeps the
  # identity (the shape does not change in stage 1 of ResNet-18/34).
  with_projection = sorted(name for name, block in blocks.items() if 'proj_conv' in block)
  expected = ['stage2_block1', 'stage3_block1', 'stage4_block1']
  torchvision_basic = depth == 18 and layout == 'torchvision'
  assert with_projection == (expected if torchvision_basic else ['stage1_block1'] + expected)


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_output():
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  module = _tiny_resnet(dtype=jnp.bfloat16)
  variables = _init(module, x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))

  @jax.jit
  def forward(variables, x):
    bf16 = module.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'],
                        capture_intermediates=True)
    f32, _ = _tiny_resnet().apply(variables, x, train=True, mutable=['batch_stats'])
    return bf16, f32

  (h, state), h32 = forward(variables, x)
  assert h.dtype == jnp.float32
  assert state['intermediates']['stage4_block2']['__call__'][0].dtype == jnp.bfloat16
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state['batch_stats']))
  np.testing.assert_allclose(h, h32, rtol=0.1, atol=0.1)


def _numpy_conv(x, kernel, stride, padding):
  """Cross-correlation NHWC x HWIO with explicit ((top, bottom), (left, right)) zero padding."""
  x = np.pad(x, ((0, 0), *padding, (0, 0)))
  kh, kw = kernel.shape[:2]
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
      out += patch @ kernel[i, j]
  return out


def _numpy_batch_norm(x, params, stats, eps=1e-5):
  return (x - stats['mean']) / np.sqrt(stats['var'] + eps) * params['scale'] + params['bias']


def _random_like(tree, seed, low=-1.0, high=1.0):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.uniform(low, high, x.shape).astype(np.float32)
                                      for x in leaves])


@pytest.mark.parametrize('stride', [1, 2])
def test_selective_kernel_conv_matches_reference(stride):
  features, sk_ratio = 4, 0.0625
  module = models.SelectiveKernelConv(features, stride, sk_ratio, jnp.float32)
  x = np.random.default_rng(0).uniform(0, 1, (2, 6, 6, 3)).astype(np.float32)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
  params = _random_like(abstract['params'], 1)
  stats = {'bn': _random_like(abstract['batch_stats']['bn'], 2, 0.5, 2.0),
           'reduce_bn': _random_like(abstract['batch_stats']['reduce_bn'], 3, 0.5, 2.0)}
  y = jax.jit(module.apply, static_argnames='train')(
      {'params': params, 'batch_stats': stats}, x, train=False)

  assert params['reduce_conv']['kernel'].shape == (1, 1, features, 32)  # max(4 // 16, 32)
  # A 3x3 conv pads (1, 1): 'SAME' at stride 1, the official fixed padding at stride 2.
  both = _numpy_conv(x, params['conv']['kernel'], stride, ((1, 1), (1, 1)))
  both = np.maximum(_numpy_batch_norm(both, params['bn'], stats['bn']), 0)
  a, b = both[..., :features], both[..., features:]
  pooled = (a + b).mean(axis=(1, 2))
  reduced = pooled @ params['reduce_conv']['kernel'][0, 0]
  reduced = np.maximum(_numpy_batch_norm(reduced, params['reduce_bn'], stats['reduce_bn']), 0)
  logits = reduced @ params['mix_conv']['kernel'][0, 0]
  weight_a = 1 / (1 + np.exp(logits[:, features:] - logits[:, :features]))  # 2-way softmax.
  expected = a * weight_a[:, None, None] + b * (1 - weight_a[:, None, None])
  assert y.shape == (2, 6 // stride, 6 // stride, features)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_resnet_d_average_pooling(stride):
  x = np.random.default_rng(0).uniform(0, 1, (1, 4, 4, 2)).astype(np.float32)
  y = np.asarray(models._avg_pool_2x2(jnp.asarray(x), stride))
  if stride == 1:  # TF 'SAME': one cell of padding after, left out of the mean.
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=np.nan)
    expected = np.stack([[np.nanmean(padded[0, i:i + 2, j:j + 2], axis=(0, 1))
                          for j in range(4)] for i in range(4)])[None]
  else:  # Fixed padding of one zero row/column after, counted in the mean; VALID pooling.
    expected = x.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_sk_resnet_structure_shapes_and_dtypes():
  module = models.ResNet(50, width_multiplier=2, sk_ratio=0.0625)
  params = _abstract_variables(module, image_size=64)['params']
  # Deep stem: 3x3/2 to 32w, 3x3 to 32w, 3x3 to 64w.
  assert [params[n]['kernel'].shape for n in ('conv_init_a', 'conv_init_b', 'conv_init')] == [
      (3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128)]
  block = params['stage4_block2']
  assert set(block) == {'conv1', 'bn1', 'sk_conv', 'conv3', 'bn3'}
  f = 1024  # 512 * w filters in stage 4.
  assert block['sk_conv']['conv']['kernel'].shape == (3, 3, f, 2 * f)
  assert block['sk_conv']['reduce_conv']['kernel'].shape == (1, 1, f, 64)  # f * 0.0625
  assert block['sk_conv']['mix_conv']['kernel'].shape == (1, 1, 64, 2 * f)
  assert params['stage1_block1']['proj_conv']['kernel'].shape == (1, 1, 128, 512)
  assert params['stage2_block1']['proj_conv']['kernel'].shape == (1, 1, 512, 1024)

  tiny = models.ResNet(50, width_multiplier=0.0625, sk_ratio=0.0625, dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  variables = _init(tiny, x, train=False)

  @jax.jit
  def forward(variables, x):
    return tiny.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'],
                      capture_intermediates=True)

  h, state = forward(variables, x)
  assert h.shape == (2, 128) and h.dtype == jnp.float32 and np.isfinite(h).all()
  outputs = state['intermediates']
  for name, size in zip(['stage1_block3', 'stage2_block4', 'stage3_block6', 'stage4_block3'],
                        (16, 8, 4, 2)):
    y = outputs[name]['__call__'][0]
    assert y.shape[1:3] == (size, size) and y.dtype == jnp.bfloat16, name
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state['batch_stats']))


def test_cifar_stem_takes_precedence_over_the_deep_stem():
  params = _abstract_variables(
      models.ResNet(50, width_multiplier=0.125, cifar_stem=True, sk_ratio=0.0625))['params']
  assert 'conv_init_a' not in params and params['conv_init']['kernel'].shape == (3, 3, 3, 8)
  assert 'sk_conv' in params['stage1_block1']


def test_bad_depth():
  with pytest.raises(UserError, match=r'\[18, 34, 50, 101, 152, 200\]'):
    models.ResNet(42)
  with pytest.raises(UserError, match='depth'):
    models.feature_dim(26)


@pytest.mark.parametrize('mode, num_layers, expected', [
    # Dense 512x512, BN (scale+bias), Dense 512x128, BN (scale only).
    ('nonlinear', 2, 512 * 512 + 2 * 512 + 512 * 128 + 128),
    ('nonlinear', 3, 2 * (512 * 512 + 2 * 512) + 512 * 128 + 128),
    ('linear', 3, 512 * 128 + 128),
])
def test_projection_head_parameters(mode, num_layers, expected):
  head = models.ProjectionHead(num_layers=num_layers, mode=mode)
  variables = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((2, 512)), train=True))
  assert _count(variables['params']) == expected
  assert set(variables['params']['bn_out']) == {'scale'}
  hiddens = jax.eval_shape(lambda v: head.apply(v, jnp.zeros((2, 512)), train=False), variables)
  # The official hiddens_list: h, the activation after each hidden layer, z.
  assert len(hiddens) == head.num_hidden_layers + 2
  assert [x.shape for x in hiddens[:-1]] == [(2, 512)] * (head.num_hidden_layers + 1)
  assert hiddens[-1].shape == (2, 128) and all(x.dtype == jnp.float32 for x in hiddens)


def test_projection_head_none_is_the_identity():
  head = models.ProjectionHead(mode='none', num_layers=0)
  h = jax.random.normal(jax.random.key(0), (2, 16))
  variables = head.init(jax.random.key(0), h, train=True)
  assert not variables
  [z] = head.apply(variables, h, train=True)
  np.testing.assert_array_equal(z, h)


def test_projection_head_bad_mode():
  with pytest.raises(UserError, match='mode'):
    models.ProjectionHead(mode='mlp')
  with pytest.raises(UserError, match='proj_num_layers'):
    models.ProjectionHead(num_layers=0)


def _model_config(**overrides):
  config = default.get_config().model
  config.update(dict(depth=18, width_multiplier=0.125, cifar_stem=True) | overrides)
  return config


def test_simclr_model_outputs_and_tree():
  model = models.create_model(_model_config(), num_classes=10)
  x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 3))
  variables = _init(model, x, train=False)
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'encoder', 'head', 'probe'}
  assert set(variables['batch_stats']) == {'encoder', 'head'}

  @jax.jit
  def forward(variables, x):
    return (model.apply(variables, x, train=False),
            model.apply(variables, x, train=False, method=models.SimCLRModel.encode))

  outputs, h = forward(variables, x)
  assert set(outputs) == {'h', 'z', 'probe_logits'}
  assert outputs['h'].shape == (6, 64)
  assert outputs['z'].shape == (6, 128)
  assert outputs['probe_logits'].shape == (6, 10)
  np.testing.assert_allclose(h, outputs['h'], rtol=1e-6, atol=1e-6)  # Two calls, maybe fused apart.

  no_probe = models.create_model(_model_config(proj_mode='linear', proj_dim=32))
  variables = jax.eval_shape(lambda: no_probe.init(jax.random.key(0), x, train=False))
  assert set(variables['params']) == {'encoder', 'head'}
  outputs = jax.eval_shape(lambda v: no_probe.apply(v, x, train=False), variables)
  assert set(outputs) == {'h', 'z'} and outputs['z'].shape == (6, 32)


def test_probe_sees_stop_gradient_features():
  model = models.create_model(_model_config(), num_classes=3)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 0])
  target = jax.random.normal(jax.random.key(2), (4, 128))
  variables = _init(model, x, train=False)

  @jax.jit
  def grads(params, probe_weight):
    def loss_fn(params):
      out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                           train=True, mutable=['batch_stats'])
      probe_loss = optax.softmax_cross_entropy_with_integer_labels(out['probe_logits'], labels)
      return jnp.sum(out['z'] * target) + probe_weight * probe_loss.mean()
    return jax.grad(loss_fn)(params)

  without_probe = grads(variables['params'], 0.0)
  with_probe = grads(variables['params'], 1.0)
  for part in ('encoder', 'head'):
    jax.tree.map(np.testing.assert_array_equal, with_probe[part], without_probe[part])
  assert np.abs(with_probe['probe']['kernel']).sum() > 0
  np.testing.assert_array_equal(without_probe['probe']['kernel'], 0.0)


def test_probe_can_read_the_first_projection_layer():
  # SimCLR v2's 1%/10% fine-tuned classifiers read the first hidden layer of the head
  # (ft_proj_selector=1); the features of fine-tuning with proj_layers=1 are the same activation.
  model = models.create_model(_model_config(proj_num_layers=3, probe_proj_layers=1),
                              num_classes=5)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  variables = _init(model, x, train=False)

  @jax.jit
  def forward(variables, x):
    outputs = model.apply(variables, x, train=False)
    features = model.apply(variables, x, train=False, proj_layers=1,
                           method=models.SimCLRModel.encode)
    return outputs, features

  outputs, features = forward(variables, x)
  assert features.shape == (4, 64) and (features >= 0).all()  # After a ReLU.
  probe = variables['params']['probe']
  np.testing.assert_allclose(outputs['probe_logits'], features @ probe['kernel'] + probe['bias'],
                             rtol=1e-5, atol=1e-6)
  assert outputs['z'].shape == (4, 128)


def test_simclr_model_without_projection_head():
  model = models.create_model(_model_config(proj_mode='none'), num_classes=3)
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
  variables = _init(model, x, train=False)
  assert set(variables['params']) == {'encoder', 'probe'}
  outputs = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_array_equal(outputs['z'], outputs['h'])


@pytest.mark.parametrize('overrides, message', [
    (dict(dtype='float16'), 'dtype'),
    (dict(proj_mode='mlp'), 'mode'),
    (dict(probe_proj_layers=2), 'probe_proj_layers'),
    (dict(depth=20), 'depth'),
    (dict(layout='resnet'), 'layout'),
    (dict(sk_ratio=-0.1), 'sk_ratio'),
])
def test_create_model_bad_config(overrides, message):
  with pytest.raises(UserError, match=message):
    models.create_model(_model_config(**overrides))


def test_bfloat16_model_has_float32_head_and_loss():
  model = models.create_model(_model_config(dtype='bfloat16'))
  assert model.encoder.dtype == jnp.bfloat16
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  variables = _init(model, x, train=False)
  head = models.ProjectionHead()

  @jax.jit
  def forward(variables, x):
    outputs, state = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'],
                                 capture_intermediates=True)
    z_a, z_b = outputs['z'].reshape(2, 2, -1).transpose(1, 0, 2)
    loss, _ = losses.contrastive_loss_and_metrics(z_a, z_b, temperature=0.1)
    # The same head on the same h, built on its own in float32.
    hiddens, _ = head.apply({'params': variables['params']['head'],
                             'batch_stats': variables['batch_stats']['head']},
                            outputs['h'], train=True, mutable=['batch_stats'])
    z32 = hiddens[-1]
    return outputs, state['intermediates'], loss, z32

  outputs, intermediates, loss, z32 = forward(variables, x)
  assert intermediates['encoder']['stage4_block2']['__call__'][0].dtype == jnp.bfloat16
  head_outputs = jax.tree.leaves(intermediates['head'])
  assert head_outputs and all(y.dtype == jnp.float32 for y in head_outputs)
  assert outputs['z'].dtype == jnp.float32 and loss.dtype == jnp.float32
  np.testing.assert_allclose(outputs['z'], z32, rtol=1e-5, atol=1e-5)
