r"""Evaluates a pretraining run's encoder; --config.protocol picks the protocol.

    python run_eval.py --workdir=runs/default      # linear_features: converged, a minute or two
    python run_eval.py --workdir=runs/default --config.protocol=linear    # the official protocol
    python run_eval.py --workdir=runs/default --config.protocol=linear \
        --config.linear.feature_norm=batchnorm      # MoCo v3 / MAE: BatchNorm before the classifier
    python run_eval.py --workdir=runs/default --config.protocol=knn
    python run_eval.py --workdir=runs/default --config.protocol=finetune \
        --config.finetune.label_fraction=0.1
    python run_eval.py --workdir=runs/default --config.protocol=finetune \
        --config.finetune.label_fraction=0.1 --config.finetune.save_to=runs/teacher
    python run_eval.py --workdir=runs/teacher --config.protocol=distill \
        --config.distill.student_workdir=runs/default --config.distill.save_to=runs/student
    python run_eval.py --workdir=runs/default --config.protocol=knn --config.random_init=True
    python run_eval.py --workdir=runs/default --config.protocol=knn --config.features=pixels

Protocols:
  linear_features  (the default) features extracted once (no augmentation), multinomial logistic
                   regression (L-BFGS) to convergence, L2 strength chosen on a held-out part of
                   train, then refit on all.
  linear           the official protocol: frozen encoder (BatchNorm in inference mode),
                   zero-initialised linear layer on h, Nesterov momentum 0.9, lr 0.1 x B/256,
                   cosine, no warmup, crop + flip; feature_norm='batchnorm' adds a BatchNorm
                   without scale or offset on h (result name linear_bn...).
  knn              weighted k-NN (k=200, T=0.1) on l2-normalised features of the train split.
  finetune         the whole encoder on a label fraction of train, BN in train mode: the official
                   1%/10% lists for imagenet2012 (TFDS imagenet2012_subset), a class-balanced
                   draw (seeded by `seed`) for other datasets; `finetune.save_to` saves the
                   fine-tuned network (encoder, head, classifier) as a workdir.
  distill          SimCLR v2's third step: --workdir is the teacher (a run with a classifier);
                   a student (from `distill.student_workdir`, or randomly initialised with the
                   teacher's or a smaller architecture) trains on every image of train_split on
                   -sum_y softmax(teacher/T)_y log softmax(student/T)_y, labels unused; the
                   results hold the student's and the teacher's test accuracies, the student is
                   saved as a workdir (`distill.save_to`).
Switches: random_init=True evaluates an untrained encoder of the same architecture (seeded by
`seed`); features='pixels' (linear_features, knn) uses the raw pixels instead of an encoder.
Data settings left as None come from the pretraining run; a different `data.dataset` is a transfer
evaluation. Results go to WORKDIR/eval/<name>.json with
<name> = <protocol>[_bn][_<p>pct][_on_<dataset>][_random_init|_pixels][_step<N>]: <p>% of the labels
(linear, finetune), <dataset> when not the run's own, _step<N> when --step is given.

Published recipes (epochs are small here so that the default runs on a CPU):
  CIFAR-10 linear:  --config.batch_size=512 --config.linear.num_epochs=100
  ImageNet linear:  --config.batch_size=4096 --config.linear.num_epochs=90 \
                    --config.linear.weight_decay=1e-6
  ImageNet 1% fine-tuning, v1 paper (10%: label_fraction=0.1, 30 epochs):
                    --config.batch_size=4096 --config.finetune.label_fraction=0.01 \
                    --config.finetune.num_epochs=60
  SimCLR v2 adds:   --config.batch_size=1024 --config.finetune.proj_layers=1 \
                    --config.finetune.optimizer=lars --config.finetune.learning_rate=0.005 \
                    --config.finetune.learning_rate_scaling=sqrt
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.protocol = 'linear_features'  # 'linear_features', 'linear', 'knn', 'finetune', 'distill'.
  config.random_init = False       # Evaluate an untrained encoder instead of the checkpoint.
  config.features = 'encoder'      # 'encoder' or 'pixels' (linear_features and knn only).

  # Data; None: as in the pretraining run.
  config.data = ml_collections.ConfigDict()
  config.data.dataset = config_dict.placeholder(str)
  config.data.data_dir = config_dict.placeholder(str)
  config.data.image_size = config_dict.placeholder(int)
  config.data.train_split = 'train'     # Must be labelled ('train', not 'train+unlabelled').
  config.data.eval_split = config_dict.placeholder(str)  # None: the pretraining eval_split.
  config.data.prefetch_batches = 2

  config.batch_size = 256          # Global: training batch and feature-extraction batch.
  config.seed = 0
  config.log_every_steps = 50

  # linear and finetune train a classifier with the same fields.
  config.linear = ml_collections.ConfigDict()
  config.linear.label_fraction = 1.0   # Fraction of train_split with labels.
  config.linear.num_epochs = 2         # 100 (CIFAR) / 90 (ImageNet) in the published recipe.
  config.linear.optimizer = 'momentum'  # 'momentum' (Nesterov 0.9) or 'lars'.
  config.linear.learning_rate = 0.1    # x batch_size / 256 ('linear') or x sqrt(batch_size).
  config.linear.learning_rate_scaling = 'linear'
  config.linear.weight_decay = 0.0
  # 'batchnorm': a BatchNorm without scale or offset between h and the classifier (the MoCo v3 and
  # MAE linear probes'); 'none': the official protocol.
  config.linear.feature_norm = 'none'

  config.linear_features = ml_collections.ConfigDict()
  config.linear_features.holdout_fraction = 0.1
  config.linear_features.l2_grid = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
  config.linear_features.max_steps = 200  # L-BFGS iterations per fit (at most).

  config.knn = ml_collections.ConfigDict()
  config.knn.k = 200
  config.knn.temperature = 0.1

  config.finetune = ml_collections.ConfigDict()
  config.finetune.label_fraction = 0.1
  config.finetune.num_epochs = 2        # 60 (1%) / 30 (10%) in the paper.
  config.finetune.optimizer = 'momentum'  # v1 paper; SimCLR v2 used 'lars'.
  config.finetune.learning_rate = 0.05  # v1 paper: 0.05 x B/256; v2: 0.005 x sqrt(B) with LARS.
  config.finetune.learning_rate_scaling = 'linear'
  config.finetune.weight_decay = 0.0    # Never on BatchNorm parameters.
  config.finetune.proj_layers = 0       # Projection layers kept under the classifier (v2: 1).
  config.finetune.save_to = config_dict.placeholder(str)  # Workdir to save the network to.

  # SimCLR v2 distillation: --workdir is the teacher (a run with a classifier: a saved
  # finetune, a converted fine-tuned checkpoint); the student trains on all of train_split
  # without labels, on the cross-entropy to the teacher's softmax at `temperature`.
  config.distill = ml_collections.ConfigDict()
  config.distill.temperature = 1.0      # v2 paper: 1.0.
  config.distill.num_epochs = 2
  config.distill.optimizer = 'momentum'
  config.distill.learning_rate = 0.05
  config.distill.learning_rate_scaling = 'linear'
  config.distill.weight_decay = 0.0
  config.distill.proj_layers = 0        # Student projection layers under its classifier.
  config.distill.student_workdir = config_dict.placeholder(str)  # Start from this run; None: init.
  config.distill.student_depth = config_dict.placeholder(int)    # Random-init student's ResNet
  config.distill.student_width_multiplier = config_dict.placeholder(float)  # (None: teacher's).
  config.distill.save_to = config_dict.placeholder(str)  # None: WORKDIR/eval/<name>/student.
  return config
