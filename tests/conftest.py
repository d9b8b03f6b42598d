"""Test set-up: 8 forced CPU devices, set before JAX initialises its backends.

Tests that need one device build a mesh over `jax.devices()[:1]`; tests that compare device
counts build meshes over 1, 2, 4 or 8 of these devices in the same process.
"""

import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
