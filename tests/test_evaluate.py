"""Evaluation: checkpoint restore, kNN, logistic regression, top-k, label fractions, the online
probe's gradients, bad input, and every protocol end to end on the tiny dataset."""

import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs import eval as eval_config
from conftest import TINY_IMAGE_SIZE, TINY_NUM_CLASSES, count_compilations, tiny_pretrain_config
from simclr_jax import checkpointing
from simclr_jax import console
from simclr_jax import data
from simclr_jax import errors
from simclr_jax import eval_setup
from simclr_jax import evaluate
from simclr_jax import knn
from simclr_jax import logistic_regression
from simclr_jax import mesh as mesh_lib
from simclr_jax import models
from simclr_jax import pretrain
from simclr_jax import protocols
from simclr_jax import train_state as train_state_lib
from simclr_jax import workdir_lock

STEP = 3


pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(scope='module')
def pretrain_run(tiny_data_dir, tmp_path_factory):
  """A workdir as run_pretrain.py leaves it: config.json and a checkpoint of step 3, whose
  batch_stats are not the initial ones. Returns (workdir, saved state)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_pretrain_config(tiny_data_dir)
  model = models.create_model(config.model, num_classes=TINY_NUM_CLASSES)
  state = train_state_lib.create_train_state(model, optax.sgd(0.1), jax.random.key(1),
                                             image_size=TINY_IMAGE_SIZE)
  rng = np.random.default_rng(0)
  state = state.replace(step=jnp.asarray(STEP, jnp.int32), batch_stats=jax.tree.map(
      lambda x: jnp.asarray(rng.uniform(0.5, 2, x.shape), x.dtype), state.batch_stats))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(state, checkpointing.run_metadata(config, TINY_NUM_CLASSES))
  checkpointer.wait_until_finished()
  checkpointer.close()
  return workdir, jax.device_get(state)


def _eval_config(protocol='knn', **overrides):
  config = eval_config.get_config()
  config.protocol = protocol
  config.batch_size = 16
  config.log_every_steps = 2
  config.knn.k = 10
  config.linear.num_epochs = 1
  config.finetune.num_epochs = 1
  config.finetune.label_fraction = 0.5
  config.linear_features.l2_grid = (1e-3, 1e-1)
  config.linear_features.max_steps = 20
  config.update_from_flattened_dict(overrides)
  return config


def test_restore_is_bit_identical(pretrain_run):
  workdir, saved = pretrain_run
  mesh = mesh_lib.create_mesh()
  evaluation = eval_setup.prepare(_eval_config(), workdir, None, mesh)
  encoder = eval_setup.load_encoder(evaluation, mesh)
  assert evaluation.saved.step == encoder.step == STEP
  for collection in ('params', 'batch_stats'):
    restored = jax.device_get(encoder.variables[collection])
    expected = getattr(saved, collection)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)


def _copy_run(pretrain_run, tmp_path, keep_checkpoints=True):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(pretrain_run[0], workdir)
  if not keep_checkpoints:
    shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  return workdir


@pytest.fixture(scope='module')
def unlabelled_data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('unlabelled'))
  images = [(i, {'image': np.zeros((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), np.uint8)})
            for i in range(4)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name='tiny_unlabelled', version='1.0.0', data_dir=path,
      features=tfds.features.FeaturesDict({'image': tfds.features.Image(
          shape=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3))}),
      split_datasets={'train': images, 'test': images})
  return path


@pytest.mark.parametrize('case, overrides, match', [
    ('missing', {}, 'does not exist'),
    ('empty', {}, 'No checkpoint in'),
    ('no_checkpoint', {}, 'No checkpoint in .*random_init=True'),
    ('no_checkpoint', {'random_init': True, 'data.dataset': 'nowhere'},
     "Unknown dataset 'nowhere'"),
    ('empty', {'random_init': True}, 'is missing or empty'),
    ('bad_step', {}, 'No checkpoint of step 5 in .*; available steps: 3'),
    ('ok', {'protocol': 'svm'}, "Unknown protocol 'svm'"),
    ('ok', {'protocol': 'linear', 'features': 'pixels'}, 'pixels works with'),
    ('ok', {'protocol': 'finetune', 'finetune.label_fraction': 0.02},
     'keeps 2 of 96 examples, which leaves some of the 4 classes empty'),
    ('ok', {'protocol': 'finetune', 'finetune.proj_layers': 2}, 'has 1 hidden layers'),
    ('ok', {'protocol': 'finetune', 'finetune.optimizer': 'adam'}, "Unknown optimizer 'adam'"),
    ('ok', {'protocol': 'linear', 'linear.feature_norm': 'layernorm'},
     "Unknown linear.feature_norm 'layernorm'"),
    ('ok', {'data.train_split': 'validation'}, 'no split .*validation'),
    ('ok', {'batch_size': 12}, 'not divisible by the 8 devices'),
    ('ok', {'batch_size': 0}, 'batch_size must be positive'),
    ('unlabelled', {}, 'tiny_unlabelled has no labels'),
])
def test_errors_before_compiling(pretrain_run, unlabelled_data_dir, tmp_path, case, overrides,
                                 match):
  workdir = {
      'missing': lambda: str(tmp_path / 'nowhere'),
      'empty': lambda: str(tmp_path),
      'no_checkpoint': lambda: _copy_run(pretrain_run, tmp_path, keep_checkpoints=False),
  }.get(case, lambda: pretrain_run[0])()
  config = _eval_config(**overrides)
  if case == 'unlabelled':
    config.data.dataset, config.data.data_dir = 'tiny_unlabelled', unlabelled_data_dir
  with count_compilations() as compilations, pytest.raises(errors.UserError, match=match):
    evaluate.evaluate(config, workdir, step=5 if case == 'bad_step' else None)
  assert compilations == []


def test_plan_describes_the_evaluation_without_compiling_or_writing(pretrain_run):
  workdir = pretrain_run[0]
  with count_compilations() as compilations:
    text = evaluate.plan(_eval_config('finetune'), workdir)
  assert compilations == [] and not os.path.exists(os.path.join(workdir, 'eval'))
  # Half of the 96 labelled examples (48), 1 epoch of batch 16: 3 steps.
  assert text.splitlines()[0] == 'protocol finetune: 1 epochs = 3 steps of batch 16'
  assert f'step {STEP} of {workdir}' in text
  assert "48 labelled examples of 'train'" in text and "32 of 'test'" in text
  assert text.endswith(os.path.join(workdir, 'eval', 'finetune_50pct.json'))


@pytest.mark.parametrize('overrides, name', [
    ({'protocol': 'linear', 'linear.label_fraction': 1.0}, 'linear'),
    ({'protocol': 'linear', 'linear.label_fraction': 0.01}, 'linear_1pct'),
    ({'protocol': 'linear', 'linear.feature_norm': 'batchnorm', 'linear.label_fraction': 0.1},
     'linear_bn_10pct'),
    ({'protocol': 'finetune', 'finetune.label_fraction': 0.1, 'random_init': True},
     'finetune_10pct_random_init'),
    ({'protocol': 'knn', 'data.dataset': 'cifar100'}, 'knn_on_cifar100'),
    ({'protocol': 'knn', 'data.dataset': 'tiny'}, 'knn'),  # The run's own dataset.
    ({'protocol': 'linear_features', 'features': 'pixels', 'data.dataset': 'cifar100'},
     'linear_features_on_cifar100_pixels'),
])
def test_result_names_keep_evaluations_apart(overrides, name):
  assert eval_setup.result_name(_eval_config(**overrides), run_dataset='tiny') == name
  assert eval_setup.result_name(_eval_config(**overrides), 'tiny', step=7) == f'{name}_step7'


@pytest.mark.parametrize('overrides, name', [
    ({'protocol': 'knn'}, 'knn'),
    ({'protocol': 'linear_features', 'features': 'pixels'}, 'linear_features_pixels'),
    ({'protocol': 'linear', 'random_init': True}, 'linear_random_init'),
    ({'protocol': 'linear', 'linear.feature_norm': 'batchnorm'}, 'linear_bn'),
    ({'protocol': 'finetune', 'finetune.proj_layers': 1, 'finetune.optimizer': 'lars'},
     'finetune_50pct'),
])
def test_protocols_end_to_end(pretrain_run, tmp_path, overrides, name):
  workdir = _copy_run(pretrain_run, tmp_path)
  results = evaluate.evaluate(_eval_config(**overrides), workdir)
  with open(os.path.join(workdir, 'eval', f'{name}.json')) as f:
    assert json.load(f)['top1'] == results['top1']
  assert 0 <= results['top1'] <= 1 and 'top5' not in results  # 4 classes: no top-5.
  assert results['step'] == (0 if name.endswith(('_pixels', '_random_init')) else STEP)
  assert results['num_train_examples'] == (48 if name == 'finetune_50pct' else 96)
  with open(os.path.join(workdir, 'eval', 'results.jsonl')) as f:
    assert list(json.loads(f.readline())) == ['step', f'{name}/top1']


def test_a_second_writer_of_the_same_evaluation_is_refused(pretrain_run, tmp_path):
  workdir = _copy_run(pretrain_run, tmp_path)
  with workdir_lock.hold(os.path.join(workdir, 'eval'), '.knn.lock'):
    with count_compilations() as compilations, pytest.raises(
        errors.UserError, match=f'eval is in use by pid {os.getpid()}'):
      evaluate.evaluate(_eval_config('knn'), workdir)
  assert compilations == []
  assert not os.path.exists(os.path.join(workdir, 'eval', 'knn.json'))


def _numpy_knn_scores(queries, keys, key_labels, key_valid, num_classes, k, temperature):
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  keys, key_labels = unit(keys[key_valid]), key_labels[key_valid]
  scores = np.zeros((len(queries), num_classes))
  for i, q in enumerate(unit(queries)):
    similarity = keys @ q
    for j in np.argsort(-similarity)[:k]:
      scores[i, key_labels[j]] += np.exp(similarity[j] / temperature)
  return scores


def test_feature_batchnorm_matches_numpy():
  rng = np.random.RandomState(0)
  features = rng.normal(3.0, 2.0, size=(32, 5)).astype(np.float32)
  stats = {'mean': rng.normal(size=5).astype(np.float32),
           'var': rng.uniform(0.5, 2.0, size=5).astype(np.float32)}
  normed, new_stats = protocols.feature_batchnorm(features, stats, train=True)
  mean, var = features.mean(0), ((features - features.mean(0)) ** 2).mean(0)  # Biased.
  np.testing.assert_allclose(normed, (features - mean) / np.sqrt(var + 1e-6), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(new_stats['mean'], 0.9 * stats['mean'] + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(new_stats['var'], 0.9 * stats['var'] + 0.1 * var, rtol=1e-5)
  normed, same = protocols.feature_batchnorm(features, stats, train=False)
  np.testing.assert_allclose(normed, (features - stats['mean']) / np.sqrt(stats['var'] + 1e-6),
                             rtol=1e-4, atol=1e-5)
  assert same is stats


def test_knn_matches_brute_force_numpy():
  rng = np.random.default_rng(0)
  queries, keys = rng.normal(size=(16, 8)), rng.normal(size=(64, 8))
  key_labels = rng.integers(0, 5, 64)
  key_valid = np.arange(64) < 57  # The last rows are padding.
  expected = _numpy_knn_scores(queries, keys, key_labels, key_valid, 5, 7, 0.1)
  mesh = mesh_lib.create_mesh()
  sharded = lambda x: jax.device_put(x, mesh_lib.batch_sharded(mesh))
  scores = jax.jit(lambda q, k, l, v: knn.class_scores(
      q, knn.l2_normalize(k), l, v, num_classes=5, k=7, temperature=0.1))(
          sharded(queries.astype(np.float32)), sharded(keys.astype(np.float32)),
          sharded(key_labels), sharded(key_valid))
  np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_count_correct_matches_numpy_top_k():
  rng = np.random.default_rng(1)
  scores, labels = rng.normal(size=(50, 10)), rng.integers(0, 10, 50)
  mask = np.arange(50) < 45
  ranks = np.argsort(np.argsort(-scores, axis=1), axis=1)[np.arange(50), labels]
  counts = jax.device_get(protocols.count_correct(jnp.asarray(scores), jnp.asarray(labels),
                                                 jnp.asarray(mask)))
  assert counts == {'count': 45, 'top1': np.sum((ranks < 1) & mask),
                    'top5': np.sum((ranks < 5) & mask)}


def test_logistic_regression_separates_a_separable_problem():
  rng = np.random.default_rng(2)
  directions = rng.normal(size=(4, 6))

  def sample(n):
    labels = rng.integers(0, 4, n)
    features = 3 * directions[labels] + 0.3 * rng.normal(size=(n, 6))
    return jnp.asarray(features, jnp.float32), jnp.asarray(labels)

  (train_x, train_y), (test_x, test_y) = sample(400), sample(200)
  weights = jnp.asarray(np.arange(400) < 380, jnp.float32)  # Padding rows with garbage labels.
  train_y = jnp.where(weights > 0, train_y, 3)
  train_x, test_x = logistic_regression.standardize(train_x, weights, test_x)
  holdout = jnp.asarray(rng.random(400) < 0.1)
  params, l2, scores = logistic_regression.fit_with_l2_search(
      train_x, train_y, weights, holdout, (1e-4, 1e-2), num_classes=4, max_steps=100)
  assert set(scores) == {1e-4, 1e-2} and l2 in scores
  ones = jnp.ones(200)
  assert float(logistic_regression.accuracy(params, test_x, test_y, ones)) == 1.0
  assert float(logistic_regression.accuracy(params, train_x, train_y, weights)) == 1.0


def test_label_fraction_is_class_balanced_and_seeded():
  labels = np.repeat(np.arange(10), np.arange(50, 150, 10))  # 50, 60, ..., 140 per class.
  chosen = eval_setup.label_fraction_indices(labels, 0.1, 10, seed=0)
  assert len(chosen) == round(0.1 * len(labels)) == len(set(chosen))
  per_class = np.bincount(labels[chosen], minlength=10)
  assert per_class.max() - per_class.min() == 1 and per_class.min() == 9
  np.testing.assert_array_equal(chosen, eval_setup.label_fraction_indices(labels, 0.1, 10, 0))
  assert not np.array_equal(chosen, eval_setup.label_fraction_indices(labels, 0.1, 10, 1))
  with pytest.raises(errors.UserError, match='leaves some of the 10 classes empty'):
    eval_setup.label_fraction_indices(labels, 0.009, 10, 0)
  with pytest.raises(errors.UserError, match='Class 0 has 50 examples, fewer than the 94'):
    eval_setup.label_fraction_indices(labels, 0.99, 10, 0)


def _tiny_model(num_classes):
  model_config = ml_collections.ConfigDict(tiny_pretrain_config('unused').model.to_dict())
  return models.create_model(model_config, num_classes=num_classes)


def test_online_probe_does_not_reach_the_encoder():
  """The probe loss of pretrain.train_step has zero gradient w.r.t. encoder and head, so adding
  it to the contrastive loss leaves their gradients unchanged (gradients are linear in the loss)."""
  model = _tiny_model(3)
  images = jnp.asarray(np.random.default_rng(3).uniform(size=(4, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)

  def probe_loss(params):
    outputs, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                             train=True, mutable=['batch_stats'])
    return pretrain.probe_loss_and_metrics(outputs['probe_logits'], jnp.asarray([0, 1, 2, 1]))[0]

  grads = jax.device_get(jax.jit(jax.grad(probe_loss))(variables['params']))
  for part in ('encoder', 'head'):
    for leaf in jax.tree.leaves(grads[part]):
      np.testing.assert_array_equal(leaf, 0)
  assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(grads['probe']))


def test_finetune_from_first_projection_layer():
  """trunk_features(proj_layers=1) is ReLU(BN(dense1(h))) of the projection head."""
  model = _tiny_model(0)
  images = jnp.asarray(np.random.default_rng(4).uniform(size=(4, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  rng = np.random.default_rng(5)  # BatchNorm statistics and parameters away from 0 and 1.
  variables = jax.tree.map(lambda x: x * rng.uniform(0.5, 2, x.shape).astype(x.dtype), variables)
  features, _ = protocols.trunk_features(model, variables, images, train=False, proj_layers=1)
  h = model.apply(variables, images, method=models.SimCLRModel.encode)
  dense, bn = variables['params']['head']['dense1'], variables['params']['head']['bn1']
  stats = variables['batch_stats']['head']['bn1']
  y = (h @ dense['kernel'] - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5)
  np.testing.assert_allclose(features, np.maximum(y * bn['scale'] + bn['bias'], 0), atol=1e-5)


@pytest.fixture(scope='module')
def separable_data_dir(tmp_path_factory):
  """4 classes of noisy flat images, one colour per class: linearly separable in the features of
  any encoder that keeps colour, crops and flips included."""
  path = str(tmp_path_factory.mktemp('separable'))
  rng = np.random.default_rng(7)
  colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [128, 128, 128]])

  def examples(n):
    labels = np.arange(n) % TINY_NUM_CLASSES
    images = colours[labels][:, None, None, :] + rng.integers(
        -20, 20, (n, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3))
    return [(i, {'image': images[i].astype(np.uint8), 'label': int(labels[i])})
            for i in range(n)]

  tfds.dataset_builders.store_as_tfds_dataset(
      name='tiny_separable', version='1.0.0', data_dir=path,
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)),
          'label': tfds.features.ClassLabel(num_classes=TINY_NUM_CLASSES)}),
      split_datasets={'train': examples(128), 'test': examples(64)})
  return path


def test_linear_protocol_learns_and_leaves_the_encoder_untouched(separable_data_dir,
                                                                 tiny_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_pretrain_config(tiny_data_dir)
  model = models.create_model(config.model, num_classes=TINY_NUM_CLASSES)
  saved = train_state_lib.create_train_state(model, optax.sgd(0.1), jax.random.key(1),
                                             image_size=TINY_IMAGE_SIZE)
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(saved, checkpointing.run_metadata(config, TINY_NUM_CLASSES))
  checkpointer.wait_until_finished()
  checkpointer.close()
  config = _eval_config('linear', **{'data.dataset': 'tiny_separable',
                                     'data.data_dir': separable_data_dir,
                                     'linear.num_epochs': 10, 'linear.learning_rate': 5.0})
  mesh = mesh_lib.create_mesh()
  evaluation = eval_setup.prepare(config, workdir, None, mesh)
  with jax.set_mesh(mesh):
    encoder = eval_setup.load_encoder(evaluation, mesh)
    state, frozen, logits_fn = protocols.train_classifier(evaluation, encoder, mesh,
                                                          str(tmp_path / 'log'))
    top1 = protocols.accuracies(
        evaluation.task.test, mesh, 16, lambda state, frozen, images: logits_fn(
            state.params, state.batch_stats, frozen, images, train=False)[0],
        state, frozen)['top1']
  assert top1 >= 0.9  # Chance: 0.25.
  assert set(state.params) == {'probe'} and not state.batch_stats  # Only the classifier trains.
  for collection in ('params', 'batch_stats'):  # The frozen encoder is the checkpoint's.
    for a, b in zip(jax.tree.leaves(jax.device_get(frozen[collection])),
                    jax.tree.leaves(jax.device_get(getattr(saved, collection)))):
      np.testing.assert_array_equal(a, b)


def test_extraction_progress_counts_the_batches_done(pretrain_run):
  mesh = mesh_lib.create_mesh()
  evaluation = eval_setup.prepare(_eval_config('knn'), pretrain_run[0], None, mesh)
  stream = io.StringIO()
  with jax.set_mesh(mesh):
    encoder = eval_setup.load_encoder(evaluation, mesh)
    batches = lambda: data.eval_batches(evaluation.task.test, mesh, batch_size=8)
    plain = jax.device_get(protocols.extract_features(encoder, batches(), mesh))
    progress = console.ProgressLine(4, unit='batches', stream=stream, interval_s=0)
    tracked = jax.device_get(protocols.extract_features(encoder, batches(), mesh, progress))
  # 32 test examples, 4 batches: counted once two later ones run, then all at the end.
  assert [line.split()[0] for line in stream.getvalue().splitlines()] == ['1/4', '2/4', '4/4']
  np.testing.assert_allclose(tracked['features'], plain['features'], rtol=1e-6, atol=1e-6)


def test_memory_source_gives_the_features_of_the_tfds_source(pretrain_run, tiny_data_dir):
  """Evaluation views made on device (memory) equal tf.data's, so kNN and linear_features see
  the same features whichever source the run used."""
  mesh = mesh_lib.create_mesh()
  features = {}
  for source in ('tfds', 'memory'):
    config = _eval_config('knn', **{'data.source': source})
    evaluation = eval_setup.prepare(config, pretrain_run[0], None, mesh)
    with jax.set_mesh(mesh):
      encoder = eval_setup.load_encoder(evaluation, mesh)
      features[source] = jax.device_get(protocols.extract_features(
          encoder, data.eval_batches(evaluation.task.test, mesh, batch_size=16), mesh))
  np.testing.assert_array_equal(features['memory']['mask'], features['tfds']['mask'])
  np.testing.assert_array_equal(features['memory']['label'], features['tfds']['label'])
  np.testing.assert_allclose(features['memory']['features'], features['tfds']['features'],
                             rtol=1e-4, atol=1e-4)
