"""The pretraining loop: resume, device-count invariance and bad input (tiny model and data)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import count_compilations, store_tiny_dataset, tiny_pretrain_config
from simclr_jax import checkpointing
from simclr_jax import data
from simclr_jax import errors
from simclr_jax import eval_setup
from simclr_jax import mesh as mesh_lib
from simclr_jax import models
from simclr_jax import pretrain
from simclr_jax import protocols


pytestmark = pytest.mark.usefixtures('fast_compiles')


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def restored_params(workdir, step):
  checkpointer = checkpointing.Checkpointer(workdir, create=False)
  model = checkpointer.restore_model(step, None)
  checkpointer.close()
  return model['params']


@pytest.fixture(scope='module')
def uninterrupted(tiny_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  pretrain.run(tiny_pretrain_config(tiny_data_dir), workdir)
  return workdir


def test_writes_metrics_and_checkpoints(uninterrupted):
  records = read_metrics(uninterrupted)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  for key in ('loss', 'contrastive_acc', 'learning_rate', 'images_per_sec', 'probe_acc'):
    assert all(np.isfinite(r[key]) for r in records), key
  # Chance level of the objective (loss_a + loss_b) with 2N = 32 views is 2 log(31).
  assert records[0]['chance_loss'] == pytest.approx(2 * np.log(31), rel=1e-5)
  assert checkpointing.Checkpointer(uninterrupted, create=False).all_steps() == [2, 4]


def test_restart_after_crash_resumes_exactly(uninterrupted, tiny_data_dir, tmp_path):
  # A crash after the step-2 checkpoint: copy the run, drop what came after step 2, rerun.
  workdir = str(tmp_path / 'crashed')
  shutil.copytree(uninterrupted, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  os.remove(os.path.join(workdir, 'metrics.jsonl'))

  pretrain.run(tiny_pretrain_config(tiny_data_dir), workdir)

  resumed, reference = read_metrics(workdir), read_metrics(uninterrupted)
  assert [r['step'] for r in resumed] == [3, 4]
  np.testing.assert_allclose([r['loss'] for r in resumed],
                             [r['loss'] for r in reference[2:]], rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, restored_params(workdir, 4),
               restored_params(uninterrupted, 4))


def test_longer_rerun_continues_from_checkpoint(uninterrupted, tiny_data_dir, tmp_path):
  workdir = str(tmp_path / 'longer')
  shutil.copytree(uninterrupted, workdir)
  pretrain.run(tiny_pretrain_config(tiny_data_dir, num_train_steps=6), workdir)
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]


def test_one_and_eight_devices_give_the_same_losses(uninterrupted, tiny_data_dir, tmp_path):
  assert jax.device_count() == 8
  workdir = str(tmp_path / 'one_device')
  pretrain.run(tiny_pretrain_config(tiny_data_dir), workdir,
                              mesh=mesh_lib.create_mesh(jax.devices()[:1]))
  one, eight = read_metrics(workdir), read_metrics(uninterrupted)
  for key in ('loss', 'contrastive_acc', 'probe_loss'):
    np.testing.assert_allclose([r[key] for r in one], [r[key] for r in eight],
                               rtol=2e-5, atol=1e-6, err_msg=key)


def test_unlabelled_dataset_trains_without_the_probe(tmp_path):
  data_dir = store_tiny_dataset(str(tmp_path / 'tfds'), name='tiny_unlabelled', labelled=False)
  config = tiny_pretrain_config(data_dir, num_train_steps=2, **{'data.dataset': 'tiny_unlabelled'})
  record = pretrain.run(config, str(tmp_path / 'run'))
  assert np.isfinite(record['loss']) and 'probe_acc' not in record


@pytest.mark.parametrize('overrides, match', [
    ({'batch_size': 12}, 'not divisible by the 8 devices'),
    ({'batch_size': 0}, 'batch_size must be positive'),
    ({'data.image_size': 32}, 'image_size=32 exceeds the 16x16 images'),
    ({'data.train_split': 'validation'}, 'no split'),
    ({'data.dataset': 'no_such_dataset'}, "Unknown dataset 'no_such_dataset'"),
    ({'temperature': 0.0}, 'temperature must be positive'),
    ({'model.depth': 19}, 'Unsupported ResNet depth 19'),
])
def test_bad_input_fails_before_compiling(tiny_data_dir, tmp_path, overrides, match):
  with count_compilations() as compilations, pytest.raises(errors.UserError, match=match):
    pretrain.run(tiny_pretrain_config(tiny_data_dir, **overrides), str(tmp_path))
  assert compilations == []


def test_workdir_that_is_a_file_is_refused(tiny_data_dir, tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(errors.UserError, match='is a file, not a directory'):
    pretrain.run(tiny_pretrain_config(tiny_data_dir), str(tmp_path / 'file' / 'run'))


def test_plan_describes_the_run_without_compiling_or_writing(uninterrupted, tiny_data_dir,
                                                              tmp_path):
  fresh = str(tmp_path / 'fresh')
  with count_compilations() as compilations:
    text = pretrain.plan(tiny_pretrain_config(tiny_data_dir), fresh)
  assert compilations == [] and not os.path.exists(fresh)
  # 96 examples in batches of 16: 6 steps per epoch; warmup 0.5 epochs = 3 steps; the linear
  # scaling makes the base rate 1.0 a peak of 16 / 256.
  assert "tiny_images 'train': 96 examples (16x16x3, 4 classes)" in text
  assert '4 = 0.667 epochs of 6 steps; global batch 16 on 8 cpu device(s)' in text
  assert 'warmup over 3 steps to 0.0625, cosine to 0 at step 4' in text
  assert text.endswith(f'{fresh}: fresh run')
  done = pretrain.plan(tiny_pretrain_config(tiny_data_dir), uninterrupted)
  assert done.endswith('complete (step 4): nothing to do')
  longer = pretrain.plan(tiny_pretrain_config(tiny_data_dir, num_train_steps=6), uninterrupted)
  assert longer.endswith('resumes from step 4')


def test_checkpoint_of_another_model_is_refused(uninterrupted, tiny_data_dir, tmp_path):
  workdir = str(tmp_path / 'other')
  shutil.copytree(uninterrupted, workdir)
  config = tiny_pretrain_config(tiny_data_dir)
  config.model.depth = 34
  with pytest.raises(ValueError, match='different model.*model.depth: checkpoint 18, now 34'):
    pretrain.run(config, workdir)


def test_nan_loss_stops_and_keeps_only_finite_checkpoints(tiny_data_dir, tmp_path):
  # Warmup over 3 steps: step 1 runs at lr 0 and is checkpointed; then lr ~1e30 blows up.
  config = tiny_pretrain_config(tiny_data_dir, num_train_steps=6, learning_rate=1e30,
                                weight_decay=0.0, checkpoint_every_steps=1)
  with pytest.raises(FloatingPointError, match='not finite|Loss is nan'):
    pretrain.run(config, str(tmp_path))
  steps = checkpointing.Checkpointer(str(tmp_path), create=False).all_steps()
  assert 1 in steps and max(steps) < 6
  for step in steps:
    params = restored_params(str(tmp_path), step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step


@pytest.fixture(scope='module')
def memory_run(tiny_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('memory'))
  pretrain.run(tiny_pretrain_config(tiny_data_dir, **{'data.source': 'memory'}), workdir)
  return workdir


def test_memory_source_trains_and_resumes_exactly(memory_run, tiny_data_dir, tmp_path):
  reference = read_metrics(memory_run)
  assert [r['step'] for r in reference] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) and np.isfinite(r['probe_acc']) for r in reference)
  workdir = str(tmp_path / 'crashed')
  shutil.copytree(memory_run, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  pretrain.run(tiny_pretrain_config(tiny_data_dir, **{'data.source': 'memory'}), workdir)
  resumed = read_metrics(workdir)
  assert [r['step'] for r in resumed] == [3, 4]
  np.testing.assert_allclose([r['loss'] for r in resumed], [r['loss'] for r in reference[2:]],
                             rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, restored_params(workdir, 4),
               restored_params(memory_run, 4))


def test_memory_source_one_and_eight_devices_give_the_same_losses(memory_run, tiny_data_dir,
                                                                  tmp_path):
  workdir = str(tmp_path / 'one_device')
  pretrain.run(tiny_pretrain_config(tiny_data_dir, **{'data.source': 'memory'}), workdir,
               mesh=mesh_lib.create_mesh(jax.devices()[:1]))
  one, eight = read_metrics(workdir), read_metrics(memory_run)
  for key in ('loss', 'contrastive_acc', 'probe_loss'):
    np.testing.assert_allclose([r[key] for r in one], [r[key] for r in eight],
                               rtol=2e-5, atol=1e-6, err_msg=key)


def test_knn_monitor_matches_numpy_and_leaves_training_unchanged(uninterrupted, tiny_data_dir,
                                                                 tmp_path):
  config = tiny_pretrain_config(tiny_data_dir, eval_every_steps=2,
                                **{'monitor.bank_split': 'train[:75%]',
                                   'monitor.query_split': 'train[75%:]', 'monitor.k': 5})
  workdir = str(tmp_path / 'monitored')
  pretrain.run(config, workdir)
  records, reference = read_metrics(workdir), read_metrics(uninterrupted)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert [r['step'] for r in records if 'knn_top1' in r] == [2, 4]
  np.testing.assert_array_equal([r['loss'] for r in records], [r['loss'] for r in reference])

  # The monitor's value at step 4 against a NumPy kNN on the checkpoint's features.
  mesh = mesh_lib.create_mesh()
  model = models.create_model(config.model, num_classes=4)
  variables = checkpointing.Checkpointer(workdir, create=False).restore_model(4, None)
  encoder = eval_setup.Encoder(model, variables, 4)
  splits = [data.open_split(config.data, s) for s in ('train[:75%]', 'train[75%:]')]
  with jax.set_mesh(mesh):
    bank, queries = (jax.device_get(protocols.extract_features(
        encoder, data.eval_batches(split, mesh, batch_size=16), mesh)) for split in splits)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  keys, key_labels = unit(bank['features'][bank['mask']]), bank['label'][bank['mask']]
  correct = []
  for feature, label in zip(unit(queries['features'][queries['mask']]),
                            queries['label'][queries['mask']]):
    similarity = keys @ feature
    scores = np.zeros(4)
    for j in np.argsort(-similarity)[:5]:
      scores[key_labels[j]] += np.exp(similarity[j] / 0.1)
    correct.append(np.argmax(scores) == label)
  assert records[-1]['knn_top1'] == pytest.approx(np.mean(correct))
