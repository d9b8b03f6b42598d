r"""PyTorch peer of the simclr_jax train step, for benchmarks/benchmark.py (its own venv).

    bash benchmarks/setup_peer.sh
    benchmarks/.peer-venv/bin/python benchmarks/torch_peer.py --depth=18 --width_multiplier=0.25 \
        --cifar_stem=1 --image_size=28 --batch_size=256 --steps=20

One SimCLR step, as `simclr_jax.pretrain.train_step` does it: both views of the batch through the
encoder as one interleaved batch of 2B (BatchNorm over both views), the projection head, NT-Xent
(cosine, temperature tau, mean over the 2N anchors), the online linear probe on h.detach(), and a
LARS update with SimCLR's exclusions (the math of optax.lars: weight decay and trust ratio on conv
and dense kernels outside the probe, classic momentum with the learning rate inside the buffer),
written with torch._foreach ops; --optimizer=sgd uses torch.optim.SGD(momentum, foreach) instead.

The ResNet is written here rather than taken from torchvision, which has no width multiplier for
basic blocks (ResNet-18 w=0.25 is the default config) and no CIFAR stem; it mirrors
simclr_jax/models.py: v1 post-activation blocks, stride on the 3x3 conv, BN momentum 0.9 (torch
0.1) and epsilon 1e-5, projection shortcuts only where the shape changes, a 2- or 3-layer head
with bias-free dense layers and BatchNorm on each (the last without bias). With
torchvision installed, --check_torchvision asserts the encoder's parameter count equals
torchvision's resnet18/50 (w=1, ImageNet stem, no fc). The NT-Xent is lightly's NTXentLoss when
lightly imports (--loss=auto), else the same loss written here.

Timing as benchmark.py: --warmup untimed steps, then --steps in --windows windows, synchronising
only at the end of each window; step time = median. Prints one JSON line.
"""

import argparse
import json
import math
import os
import time

import torch
from torch import nn
import torch.nn.functional as F

_STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}
# torchvision.models.resnet{18,50}(num_classes=1000) minus the fc layer.
_TORCHVISION_ENCODER_PARAMS = {18: 11_689_512 - 513_000, 50: 25_557_032 - 2_049_000}


def _bn(channels, zero_scale=False):
  bn = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
  if zero_scale:
    nn.init.zeros_(bn.weight)
  return bn


def _conv(cin, cout, k, stride=1):
  conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=False)
  # variance_scaling(1, fan_in, truncated_normal) as models.conv_init.
  nn.init.trunc_normal_(conv.weight, std=1 / math.sqrt(cin * k * k) / .87962566103423978,
                        a=-2 / math.sqrt(cin * k * k) / .87962566103423978,
                        b=2 / math.sqrt(cin * k * k) / .87962566103423978)
  return conv


class _Shortcut(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(_conv(cin, cout, 1, stride), _bn(cout))

  def forward(self, x):
    return x if self.proj is None else self.proj(x)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, features, stride, zero_init):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, features, 3, stride), _bn(features)
    self.conv2, self.bn2 = _conv(features, features, 3), _bn(features, zero_init)
    self.shortcut = _Shortcut(cin, features, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class BottleneckBlock(nn.Module):
  expansion = 4

  def __init__(self, cin, features, stride, zero_init):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, features, 1), _bn(features)
    self.conv2, self.bn2 = _conv(features, features, 3, stride), _bn(features)
    self.conv3, self.bn3 = _conv(features, 4 * features, 1), _bn(4 * features, zero_init)
    self.shortcut = _Shortcut(cin, 4 * features, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
  """simclr_jax.models.ResNet in PyTorch: images [B, 3, H, W] -> h [B, F] (float32)."""

  def __init__(self, depth, width_multiplier=1.0, cifar_stem=False, zero_init_last_bn=True):
    super().__init__()
    channels = [int(c * width_multiplier) for c in (64, 128, 256, 512)]
    block = BottleneckBlock if depth >= 50 else BasicBlock
    k, s = (3, 1) if cifar_stem else (7, 2)
    stem = [_conv(3, channels[0], k, s), _bn(channels[0]), nn.ReLU()]
    if not cifar_stem:
      stem.append(nn.MaxPool2d(3, 2, padding=1))
    self.stem = nn.Sequential(*stem)
    layers, cin = [], channels[0]
    for i, (num_blocks, features) in enumerate(zip(_STAGE_SIZES[depth], channels)):
      for j in range(num_blocks):
        layers.append(block(cin, features, 2 if i > 0 and j == 0 else 1, zero_init_last_bn))
        cin = features * block.expansion
    self.blocks = nn.Sequential(*layers)
    self.feature_dim = cin

  def forward(self, x):
    return self.blocks(self.stem(x)).float().mean(dim=(2, 3))


class _ScaleOnlyBN(nn.Module):
  """BatchNorm1d with a learned scale and no bias (the head's last layer)."""

  def __init__(self, dim):
    super().__init__()
    self.bn = nn.BatchNorm1d(dim, eps=1e-5, momentum=0.1, affine=False)
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return self.bn(x) * self.weight


class ProjectionHead(nn.Module):

  def __init__(self, in_dim, num_layers=2, proj_dim=128, mode='nonlinear'):
    super().__init__()
    layers = []
    for _ in range(num_layers - 1 if mode == 'nonlinear' else 0):
      layers += [nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim, 1e-5, 0.1),
                 nn.ReLU()]
    layers += [nn.Linear(in_dim, proj_dim, bias=False), _ScaleOnlyBN(proj_dim)]
    for layer in layers:
      if isinstance(layer, nn.Linear):
        nn.init.normal_(layer.weight, std=0.01)
    self.net = nn.Sequential(*layers)

  def forward(self, h):
    return self.net(h).float()


