"""The step FLOP count of benchmarks/step_timing.py (MFU's numerator) against hand counts."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import step_timing  # noqa: E402

# NHWC input, HWIO kernel: batch 4, 8x8 pixels, 3 -> 5 channels, 3x3 window, stride 2, SAME.
B, H, C_IN, C_OUT, K, STRIDE = 4, 8, 3, 5, 3, 2
H_OUT = H // STRIDE
CONV_MACS = B * H_OUT * H_OUT * C_OUT * K * K * C_IN  # Multiply-adds of the forward pass.
DENSE_IN, DENSE_OUT = H_OUT * H_OUT * C_OUT, 7
DENSE_MACS = B * DENSE_IN * DENSE_OUT


def _loss(params, images):
  h = jax.lax.conv_general_dilated(images, params['conv'], (STRIDE, STRIDE), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.sum(jnp.tanh(h.reshape(B, -1) @ params['dense']))


def _inputs():
  rng = np.random.default_rng(0)
  params = {'conv': rng.normal(size=(K, K, C_IN, C_OUT)).astype(np.float32),
            'dense': rng.normal(size=(DENSE_IN, DENSE_OUT)).astype(np.float32)}
  return params, rng.normal(size=(B, H, H, C_IN)).astype(np.float32)


def test_forward_counts_two_flops_per_multiply_add():
  jaxpr = jax.jit(_loss).trace(*_inputs()).jaxpr
  assert step_timing.matmul_conv_flops(jaxpr) == 2 * (CONV_MACS + DENSE_MACS)


def test_gradient_counts_useful_work_of_strided_convolutions():
  # Parameter gradients: the dense layer's input and kernel gradients (2 x its forward), the
  # convolution's kernel gradient (1 x); its input gradient is not needed (images are data).
  jaxpr = jax.jit(jax.value_and_grad(_loss)).trace(*_inputs()).jaxpr
  assert step_timing.matmul_conv_flops(jaxpr) == 2 * (2 * CONV_MACS + 3 * DENSE_MACS)
  # With the images' gradient too, the stride-2 convolution's input gradient (a convolution
  # over a zero-dilated input) counts the forward's multiply-adds, not 4x them.
  jaxpr = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1))).trace(*_inputs()).jaxpr
  assert step_timing.matmul_conv_flops(jaxpr) == 2 * (3 * CONV_MACS + 3 * DENSE_MACS)


def test_shard_map_body_counts_per_device_and_the_rest_split_over_devices():
  devices = 8
  mesh = jax.make_mesh((devices,), ('data',), devices=jax.devices()[:devices])
  x = jax.device_put(np.ones((16, 4), np.float32), NamedSharding(mesh, P('data')))
  w = jax.device_put(np.ones((4, 3), np.float32), NamedSharding(mesh, P()))

  def step(x, w):
    local = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P('data'), P()),
                          out_specs=P('data'))(x, w)
    return local + x @ w  # The same product once more, outside shard_map: global.

  jaxpr = jax.jit(step).trace(x, w).jaxpr
  per_device = 2 * (16 // devices) * 4 * 3
  assert step_timing.matmul_conv_flops(jaxpr, devices) == per_device + 2 * 16 * 4 * 3 / devices


def test_cond_counts_its_costliest_branch_once():
  x, w = np.ones((6, 4), np.float32), np.ones((4, 3), np.float32)

  def step(pred, x, w):
    return jax.lax.cond(pred, lambda: x @ w, lambda: x @ w + (x + 1) @ w)  # 1 or 2 products.

  jaxpr = jax.jit(step).trace(True, x, w).jaxpr
  assert step_timing.matmul_conv_flops(jaxpr) == 2 * (2 * 6 * 4 * 3)
