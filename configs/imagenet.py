r"""The paper's ImageNet setting: ResNet-50 (1x), batch 4096, 100 epochs.

    python run_pretrain.py --config=configs/imagenet.py --workdir=gs://BUCKET/simclr/r50 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --multihost

tau 0.1, LARS lr 0.075 x sqrt(B) (= 4.8), weight decay 1e-4, 10 warmup epochs, colour strength
1.0, blur on, bf16 compute, 3-layer head (the official default). 31,279 steps. The official
README reports about 6 hours on 32 TPU v3 cores and about 64.5% linear evaluation top-1 for this
setting.
Run it on every host of a TPU pod slice (see README "Running on a TPU pod").
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.data.dataset = 'imagenet2012'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = 224
  config.data.shuffle_buffer = 10_000
  config.data.augment.color_strength = 1.0
  config.data.augment.blur_probability = 0.5
  config.model.depth = 50
  config.model.width_multiplier = 1
  config.model.cifar_stem = False
  config.model.proj_num_layers = 3
  config.model.dtype = 'bfloat16'
  config.temperature = 0.1
  config.batch_size = 4096
  config.num_epochs = 100
  config.num_train_steps = -1
  config.warmup_epochs = 10
  config.learning_rate = 0.075
  config.learning_rate_scaling = 'sqrt'
  config.weight_decay = 1e-4
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
