"""The pretraining loop: resume, device-count invariance and bad input (tiny model and data)."""

import errno
import json
import os
import shutil
import signal
import types

import jax
import numpy as np
import pytest

from conftest import count_compilations, store_tiny_dataset, tiny_pretrain_config
from simclr_jax import checkpointing
from simclr_jax import data
from simclr_jax import errors
from simclr_jax import eval_setup
from simclr_jax import mesh as mesh_lib
from simclr_jax import metrics_writer
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
  # A longer run changes the learning-rate schedule: refused, unless allowed.
  workdir = str(tmp_path / 'longer')
  shutil.copytree(uninterrupted, workdir)
  longer = tiny_pretrain_config(tiny_data_dir, num_train_steps=6)
  with pytest.raises(errors.UserError, match='num_train_steps: checkpoint 4, now 6'):
    pretrain.run(longer, workdir)
  pretrain.run(longer, workdir, allow_config_change=True)
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(workdir, 'config_to_step4.json')) as f:
    assert json.load(f)['num_train_steps'] == 4
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_train_steps'] == 6


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
    ({'batch_size': -32}, 'batch_size must be positive'),
    ({'log_every_steps': 0}, 'log_every_steps must be at least 1, got 0'),
    ({'keep_checkpoints': 0}, 'keep_checkpoints must be at least 1, got 0'),
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
  longer = tiny_pretrain_config(tiny_data_dir, num_train_steps=6)
  with pytest.raises(errors.UserError, match='num_train_steps: checkpoint 4, now 6'):
    pretrain.plan(longer, uninterrupted)  # As the run itself would.
  assert pretrain.plan(longer, uninterrupted, allow_config_change=True).endswith(
      'resumes from step 4')


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


# Failure behaviour (docs/design.md): config changes, damaged checkpoints, signals, duplicates.

def _damage(workdir, step):
  """Flips bytes in the middle of the largest file of a checkpoint (its size stays the same)."""
  step_dir = os.path.join(workdir, 'checkpoints', str(step))
  files = [os.path.join(parent, name) for parent, _, names in os.walk(step_dir) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.seek(os.path.getsize(largest) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))
  return largest


