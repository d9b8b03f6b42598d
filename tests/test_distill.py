"""Distillation (SimCLR v2): the loss against a NumPy statement of it, a fine-tuned network saved
as a run, and a teacher distilled into a student end to end on the tiny dataset."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_compilations
from simclr_jax import checkpointing
from simclr_jax import errors
from simclr_jax import evaluate
from simclr_jax import protocols
from tests.test_evaluate import _eval_config, pretrain_run  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _numpy_distillation_loss(student, teacher, temperature):
  """-1/N sum_i sum_y p_T(y|x_i) log p_S(y|x_i), both softmaxes at `temperature` (float64)."""
  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p = softmax(teacher / temperature)
  return -np.mean(np.sum(p * np.log(softmax(student / temperature)), -1))


@pytest.mark.parametrize('temperature', [1.0, 0.5, 3.0])
def test_distillation_loss_is_the_papers(temperature):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(0, 3, (2, 64, 10))
  loss = protocols.distillation_loss(jnp.asarray(student, jnp.float32),
                                     jnp.asarray(teacher, jnp.float32), temperature)
  np.testing.assert_allclose(loss, _numpy_distillation_loss(student, teacher, temperature),
                             rtol=1e-5)
  # Its gradient reaches the student only: d loss / d student = (q - p) / (T N).
  grad_student, grad_teacher = jax.grad(protocols.distillation_loss, argnums=(0, 1))(
      jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), temperature)
  q, p = (jax.nn.softmax(jnp.asarray(x) / temperature) for x in (student, teacher))
  np.testing.assert_allclose(grad_student, (q - p) / (temperature * 64), atol=1e-6)
  assert not np.any(grad_teacher)


@pytest.mark.parametrize('overrides, match', [
    ({'distill.temperature': 0.0}, 'temperature must be positive'),
    ({'distill.student_workdir': 'x', 'distill.student_depth': 18}, 'leave'),
    ({'distill.student_depth': 19}, 'Unsupported ResNet depth 19'),
    ({'random_init': True}, 'no teacher to distill'),
    ({'distill.proj_layers': 2}, 'has 1 hidden layers'),
])
def test_distill_errors_before_compiling(pretrain_run, overrides, match):  # noqa: F811
  with count_compilations() as compilations, pytest.raises(errors.UserError, match=match):
    evaluate.evaluate(_eval_config('distill', **overrides), pretrain_run[0])
  assert compilations == []


@pytest.mark.slow
def test_finetune_saves_a_teacher_that_distills_into_a_student(pretrain_run, tmp_path):  # noqa: F811
  workdir, teacher_dir, student_dir = pretrain_run[0], str(tmp_path / 't'), str(tmp_path / 's')
  finetuned = evaluate.evaluate(_eval_config('finetune', **{'finetune.save_to': teacher_dir}),
                                workdir)
  assert finetuned['saved_to'] == teacher_dir
  with pytest.raises(errors.UserError, match='already holds checkpoints'):
    evaluate.evaluate(_eval_config('finetune', **{'finetune.save_to': teacher_dir}), workdir)

  # A smaller random-init student (width 1/16 instead of 1/8) learns from the teacher alone.
  results = evaluate.evaluate(_eval_config('distill', **{
      'distill.save_to': student_dir, 'distill.student_width_multiplier': 0.0625,
      'distill.num_epochs': 1}), teacher_dir)
  with open(os.path.join(teacher_dir, 'eval', 'distill.json')) as f:
    assert json.load(f)['top1'] == results['top1']
  # The saved teacher's classifier is the fine-tuned one: the same test accuracy (32 examples).
  assert abs(results['teacher_top1'] - finetuned['top1']) <= 1 / 32
  assert results['num_train_examples'] == 96 and results['train_steps'] == 96 // 16

  # The student is a run of the smaller model with the data's classes (that a saved network
  # restores and classifies as trained is the teacher_top1 check above).
  saved = checkpointing.open_saved_run(student_dir)
  assert saved.meta['model']['width_multiplier'] == 0.0625 and saved.meta['num_classes'] == 4
  assert saved.meta['classifier'] == 'distill' and saved.meta['trained_from'] == teacher_dir
  saved.checkpointer.close()
