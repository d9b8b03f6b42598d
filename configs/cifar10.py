r"""The official single-GPU CIFAR-10 recipe (google-research/simclr README).

    python run_pretrain.py --config=configs/cifar10.py --workdir=runs/cifar10

ResNet-18 with the CIFAR stem, batch 512, 1000 epochs, LARS lr 1.0 x B/256 (peak 2.0),
weight decay 1e-4, tau 0.5, colour strength 0.5, no blur, 10 warmup epochs, 3-layer head.
Expected linear evaluation: about 91% top-1 (official README; 90.7-91.9% in reproductions).
97,657 steps; hours on one modern GPU (see benchmarks/README.md), days on a CPU.
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.shuffle_buffer = 25_600  # 50 x batch, as the official code for 32x32 data.
  config.data.augment.color_strength = 0.5
  config.data.augment.blur_probability = 0.0
  config.model.depth = 18
  config.model.width_multiplier = 1
  config.model.cifar_stem = True
  config.model.proj_num_layers = 3
  config.model.dtype = 'bfloat16'
  config.temperature = 0.5
  config.batch_size = 512
  config.num_epochs = 1000
  config.num_train_steps = -1
  config.warmup_epochs = 10
  config.learning_rate = 1.0
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-4
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
