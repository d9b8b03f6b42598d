"""The kNN monitor of pretraining: the current encoder's weighted kNN top-1 on held-out labels.

Every `config.eval_every_steps` steps (and at the end), the features of `config.monitor.bank_split`
(labelled training examples) are extracted with the encoder being trained, and every example of
`config.monitor.query_split` is classified by its k nearest of them, as `run_eval.py`'s knn
protocol does. The result joins that step's row of metrics.jsonl as `knn_top1`. It reads the
parameters only, so training is the same with the monitor on or off. Recipe choices are made on
it with a query split held out of the training set (e.g. train[90%:]), never on the test split.
"""

import jax
import ml_collections

from simclr_jax import data
from simclr_jax import eval_setup
from simclr_jax import models
from simclr_jax import protocols
from simclr_jax import train_loop


def knn_monitor(config: ml_collections.ConfigDict, model: models.SimCLRModel,
                mesh: jax.sharding.Mesh) -> train_loop.Periodic | None:
  """The monitor's periodic evaluation, or None when it is off or the dataset has no labels."""
  cfg = config.monitor
  if config.eval_every_steps <= 0:
    return None
  bank = data.open_split(config.data, cfg.bank_split)
  queries = data.open_split(config.data, cfg.query_split)
  if bank.num_classes is None or queries.num_classes is None:
    return None

  def evaluate(step, state):
    del step
    encoder = eval_setup.Encoder(model, {'params': state.params,
                                         'batch_stats': state.batch_stats}, 0)
    accuracies = protocols.knn_accuracies(encoder, bank, queries, mesh,
                                          batch_size=config.batch_size, k=cfg.k,
                                          temperature=cfg.temperature)
    return {'knn_top1': accuracies['top1']}

  return train_loop.Periodic(config.eval_every_steps, evaluate)