class SimCLRModel(nn.Module):

  def __init__(self, args):
    super().__init__()
    self.encoder = ResNet(args.depth, args.width_multiplier, bool(args.cifar_stem))
    self.head = ProjectionHead(self.encoder.feature_dim, args.proj_num_layers, args.proj_dim,
                               args.proj_mode)
    self.probe = nn.Linear(self.encoder.feature_dim, args.num_classes) if args.num_classes else None

  def forward(self, x):
    h = self.encoder(x)
    z = self.head(h)
    logits = self.probe(h.detach().float()) if self.probe is not None else None
    return z, logits


def nt_xent(z_a, z_b, temperature):
  """The loss of simclr_jax.losses.nt_xent (cosine): mean over the 2N anchors."""
  z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
  n = z_a.shape[0]
  logits = z @ z.T / temperature
  logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float('-inf'))
  positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
  return F.cross_entropy(logits, positives)


def make_loss(kind, temperature):
  if kind in ('auto', 'lightly'):
    try:
      from lightly.loss import NTXentLoss  # pylint: disable=g-import-not-at-top
      return 'lightly.loss.NTXentLoss', NTXentLoss(temperature=temperature)
    except ImportError:
      if kind == 'lightly':
        raise
  return 'torch_peer.nt_xent', lambda a, b: nt_xent(a, b, temperature)


def _is_lars(name, param):
  """Conv and dense kernels outside the probe (optim.lars_mask): ndim >= 2, not 'probe.'."""
  return param.ndim >= 2 and not name.startswith('probe.')


class Lars:
  """optax.lars(lr, wd, momentum, trust_coefficient=1e-3, eps=0, nesterov=False) with masks."""

  def __init__(self, model, lr, weight_decay, momentum, trust_coefficient=1e-3):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    self.lars = [p for n, p in named if _is_lars(n, p)]
    self.plain = [p for n, p in named if not _is_lars(n, p)]
    self.lr, self.wd, self.momentum, self.tc = lr, weight_decay, momentum, trust_coefficient
    self.lars_buf = [torch.zeros_like(p) for p in self.lars]
    self.plain_buf = [torch.zeros_like(p) for p in self.plain]

  @torch.no_grad()
  def step(self):
    grads = [p.grad for p in self.lars]
    torch._foreach_add_(grads, self.lars, alpha=self.wd)  # pylint: disable=protected-access
    w_norm = torch._foreach_norm(self.lars)  # pylint: disable=protected-access
    g_norm = torch._foreach_norm(grads)  # pylint: disable=protected-access
    ratios = [torch.where((w > 0) & (g > 0), self.tc * w / g, torch.ones_like(w))
              for w, g in zip(w_norm, g_norm)]
    torch._foreach_mul_(grads, ratios)  # pylint: disable=protected-access
    for params, bufs, updates in ((self.lars, self.lars_buf, grads),
                                  (self.plain, self.plain_buf, [p.grad for p in self.plain])):
      torch._foreach_mul_(bufs, self.momentum)  # pylint: disable=protected-access
      torch._foreach_add_(bufs, updates, alpha=-self.lr)  # pylint: disable=protected-access
      torch._foreach_add_(params, bufs)  # pylint: disable=protected-access

  def zero_grad(self):
    for p in self.lars + self.plain:
      p.grad = None


