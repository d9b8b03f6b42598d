"""Evaluation of a pretraining run's encoder: check, run the protocol, write the results.

`evaluate(config, workdir, step)` (configs/eval.py) checks everything it can before compiling
anything (simclr_jax/eval_setup.py), runs `config.protocol` (simclr_jax/protocols.py) on the
device mesh, and writes on process 0:
  workdir/eval/<name>.json       the results (top1, top5, step, dataset, ...)
  workdir/eval/results.jsonl     one line per evaluation; TensorBoard scalars `<name>/top1` in
                                 workdir/eval/tb, at the pretraining step
  workdir/eval/<name>/           the classifier's training curve (linear, finetune, distill)
with <name> from `eval_setup.result_name`.
"""

import json
import os
import time

import jax
import ml_collections
from absl import logging
from etils import epath

from simclr_jax import eval_setup
from simclr_jax import mesh as mesh_lib
from simclr_jax import metrics_writer
from simclr_jax import protocols
from simclr_jax import workdir_lock


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
             mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs config.protocol on the checkpoint of `step` (default: latest) of the run in `workdir`."""
  start = time.perf_counter()
  mesh = mesh or mesh_lib.create_mesh()
  evaluation = eval_setup.prepare(config, workdir, step, mesh)
  task = evaluation.task
  eval_dir = os.path.join(workdir, 'eval')
  # One writer per evaluation name; other evaluations of the run may go on at the same time.
  with workdir_lock.hold(eval_dir, f'.{evaluation.name}.lock'), jax.set_mesh(mesh):
    encoder = eval_setup.load_encoder(evaluation, mesh)
    if config.protocol == 'distill':
      student = eval_setup.load_student(evaluation, mesh)
      metrics = protocols.run_distill(evaluation, encoder, student, mesh,
                                      os.path.join(eval_dir, evaluation.name))
    elif config.protocol in eval_setup.TRAINED_PROTOCOLS:
      metrics = protocols.run_classifier(evaluation, encoder, mesh,
                                         os.path.join(eval_dir, evaluation.name))
    elif config.protocol == 'knn':
      metrics = protocols.run_knn(evaluation, encoder, mesh)
    else:
      metrics = protocols.run_linear_features(evaluation, encoder, mesh)
    if evaluation.saved is not None:
      evaluation.saved.checkpointer.close()
    results = {'protocol': config.protocol, 'name': evaluation.name, 'step': encoder.step,
               'dataset': task.test.config.dataset, 'train_split': task.train.split,
               'eval_split': task.test.split, 'num_train_examples': task.num_train_examples,
               'label_subset': task.label_subset, 'image_size': evaluation.image_size,
               **metrics, 'seconds': time.perf_counter() - start, 'config': config.to_dict()}
    write_results(eval_dir, results)
  return results


def plan(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
         mesh: jax.sharding.Mesh | None = None) -> str:
  """What `evaluate` would do, after the same checks, in four lines; writes and compiles nothing."""
  evaluation = eval_setup.prepare(config, workdir, step, mesh or mesh_lib.create_mesh())
  task, saved = evaluation.task, evaluation.saved
  if saved is not None:
    saved.checkpointer.close()
  model = evaluation.run_config.model
  if config.features == 'pixels':
    encoder = 'raw pixels'
  else:
    source = 'random init' if saved is None else f'step {saved.step:,} of {workdir}'
    encoder = f'ResNet-{model.depth} x{model.width_multiplier}, {source}'
  protocol = config.protocol
  if protocol in eval_setup.TRAINED_PROTOCOLS:
    steps = protocols.classifier_steps(config, task.num_train_examples)
    protocol += (f': {config[protocol].num_epochs} epochs = {steps:,} steps of batch '
                 f'{config.batch_size}')
  return '\n'.join([
      f'protocol {protocol}',
      f'encoder  {encoder}',
      f'data     {task.test.config.dataset}: {task.num_train_examples:,} labelled examples of '
      f'{task.train.split!r} ({task.label_subset}), {task.test.num_examples:,} of '
      f'{task.test.split!r}; {task.num_classes} classes, views {evaluation.image_size}',
      f'result   {os.path.join(workdir, "eval", evaluation.name + ".json")}'])


def write_results(eval_dir: str, results: dict) -> None:
  """eval/<name>.json, a line in eval/results.jsonl, TensorBoard scalars; one console line."""
  name = results['name']
  scores = {k: results[k] for k in ('top1', 'top5') if k in results}
  summary = '  '.join(f'{k} {100 * v:.2f}%' for k, v in scores.items())
  logging.info('%s of step %d on %s %s: %s (%d train examples, %.0fs) -> %s', name,
               results['step'], results['dataset'], results['eval_split'], summary,
               results['num_train_examples'], results['seconds'],
               os.path.join(eval_dir, f'{name}.json'))
  writer = metrics_writer.MetricWriter(eval_dir, filename='results.jsonl', tensorboard_subdir='tb')
  writer.write(results['step'], {f'{name}/{k}': v for k, v in scores.items()})
  if jax.process_index() == 0:  # Written whole or not at all (a full disk leaves no torn file).
    temporary = epath.Path(eval_dir) / f'.{name}.json.tmp'
    temporary.write_text(json.dumps(results, indent=2))
    temporary.replace(epath.Path(eval_dir) / f'{name}.json')