def test_resume_with_another_training_config_is_refused(uninterrupted, tiny_data_dir, tmp_path):
  workdir = str(tmp_path / 'changed')
  shutil.copytree(uninterrupted, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = f.read()
  changed = tiny_pretrain_config(tiny_data_dir, batch_size=32, learning_rate=0.5)
  with count_compilations() as compilations, pytest.raises(
      errors.UserError, match=r'another config \(batch_size: checkpoint 16, now 32; '
                              r'learning_rate: checkpoint 1.0, now 0.5\)'):
    pretrain.run(changed, workdir)
  assert compilations == []
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == recorded
  # Bookkeeping may change; the run is complete, so nothing more is trained.
  pretrain.run(tiny_pretrain_config(tiny_data_dir, log_every_steps=2, keep_checkpoints=5),
               workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['log_every_steps'] == 2


def test_only_training_fields_of_both_configs_count_as_changes():
  saved = {'model': {'depth': 18}, 'image_size': 16, 'num_classes': 4,
           'config': {'batch_size': 16, 'log_every_steps': 1, 'monitor': {'k': 5},
                      'data': {'data_dir': '/a', 'augment': {'color_strength': 0.5}}}}
  now = json.loads(json.dumps(saved))
  now['config'].update(log_every_steps=5, monitor={'k': 7}, added_since=3)
  now['config']['data']['data_dir'] = '/b'
  assert checkpointing.check_resumable(saved, now, 4, 'w') == []
  now['config']['data']['augment']['color_strength'] = 1.0
  with pytest.raises(errors.UserError, match='color_strength: checkpoint 0.5, now 1.0'):
    checkpointing.check_resumable(saved, now, 4, 'w')
  assert checkpointing.check_resumable(saved, now, 4, 'w', allow_config_change=True) == [
      'data.augment.color_strength: checkpoint 0.5, now 1.0']


def test_damaged_latest_checkpoint_falls_back_and_resumes_exactly(uninterrupted, tiny_data_dir,
                                                                  tmp_path, caplog):
  workdir = str(tmp_path / 'damaged')
  shutil.copytree(uninterrupted, workdir)
  damaged_file = _damage(workdir, 4)
  checkpointer = checkpointing.Checkpointer(workdir, create=False)
  assert checkpointer.damage(2) is None
  assert damaged_file in checkpointer.damage(4)
  assert checkpointer.latest_intact_step() == 2
  assert checkpointing.open_saved_run(workdir).step == 2  # What run_eval evaluates.

  pretrain.run(tiny_pretrain_config(tiny_data_dir), workdir)
  assert f'Passing over the checkpoint of step 4: {damaged_file}' in caplog.text
  # The steps the damaged checkpoint held are trained again, and logged once.
  resumed, reference = read_metrics(workdir), read_metrics(uninterrupted)
  assert [r['step'] for r in resumed] == [1, 2, 3, 4]
  np.testing.assert_allclose([r['loss'] for r in resumed], [r['loss'] for r in reference],
                             rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, restored_params(workdir, 4),
               restored_params(uninterrupted, 4))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4.damaged'))
  assert checkpointing.Checkpointer(workdir, create=False).damage(4) is None


def test_no_intact_checkpoint_is_one_line(uninterrupted, tiny_data_dir, tmp_path):
  workdir = str(tmp_path / 'all_damaged')
  shutil.copytree(uninterrupted, workdir)
  _damage(workdir, 4)
  os.remove(os.path.join(workdir, 'checkpoints', '2.sha256.json'))  # An unfinished save.
  with pytest.raises(errors.UserError, match=r'No intact checkpoint in .*checkpoints \(steps 2, 4'):
    pretrain.run(tiny_pretrain_config(tiny_data_dir), workdir)
  with pytest.raises(errors.UserError, match=r'No intact checkpoint'):
    checkpointing.open_saved_run(workdir)
  with pytest.raises(errors.UserError, match=r'step 4 is damaged: .* does not match its checksum'):
    checkpointing.open_saved_run(workdir, step=4)
  # Checkpoints from before there were checksums (none in the directory) are used unverified.
  os.remove(os.path.join(workdir, 'checkpoints', '4.sha256.json'))
  assert checkpointing.open_saved_run(workdir).step == 4


def test_signal_checkpoints_and_exits_with_128_plus_signal(tiny_data_dir, tmp_path, monkeypatch):
  def log_and_signal(step, total_steps, record):
    if step == 1:
      signal.raise_signal(signal.SIGTERM)
  monkeypatch.setattr(metrics_writer, 'log_progress', log_and_signal)
  workdir = str(tmp_path / 'signalled')
  with pytest.raises(SystemExit) as exit_info:
    pretrain.run(tiny_pretrain_config(tiny_data_dir), workdir)
  assert exit_info.value.code == 128 + signal.SIGTERM
  checkpointer = checkpointing.Checkpointer(workdir, create=False)
  assert checkpointer.all_steps() == [2] and checkpointer.damage(2) is None  # Stopped at 2.


def test_resume_drops_metrics_rows_after_the_checkpoint(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [json.dumps({'step': step, 'loss': float(step)}) for step in range(1, 9)]
  path.write_text('\n'.join(rows) + '\n{"step": 9, "lo')  # Killed while writing step 9.
  metrics_writer.MetricWriter(str(tmp_path), after_step=5).write(6, {'loss': 0.5})
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_saving_is_one_line(uninterrupted, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'full')
  shutil.copytree(uninterrupted, workdir)
  checkpointer = checkpointing.Checkpointer(workdir)
  partial = os.path.join(checkpointer.directory, '6.orbax-checkpoint-tmp-1')
  os.makedirs(partial)

  def save_on_a_full_disk(*args, **kwargs):
    raise RuntimeError('Save failed') from OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(checkpointer._manager, 'save', save_on_a_full_disk)
  state = types.SimpleNamespace(step=np.int32(6), params={}, batch_stats={}, opt_state={},
                                rng=None)
  with pytest.raises(errors.UserError, match='No space left on the disk of .* while saving step '
                                             '6; the last intact checkpoint is step 4'):
    checkpointer.save(state, {})
  assert not os.path.exists(partial)
