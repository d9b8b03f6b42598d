"""PyTorch side of benchmarks/conv_breakdown.py (runs in the peer venv).

Reads a JSON list of convolution shapes on stdin; prints a JSON list of (forward, dx, dw) median
ms per shape: channels-last fp32 nn.Conv2d; dx and dw are the time of forward + that gradient
minus the forward, since autograd needs the forward graph.
"""

import argparse
import json
import sys
import time

import torch


def time_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - start))
  return sorted(times)[len(times) // 2]


def conv_times(shape, repeats):
  (top, bottom), (left, right) = shape['padding']
  if not top == bottom == left == right:
    raise ValueError(f'asymmetric padding {shape["padding"]} has no nn.Conv2d equivalent')
  conv = torch.nn.Conv2d(shape['cin'], shape['cout'], shape['kernel'], shape['stride'],
                         padding=top, bias=False).to(memory_format=torch.channels_last)
  x = torch.randn(shape['batch'], shape['cin'], shape['size'], shape['size'])
  x = x.to(memory_format=torch.channels_last).requires_grad_()
  dy = torch.ones_like(conv(x))
  with torch.no_grad():
    forward = time_ms(lambda: conv(x), repeats)
  dx = time_ms(lambda: torch.autograd.grad(conv(x), [x], dy), repeats)
  dw = time_ms(lambda: torch.autograd.grad(conv(x), [conv.weight], dy), repeats)
  return forward, max(dx - forward, 0.0), max(dw - forward, 0.0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--threads', type=int, default=1)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  print(json.dumps([conv_times(shape, args.repeats) for shape in json.load(sys.stdin)]))


if __name__ == '__main__':
  main()
