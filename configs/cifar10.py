"""The DDPM paper's CIFAR-10 recipe (Ho et al. 2020, Appendix B) on the design's UNet.

T=1000 linear betas, L2 (L_simple) loss, Adam lr 2e-4 with 5000 warmup
steps, gradient clipping at norm 1, dropout 0.1, EMA 0.9999, batch 128,
800k steps, random flip; ResNet blocks with base width 128 and multipliers
(1, 2, 2, 2). The network keeps the design's layout (two blocks and linear
attention per level, full attention in the middle), so it is not the paper's
35.7M-parameter model exactly. Sized for accelerators (the paper: a TPU v3-8,
10.6 hours).
"""
import ml_collections

from configs import fashion


def get_config() -> ml_collections.ConfigDict:
    config = fashion.get_config()
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3

    config.diffusion.timesteps = 1000
    config.diffusion.loss_type = "l2"

    config.model.dim = 128
    config.model.dim_mults = (1, 2, 2, 2)
    config.model.use_convnext = False
    config.model.resnet_block_groups = 32
    config.model.dropout = 0.1

    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip_norm = 1.0
    config.optim.ema_decay = 0.9999
    config.sampling.clip_denoised = True  # the paper's sampler (its code's clip_denoised)

    config.training.num_train_steps = 800_000
    config.training.log_every = 1000
    config.training.checkpoint_every = 10_000
    config.training.sample_every = 50_000
    config.training.num_sample_images = 64
    return config
