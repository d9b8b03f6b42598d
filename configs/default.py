"""Embedded default: SimCLR on Fashion-MNIST with a small CIFAR-stem ResNet-18, offline, CPU.

    python run_pretrain.py --workdir=runs/default

Runs in a few minutes on 2 CPU cores (the dataset is built from the local IDX files of the
Debian package dataset-fashion-mnist on first use). Expect the loss (the official objective,
twice the paper's NT-Xent) to fall from its chance level 2 log(2N-1) = 12.47 (2N = 512 views) by
more than two units within the 200 steps, and the contrastive and online-probe accuracies to rise.
Every field can be overridden: --config.batch_size=128 --config.num_train_steps=50.
"""

import ml_collections


def get_data_config():
  """Where images come from and how views are made (`config.data`)."""
  data = ml_collections.ConfigDict()
  data.dataset = 'fashion_mnist'       # Any TFDS image dataset name.
  data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; gs:// on TPU VMs.
  data.train_split = 'train'           # Split expressions work: 'train+unlabelled', 'train[:90%]'.
  data.eval_split = 'test'
  data.image_size = 28                 # Height = width of the views fed to the encoder.
  data.shuffle_buffer = 10_000         # Examples per process (tfds source).
  data.prefetch_batches = 2            # Global batches in flight to the devices.
  data.source = 'tfds'                 # 'tfds': tf.data on the host; 'memory': whole dataset on
                                       # device, every augmentation inside the train step.
  data.augment = ml_collections.ConfigDict()
  data.augment.crop_min_area = 0.08    # Smallest random crop, as a fraction of the image.
  data.augment.color_strength = 0.5    # s in the paper: 1.0 ImageNet, 0.5 CIFAR.
  # 'multiplicative' (official code) or 'additive' (v1 paper's pseudo-code).
  data.augment.brightness = 'multiplicative'
  data.augment.blur_probability = 0.0  # 0.5 for ImageNet-size images, off for 32x32 data.
  data.augment.on_device = False       # tfds: colour and blur on device (crop, flip on host).
  return data


def get_model_config():
  """The encoder and its projection head (`config.model`)."""
  model = ml_collections.ConfigDict()
  model.depth = 18
  model.width_multiplier = 0.25
  model.cifar_stem = True
  model.zero_init_last_bn = True
  # 'simclr': the official shortcuts (a projection in the first block of every stage);
  # 'torchvision': an identity wherever the shape allows (for torchvision-layout weights).
  model.layout = 'simclr'
  model.sk_ratio = 0.0                 # Selective kernels (SimCLR v2 releases: 0.0625); 0: off.
  model.proj_mode = 'nonlinear'        # 'nonlinear', 'linear' or 'none' (z = h).
  model.proj_num_layers = 2            # 2: SimCLR v1 paper, 3: official code and SimCLR v2.
  model.proj_dim = 128
  model.probe_proj_layers = 0          # The probe reads h (0) or the head's k-th hidden layer.
  model.dtype = 'float32'              # Compute dtype ('bfloat16' on TPU/GPU); params stay f32.
  return model


def get_config():
  config = ml_collections.ConfigDict()
  config.data = get_data_config()
  config.model = get_model_config()

  # Objective.
  config.temperature = 0.5
  config.similarity = 'cosine'          # 'cosine' or 'euclidean'.
  config.online_probe = True            # Linear probe on stop_gradient(h) (labelled data only).

  # Optimisation.
  config.batch_size = 256               # Global, over all devices and processes.
  config.num_epochs = 1
  config.num_train_steps = 200          # Overrides num_epochs when > 0.
  config.warmup_epochs = 0.1
  config.learning_rate = 1.0            # Base LR before scaling.
  config.learning_rate_scaling = 'linear'  # 'linear': lr * B / 256; 'sqrt': lr * sqrt(B).
  config.weight_decay = 1e-4
  config.momentum = 0.9

  # kNN monitor: top-1 on held-out labelled examples every eval_every_steps (0: off).
  config.eval_every_steps = 0
  config.monitor = ml_collections.ConfigDict()
  config.monitor.bank_split = 'train[:90%]'   # Labelled examples the queries' neighbours come from.
  config.monitor.query_split = 'train[90%:]'  # Held-out labelled examples to classify.
  config.monitor.k = 200
  config.monitor.temperature = 0.1

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 3
  return config