def _median(xs):
  xs = sorted(xs)
  mid = len(xs) // 2
  return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def _sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add = parser.add_argument
  add('--depth', type=int, default=18)
  add('--width_multiplier', type=float, default=0.25)
  add('--cifar_stem', type=int, default=1)
  add('--proj_mode', default='nonlinear')
  add('--proj_num_layers', type=int, default=2)
  add('--proj_dim', type=int, default=128)
  add('--num_classes', type=int, default=10)
  add('--image_size', type=int, default=28)
  add('--batch_size', type=int, default=256)
  add('--dtype', default='float32', choices=('float32', 'bfloat16'),
      help='bfloat16: torch.autocast over forward and loss (parameters stay float32).')
  add('--temperature', type=float, default=0.5)
  add('--learning_rate', type=float, default=1.0)
  add('--weight_decay', type=float, default=1e-4)
  add('--momentum', type=float, default=0.9)
  add('--optimizer', default='lars', choices=('lars', 'sgd'))
  add('--loss', default='auto', choices=('auto', 'lightly', 'builtin'))
  add('--channels_last', type=int, default=1, help='NHWC activations (faster with oneDNN/cuDNN).')
  add('--compile', action='store_true', help='torch.compile the forward+loss (default eager).')
  add('--steps', type=int, default=20)
  add('--warmup', type=int, default=3)
  add('--windows', type=int, default=5)
  add('--threads', type=int, default=0, help='torch threads (0: every core of this process).')
  add('--device', default='auto')
  add('--check_torchvision', action='store_true')
  args = parser.parse_args()

  torch.manual_seed(0)
  device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu')
                        if args.device == 'auto' else args.device)
  if device.type == 'cpu':
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  else:
    torch.backends.cudnn.benchmark = True
  model = SimCLRModel(args).to(device)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
            for name in ('encoder', 'head', 'probe') if getattr(model, name) is not None}
  counts['total'] = sum(counts.values())
  if args.check_torchvision:
    import torchvision  # pylint: disable=g-import-not-at-top
    reference = getattr(torchvision.models, f'resnet{args.depth}')()
    expected = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith('fc.'))
    got = sum(p.numel() for p in ResNet(args.depth).parameters())
    assert got == expected, (got, expected)
    print(f'encoder parameters match torchvision resnet{args.depth}: {got:,}', flush=True)

  loss_name, contrastive = make_loss(args.loss, args.temperature)
  if args.optimizer == 'lars':
    optimizer = Lars(model, args.learning_rate, args.weight_decay, args.momentum)
  else:
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate,
                                momentum=args.momentum, weight_decay=args.weight_decay,
                                foreach=True)
  b, size = args.batch_size, args.image_size
  views = torch.rand(b, 2, 3, size, size, device=device)
  images = views.reshape(2 * b, 3, size, size).contiguous(memory_format=memory_format)
  labels = torch.randint(0, max(args.num_classes, 1), (b,), device=device).repeat_interleave(2)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=args.dtype == 'bfloat16')

  def forward_loss(images, labels):
    with autocast:
      z, logits = model(images)
      z = z.reshape(b, 2, -1)
      loss = contrastive(z[:, 0], z[:, 1])
      if logits is not None:
        loss = loss + F.cross_entropy(logits.float(), labels)
    return loss

  forward = torch.compile(forward_loss) if args.compile else forward_loss

  def step():
    loss = forward(images, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss

  flops = None
  try:
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    with FlopCounterMode(display=False) as counter:
      forward_loss(images, labels).backward()
    flops = counter.get_total_flops()
    optimizer.zero_grad()
  except Exception:  # pylint: disable=broad-except
    pass

  start = time.perf_counter()
  for _ in range(max(args.warmup, 1)):
    loss = step()
  _sync(device)
  warmup_s = time.perf_counter() - start
  num_windows = max(1, min(args.windows, args.steps))
  sizes = [args.steps // num_windows + (i < args.steps % num_windows) for i in range(num_windows)]
  windows, cpu = [], []
  for n in sizes:
    cpu_start, start = os.times(), time.perf_counter()
    for _ in range(n):
      loss = step()
    _sync(device)
    windows.append((time.perf_counter() - start) / n)
    cpu_end = os.times()
    cpu.append((cpu_end.user + cpu_end.system - cpu_start.user - cpu_start.system) / n)
  step_s = _median(windows)
  result = {
      'framework': f'torch {torch.__version__}', 'device': str(device),
      'device_name': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
      'threads': torch.get_num_threads() if device.type == 'cpu' else None,
      'dtype': args.dtype, 'optimizer': args.optimizer, 'loss': loss_name,
      'channels_last': bool(args.channels_last), 'compiled': args.compile,
      'step_s_median': step_s, 'window_step_s': windows, 'warmup_s': warmup_s,
      'cpu_s_per_step': _median(cpu),
      'images_per_s': b / step_s, 'views_per_s': 2 * b / step_s,
      'matmul_conv_flops': flops,
      'achieved_flops': flops / step_s if flops else None,
      'peak_device_bytes': (torch.cuda.max_memory_allocated() if device.type == 'cuda'
                            else None),
      'params': counts, 'loss_after': float(loss.detach()),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
