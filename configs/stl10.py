r"""STL-10: pretrain on train+unlabelled (105k images) at 96 px.

    python run_pretrain.py --config=configs/stl10.py --workdir=runs/stl10

ResNet-50 with the ImageNet stem, batch 1024, 500 epochs, LARS lr 0.075 x sqrt(B),
tau 0.2, colour strength 1.0, blur on, bf16. Published ResNet-50 STL-10 linear evaluation for
SimCLR-style training is in the low-to-mid 80s; expect about that after 500 epochs.
Needs an accelerator: about 51k steps.
"""

from configs import imagenet


def get_config():
  """The ImageNet recipe at 96 px on STL-10's 105k images, with tau 0.2 and weight decay 1e-6."""
  config = imagenet.get_config()
  config.data.dataset = 'stl10'
  config.data.train_split = 'train+unlabelled'
  config.data.eval_split = 'test'
  config.data.image_size = 96
  config.temperature = 0.2
  config.batch_size = 1024
  config.num_epochs = 500
  config.weight_decay = 1e-6
  config.checkpoint_every_steps = 2000
  return config
