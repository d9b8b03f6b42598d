r"""STL-10: pretrain on train+unlabelled (105k images) at 96 px.

    python run_pretrain.py --config=configs/stl10.py --workdir=runs/stl10

ResNet-50 with the ImageNet stem, batch 1024, 500 epochs, LARS lr 0.075 x sqrt(B),
tau 0.2, colour strength 1.0, blur on, bf16. Published ResNet-50 STL-10 linear evaluation for
SimCLR-style training is in the low-to-mid 80s; expect about that after 500 epochs.
Needs an accelerator: about 51k steps.
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.dataset = 'stl10'
  config.train_split = 'train+unlabelled'
  config.eval_split = 'test'
  config.image_size = 96
  config.augment.color_strength = 1.0
  config.augment.blur_probability = 0.5
  config.model.depth = 50
  config.model.width_multiplier = 1
  config.model.cifar_stem = False
  config.model.proj_num_layers = 2
  config.model.dtype = 'bfloat16'
  config.temperature = 0.2
  config.batch_size = 1024
  config.num_epochs = 500
  config.num_train_steps = -1
  config.warmup_epochs = 10
  config.learning_rate = 0.075
  config.learning_rate_scaling = 'sqrt'
  config.weight_decay = 1e-6
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
