"""A network small enough for CI to train on real Fashion-MNIST in seconds on a CPU.

ResNet blocks instead of ConvNeXt: XLA:CPU compiles and runs the 7x7
depthwise convolution slowly, and the tiny config exists to test the
training machinery (checkpoints, resume, devices, processes), not the blocks.
"""
import ml_collections

from configs import fashion


def get_config() -> ml_collections.ConfigDict:
    config = fashion.get_config()
    config.diffusion.timesteps = 20
    config.model.dim = 8
    config.model.dim_mults = (1, 2)
    config.model.use_convnext = False
    config.training.batch_size = 16
    config.training.num_train_steps = 40
    config.training.log_every = 5
    config.training.checkpoint_every = 20
    config.training.sample_every = 0
    config.training.num_sample_images = 8
    config.optim.ema_decay = 0.9
    config.sampling.steps = 10
    return config
