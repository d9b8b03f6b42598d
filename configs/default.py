"""Embedded default: SimCLR on Fashion-MNIST with a small CIFAR-stem ResNet-18, offline, CPU.

    python run_pretrain.py --workdir=runs/default

Runs in a few minutes on 2 CPU cores (the dataset is built from the local IDX files of the
Debian package dataset-fashion-mnist on first use). Expect the NT-Xent loss to fall from its chance
level log(2N-1) = 6.24 (2N = 512 views) by more than a unit within the 200 steps, and the
contrastive and online-probe accuracies to rise.
Every field can be overridden: --config.batch_size=128 --config.num_train_steps=50.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = 'fashion_mnist'     # Any TFDS image dataset name.
  config.train_split = 'train'         # Split expressions work: 'train+unlabelled', 'train[:90%]'.
  config.eval_split = 'test'
  config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; gs:// on TPU VMs.
  config.image_size = 28               # Height = width of the views fed to the encoder.
  config.shuffle_buffer = 10_000       # Examples per process.
  config.augment = ml_collections.ConfigDict()
  config.augment.color_strength = 0.5  # s in the paper: 1.0 ImageNet, 0.5 CIFAR.
  config.augment.brightness = 'multiplicative'  # 'multiplicative' (SimCLR v2 code) or 'additive' (v1 paper).
  config.augment.blur_probability = 0.0  # 0.5 for ImageNet-size images, off for 32x32 data.
  config.augment.on_device = False     # True: colour distortion and blur on device (crop, flip on host).

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.depth = 18
  config.model.width_multiplier = 0.25
  config.model.cifar_stem = True
  config.model.zero_init_last_bn = True
  config.model.proj_mode = 'nonlinear'  # 'nonlinear' or 'linear'.
  config.model.proj_num_layers = 2      # 2: SimCLR v1, 3: SimCLR v2.
  config.model.proj_dim = 128
  config.model.dtype = 'float32'        # Compute dtype; parameters stay float32. 'bfloat16' on TPU/GPU.

  # Objective.
  config.temperature = 0.5
  config.similarity = 'cosine'          # 'cosine' or 'euclidean'.
  config.online_probe = True            # Linear probe on stop_gradient(h), when the dataset has labels.

  # Optimisation.
  config.batch_size = 256               # Global, over all devices and processes.
  config.num_epochs = 1
  config.num_train_steps = 200          # Overrides num_epochs when > 0.
  config.warmup_epochs = 0.1
  config.learning_rate = 1.0            # Base LR before scaling.
  config.learning_rate_scaling = 'linear'  # 'linear': lr * B / 256; 'sqrt': lr * sqrt(B).
  config.weight_decay = 1e-4
  config.momentum = 0.9

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 3
  config.prefetch_batches = 2
  return config
