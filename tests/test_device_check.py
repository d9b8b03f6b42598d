"""The CPU dry run of benchmarks/device_check.sh: every part, and the JSON other tooling reads."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, '.venv', 'bin')

STEP_PARTS = ['jax/r18_cifar_bf16', 'supervised/r18_cifar_bf16', 'jax/r18_cifar_fp32',
              'jax/r50_224_bf16']
TORCH_PARTS = ['torch_eager/r18_cifar_bf16', 'torch_eager/r50_224_bf16',
               'torch_eager/r18_cifar_fp32', 'torch_compile/r18_cifar_bf16']


@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path / 'out'),
             PATH=VENV_BIN + os.pathsep + os.environ['PATH'])
  env.pop('XLA_FLAGS', None)  # conftest's 8 forced devices; the dry run uses one.
  result = subprocess.run(['bash', 'benchmarks/device_check.sh', '--dry_run'], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:]
  with open(tmp_path / 'out' / 'device_check.json') as f:
    parts = {p['part']: p for p in json.load(f)}
  assert list(parts) == ['environment', *STEP_PARTS[:2], TORCH_PARTS[0], 'e2e/fashion_mnist',
                         *STEP_PARTS[2:], *TORCH_PARTS[1:]]
  assert parts['environment']['platform'] == 'cpu'
  for name in STEP_PARTS + ['e2e/fashion_mnist']:
    assert 'error' not in parts[name], parts[name]
    assert parts[name]['images_per_sec'] > 0 and parts[name]['ms_per_step'] > 0
  for name in STEP_PARTS:
    assert parts[name]['compile_s'] > 0 and parts[name]['tflops_per_sec'] > 0
  assert parts['supervised/r18_cifar_bf16']['contrastive_cost_ratio'] > 0
  e2e = parts['e2e/fashion_mnist']
  assert e2e['seconds_per_epoch'] > 0 and e2e['epochs'] >= 1
  # 10 classes: chance is 0.1; the statistic is only asserted to be a probability here.
  assert 0 <= e2e['knn_top1'] <= 1 and 0 <= e2e['linear_features_top1'] <= 1
  for name in TORCH_PARTS:  # Measured where torch imports, else skipped with a reason.
    assert 'images_per_sec' in parts[name] or parts[name].get('skipped'), parts[name]
  table = (tmp_path / 'out' / 'device_check.md').read_text()
  assert all(f'| {name} |' in table for name in STEP_PARTS + TORCH_PARTS)
