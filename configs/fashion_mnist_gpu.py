r"""Fashion-MNIST at the accelerator budget: ResNet-18 (CIFAR stem, width 1), 200 epochs.

    python run_pretrain.py --config=configs/fashion_mnist_gpu.py --workdir=runs/fmnist_gpu
    python run_eval.py --workdir=runs/fmnist_gpu --config.protocol=linear_features

Batch 512, 23,438 steps, LARS lr 1.0 x B/256 with 10 warmup epochs, tau 0.5, colour strength 0.5,
bf16 compute, 3-layer head (the CIFAR-10 recipe of configs/cifar10.py on Fashion-MNIST's 28 px
images). Minutes to an hour on one modern GPU; not yet measured here (see docs/results.md).
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.dataset = 'fashion_mnist'
  config.data.image_size = 28
  config.num_epochs = 200
  config.checkpoint_every_steps = 1170  # 10 epochs.
  return config
