"""SimCLR networks: ResNet v1 encoder, projection head and online linear probe (Flax linen).

The ResNet follows the official SimCLR code: post-activation v1 blocks with the stride on the 3x3
conv ("v1.5"), PyTorch-style explicit padding for strided convs, truncated-normal fan-in conv init,
BatchNorm momentum 0.9 / epsilon 1e-5, a zero-initialised last BatchNorm scale in every block and
(layout 'simclr') a projection shortcut in the first block of every stage; layout 'torchvision'
keeps the identity where the shape does not change (only ResNet-18/34 differ).
With `sk_ratio` > 0 it is SimCLR v2's selective-kernel ResNet: SK convs in the bottlenecks and the
ResNet-D deep stem and average-pooling projection shortcuts.
BatchNorm has no `axis_name`: under `jax.jit` on a batch-sharded input its statistics are already
global (see docs/design.md).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.errors import UserError

STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_PROJ_MODES = ('nonlinear', 'linear', 'none')
LAYOUTS = ('simclr', 'torchvision')

conv_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
dense_init = nn.initializers.normal(0.01)


def _check_depth(depth: int) -> None:
  if depth not in STAGE_SIZES:
    raise UserError(f'Unsupported ResNet depth {depth}; supported: {sorted(STAGE_SIZES)}.')


def _uses_bottleneck(depth: int) -> bool:
  return depth >= 50


def _stage_channels(width_multiplier: float) -> tuple[int, ...]:
  return tuple(int(c * width_multiplier) for c in (64, 128, 256, 512))


def feature_dim(depth: int, width_multiplier: float = 1) -> int:
  """Size of the representation h: 512*w for ResNet-18/34, 2048*w for deeper ResNets."""
  _check_depth(depth)
  expansion = 4 if _uses_bottleneck(depth) else 1
  return _stage_channels(width_multiplier)[-1] * expansion


def _padding(kernel_size: int, stride: int):
  """'SAME' for stride 1; PyTorch/TF-SimCLR fixed padding for strided convs (not XLA 'SAME')."""
  if stride == 1:
    return 'SAME'
  before = (kernel_size - 1) // 2
  return ((before, kernel_size - 1 - before),) * 2


def _conv(features, kernel_size, stride=1, *, dtype, name):
  return nn.Conv(features, (kernel_size, kernel_size), (stride, stride),
                 padding=_padding(kernel_size, stride), use_bias=False, kernel_init=conv_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _norm(train, *, dtype, name, zero_scale=False, use_bias=True):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_bias=use_bias,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


def _avg_pool_2x2(x, stride):
  """ResNet-D downsampling before a projection: 2x2 average pooling. Stride 2 pads one zero row
  and column after (counted, as in the official code's fixed padding); stride 1 is TF 'SAME',
  which leaves the padding out of the count."""
  if stride == 1:
    return nn.avg_pool(x, (2, 2), (1, 1), padding='SAME', count_include_pad=False)
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  return nn.avg_pool(x, (2, 2), (stride, stride), padding='VALID')


def _shortcut(x, features, stride, train, *, project, avg_down, dtype):
  """Identity, or a projection: strided 1x1 conv + BatchNorm, or with `avg_down` (ResNet-D)
  2x2 average pooling with the stride, then a 1x1 conv + BatchNorm."""
  if not project:
    return x
  if avg_down:
    x, stride = _avg_pool_2x2(x, stride), 1
  x = _conv(features, 1, stride, dtype=dtype, name='proj_conv')(x)
  return _norm(train, dtype=dtype, name='proj_bn')(x)


class SelectiveKernelConv(nn.Module):
  """SK conv (SimCLR v2): replaces a bottleneck's 3x3 conv + BN-ReLU.

  One 3x3 conv (with the stride) to two `features`-channel streams -> BN-ReLU; the global mean of
  their sum -> 1x1 conv to max(int(features * sk_ratio), 32) -> BN-ReLU -> 1x1 conv to two
  logits per channel; the output is the softmax-weighted sum of the streams.
  """
  features: int
  stride: int
  sk_ratio: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_norm, train, dtype=self.dtype)
    x = conv(2 * self.features, 3, self.stride, name='conv')(x)
    streams = jnp.stack(jnp.split(nn.relu(norm(name='bn')(x)), 2, axis=-1))
    summary = jnp.mean(streams.sum(axis=0), axis=(1, 2), keepdims=True)
    summary = conv(max(int(self.features * self.sk_ratio), 32), 1, name='reduce_conv')(summary)
    summary = nn.relu(norm(name='reduce_bn')(summary))
    logits = conv(2 * self.features, 1, name='mix_conv')(summary)
    weights = jax.nn.softmax(jnp.stack(jnp.split(logits, 2, axis=-1)), axis=0)
    return jnp.sum(streams * weights, axis=0)


# Blocks compute their shortcut first: their layers are created in the official code's order,
# which convert_checkpoint relies on. sk_ratio > 0 selects the ResNet-D shortcut in both block
# kinds (as the official TF2 code) and the SK conv in bottlenecks.

class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""
  features: int
  stride: int
  project: bool
  zero_init_last_bn: bool
  sk_ratio: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_norm, train, dtype=self.dtype)
    shortcut = _shortcut(x, self.features, self.stride, train, project=self.project,
                         avg_down=self.sk_ratio > 0, dtype=self.dtype)
    y = conv(self.features, 3, self.stride, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.features, 3, name='conv2')(y)
    y = norm(name='bn2', zero_scale=self.zero_init_last_bn)(y)
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided; SK conv when sk_ratio > 0) -> 1x1 with 4x expansion (ResNet-50+)."""
  features: int
  stride: int
  project: bool
  zero_init_last_bn: bool
  sk_ratio: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_norm, train, dtype=self.dtype)
    shortcut = _shortcut(x, 4 * self.features, self.stride, train, project=self.project,
                         avg_down=self.sk_ratio > 0, dtype=self.dtype)
    y = conv(self.features, 1, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    if self.sk_ratio > 0:
      y = SelectiveKernelConv(self.features, self.stride, self.sk_ratio, self.dtype,
                              name='sk_conv')(y, train)
    else:
      y = conv(self.features, 3, self.stride, name='conv2')(y)
      y = nn.relu(norm(name='bn2')(y))
    y = conv(4 * self.features, 1, name='conv3')(y)
    y = norm(name='bn3', zero_scale=self.zero_init_last_bn)(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet v1 encoder: images [B, H, W, 3] in [0, 1] -> pooled representation h [B, F], float32.

  Stems: 7x7/2 conv -> BN-ReLU -> 3x3/2 max-pool; with sk_ratio > 0 the ResNet-D deep stem
  (3x3/2 conv to half the stem width, 3x3 conv, 3x3 conv, each -> BN-ReLU, then the max-pool);
  `cifar_stem` (3x3/1 conv -> BN-ReLU, no pooling) takes precedence over both.
  """
  depth: int
  width_multiplier: float = 1
  cifar_stem: bool = False
  zero_init_last_bn: bool = True
  layout: str = 'simclr'
  sk_ratio: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_depth(self.depth)
    if self.layout not in LAYOUTS:
      raise UserError(f'Unknown ResNet layout {self.layout!r}; expected one of {LAYOUTS}.')
    if not 0 <= self.sk_ratio < 1:
      raise UserError(f'sk_ratio must be in [0, 1) (0 = no selective kernels; SimCLR v2 used '
                      f'0.0625), got {self.sk_ratio}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool):
    channels = _stage_channels(self.width_multiplier)
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_norm, train, dtype=self.dtype)
    x = jnp.asarray(x, self.dtype)
    if self.cifar_stem:
      x = conv(channels[0], 3, name='conv_init')(x)
    elif self.sk_ratio > 0:
      x = conv(channels[0] // 2, 3, 2, name='conv_init_a')(x)
      x = nn.relu(norm(name='bn_init_a')(x))
      x = conv(channels[0] // 2, 3, name='conv_init_b')(x)
      x = nn.relu(norm(name='bn_init_b')(x))
      x = conv(channels[0], 3, name='conv_init')(x)
    else:
      x = conv(channels[0], 7, 2, name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')

    block, expansion = (BottleneckBlock, 4) if _uses_bottleneck(self.depth) else (BasicBlock, 1)
    for i, (num_blocks, features) in enumerate(zip(STAGE_SIZES[self.depth], channels)):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        reshapes = stride != 1 or x.shape[-1] != expansion * features
        project = reshapes or (j == 0 and self.layout == 'simclr')
        x = block(features, stride, project, self.zero_init_last_bn, self.sk_ratio, self.dtype,
                  name=f'stage{i + 1}_block{j + 1}')(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class ProjectionHead(nn.Module):
  """SimCLR projection g(h) -> z, with BatchNorm on every layer as in the official code.

  'nonlinear': (num_layers - 1) x [Dense(hidden_dim) -> BN -> ReLU], then Dense(proj_dim) -> BN
  without bias. 'linear': Dense(proj_dim) -> BN without bias. 'none': z = h. Dense layers have no
  bias; hidden_dim defaults to the input feature size. Computes in float32 whatever the encoder's
  dtype (it is cheap, and the official objective is computed in float32).
  """
  num_layers: int = 2
  proj_dim: int = 128
  hidden_dim: int | None = None
  mode: str = 'nonlinear'

  def __post_init__(self):
    if self.mode not in _PROJ_MODES:
      raise UserError(f'Unknown projection head mode {self.mode!r}; expected one of '
                      f'{_PROJ_MODES}.')
    if self.mode == 'nonlinear' and self.num_layers < 1:
      raise UserError(f'A nonlinear projection head needs proj_num_layers >= 1, got '
                      f'{self.num_layers}.')
    super().__post_init__()

  @property
  def num_hidden_layers(self) -> int:
    return self.num_layers - 1 if self.mode == 'nonlinear' else 0

  @nn.compact
  def __call__(self, x, train: bool, hidden_layers: int | None = None) -> list[jax.Array]:
    """The official `hiddens_list` [x, a_1, ..., a_n, z]: the input, the activation after each
    hidden layer and z (just [x] for 'none'); with `hidden_layers` = k only [x, a_1, ..., a_k]
    (SimCLR v2 fine-tunes from k = 1)."""
    if hidden_layers is not None and not 0 <= hidden_layers <= self.num_hidden_layers:
      raise UserError(f'This projection head has {self.num_hidden_layers} hidden layers, not '
                      f'{hidden_layers}.')
    dense = functools.partial(nn.Dense, use_bias=False, kernel_init=dense_init,
                              dtype=jnp.float32, param_dtype=jnp.float32)
    norm = functools.partial(_norm, train, dtype=jnp.float32)
    hiddens = [jnp.asarray(x, jnp.float32)]
    hidden_dim = self.hidden_dim or x.shape[-1]
    for i in range(self.num_hidden_layers if hidden_layers is None else hidden_layers):
      y = dense(hidden_dim, name=f'dense{i + 1}')(hiddens[-1])
      hiddens.append(nn.relu(norm(name=f'bn{i + 1}')(y)))
    if hidden_layers is None and self.mode != 'none':
      z = dense(self.proj_dim, name='dense_out')(hiddens[-1])
      hiddens.append(norm(name='bn_out', use_bias=False)(z))
    return hiddens


class SimCLRModel(nn.Module):
  """Encoder and projection head, plus a linear probe when num_classes > 0.

  The probe reads stop_gradient(h), or with `probe_proj_layers` = k the activation after the
  head's first k hidden layers (the official ft_proj_selector; SimCLR v2's 1%/10% fine-tuned
  classifiers read k = 1).
  """
  encoder: nn.Module
  head: ProjectionHead
  num_classes: int = 0
  probe_proj_layers: int = 0

  def __post_init__(self):
    if not 0 <= self.probe_proj_layers <= self.head.num_hidden_layers:
      raise UserError(f'probe_proj_layers={self.probe_proj_layers}, but the projection head has '
                      f'{self.head.num_hidden_layers} hidden layers.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool):
    hiddens = self.head(self.encoder(x, train=train), train=train)
    outputs = {'h': hiddens[0], 'z': hiddens[-1]}
    if self.num_classes > 0:
      probe = nn.Dense(self.num_classes, kernel_init=dense_init, name='probe')
      outputs['probe_logits'] = probe(jax.lax.stop_gradient(hiddens[self.probe_proj_layers]))
    return outputs

  def encode(self, x, train: bool = False, proj_layers: int = 0):
    """The representation h (for evaluation: `apply(..., method=SimCLRModel.encode)`), or with
    `proj_layers` = k > 0 the output of the projection head's first k hidden layers."""
    h = self.encoder(x, train=train)
    return self.head(h, train=train, hidden_layers=proj_layers)[-1]


def create_model(model_config, num_classes: int = 0) -> SimCLRModel:
  """Builds the SimCLRModel described by `config.model` (see configs/default.py)."""
  if model_config.dtype not in _DTYPES:
    raise UserError(f'Unknown model dtype {model_config.dtype!r}; expected one of '
                    f'{list(_DTYPES)}.')
  dtype = _DTYPES[model_config.dtype]
  encoder = ResNet(depth=model_config.depth, width_multiplier=model_config.width_multiplier,
                   cifar_stem=model_config.cifar_stem,
                   zero_init_last_bn=model_config.zero_init_last_bn,
                   layout=model_config.get('layout', 'simclr'),
                   sk_ratio=model_config.get('sk_ratio', 0.0), dtype=dtype)
  head = ProjectionHead(num_layers=model_config.proj_num_layers, proj_dim=model_config.proj_dim,
                        mode=model_config.proj_mode)
  return SimCLRModel(encoder=encoder, head=head, num_classes=num_classes,
                     probe_proj_layers=model_config.get('probe_proj_layers', 0))
