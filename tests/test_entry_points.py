"""run_pretrain.py as a user meets it: one-line mistakes, its console, and an image folder from
prepare_data through pretraining to evaluation (tiny model and images)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import eval as eval_config
from simclr_jax import evaluate
from simclr_jax import prepare_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_PREFIX = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')
TINY_RUN = ('--config.data.image_size=16', '--config.batch_size=16',
            '--config.model.width_multiplier=0.125', '--config.num_train_steps=2',
            '--config.log_every_steps=1')


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _run_pretrain(*args):
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  return subprocess.run([sys.executable, 'run_pretrain.py', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--config.data.dataset=cifar100x'], "Unknown dataset 'cifar100x'"),
    (['--config.batchsize=64'], "unknown config field 'batchsize'; did you mean "
                                '--config.batch_size?'),
])
def test_mistakes_end_with_one_line_and_status_2(tmp_path, args, message):
  workdir = str(tmp_path / 'run')  # A workdir that is a file: test_pretrain.py, in process.
  result = _run_pretrain(f'--workdir={workdir}', '--dry_run', *args)
  assert result.returncode == 2
  [line] = result.stderr.splitlines()
  assert line.startswith('run_pretrain.py: error: ') and message in line
  assert not os.path.exists(workdir)


def _image_folder(root):
  """root/{train,test}/{red,blue}/*.png: noise over a red or a blue image, 20x20."""
  rng = np.random.RandomState(0)
  for split, per_class in (('train', 12), ('test', 4)):
    for channel, name in ((0, 'red'), (2, 'blue')):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        image = rng.randint(0, 96, (20, 20, 3)).astype(np.uint8)
        image[..., channel] += 150
        Image.fromarray(image).save(folder / f'{i}.png')


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path):
  _image_folder(tmp_path / 'images')
  data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
  prepare_data.prepare('my_images', source=str(tmp_path / 'images'), data_dir=data_dir)
  result = _run_pretrain(f'--workdir={workdir}', '--config.data.dataset=my_images',
                         f'--config.data.data_dir={data_dir}', *TINY_RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  assert "my_images 'train': 24 examples (20x20x3, 2 classes)" in lines[0]
  # Not a terminal: a plain progress line per logged step, and no third-party log lines.
  assert [line.split()[1] for line in lines if line.startswith('pretrain ')] == ['1/2', '2/2']
  assert not [line for line in lines if ABSL_PREFIX.match(line)]
  with open(os.path.join(workdir, 'log.txt')) as f:
    assert 'step 2/2' in f.read()  # The whole record, in the log file only.

  config = eval_config.get_config()
  config.protocol, config.batch_size, config.knn.k = 'knn', 8, 5
  results = evaluate.evaluate(config, workdir)
  assert (results['dataset'], results['eval_split'], results['num_train_examples']) == (
      'my_images', 'test', 24)
  assert results['top1'] >= 0.75  # Red or blue: 8 test images, chance 0.5.


def test_visualize_curves_without_tensorflow_noise(tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'eval').mkdir(parents=True)
  rows = [{'step': s, 'epoch': s / 10, 'loss': 9.0 - s / 10, 'chance_loss': 9.7,
           'contrastive_acc': s / 40, 'probe_acc': s / 30} for s in (10, 20, 30)]
  rows[-1]['knn_top1'] = 0.6  # The monitor's value rides on the step's record, as in training.
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (workdir / 'eval' / 'results.jsonl').write_text('{"step": 30, "knn/top1": 0.7}\n')
  out = tmp_path / 'curves.png'
  result = subprocess.run([sys.executable, '-m', 'simclr_jax.visualize', f'--workdir={workdir}',
                           f'--out={out}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout == f'Wrote {out}\n' and result.stderr == ''
  assert Image.open(out).size[0] > 0
