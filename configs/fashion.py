"""The design document's Fashion-MNIST run: 28x28x1, T=200 linear, huber, batch 128, 5 epochs.

"The Annotated Diffusion Model" trains `Unet(dim=28, channels=1,
dim_mults=(1, 2, 4))` (ConvNeXt blocks, mult 2) with Adam at lr 1e-3 and no
warmup, clipping or EMA; this run adds an EMA of the weights for sampling,
with a decay that averages over ~200 of its ~2.3k steps. The other configs
start from this one; `ddpm_jax/config_validation.py` checks every field, and
the README lists them.

    python train.py --config=configs/fashion.py --workdir=runs/fashion
    python train.py --config=configs/fashion.py --config.training.batch_size=64 ...
"""
import ml_collections
from ml_collections import config_dict

from ddpm_jax.evaluation import suite


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict(dict(
        dataset="fashion_mnist",   # any TFDS image dataset (cifar10, celeb_a, lsun/church_outdoor,
                                   # imagenet_resized/64x64, ...) | folder; see docs/datasets.md
        folder="",                 # the image folder when dataset == "folder"
        image_size=28,             # other sizes are resized and center-cropped
        channels=1,                # 1 (grayscale) | 3 (RGB); converted if the dataset differs
        random_flip=True,
        tfds_data_dir="",          # "" -> $TFDS_DATA_DIR, else ~/tensorflow_datasets; gs:// works
        manual_dir="",             # official files; "" -> $DDPM_JAX_MANUAL_DIR
        converted_data_dir="",     # where a tfrecord-prepared dataset is converted to
                                   # ArrayRecord (once); "" -> next to its files; gs:// works
        image_key="image",         # the TFDS image feature
        train_split="train",       # TFDS split string, e.g. "train[:90%]" (held out: eval.split)
        in_memory_max_bytes=1 << 30,  # splits larger than this, decoded, are streamed from disk
        worker_count=2,            # Grain processes decoding a streamed split; 0 = a thread
    ))

    config.diffusion = ml_collections.ConfigDict(dict(
        timesteps=200,
        beta_schedule="linear",    # linear | cosine | quadratic | sigmoid
        loss_type="huber",         # l1 | l2 | huber
        # What t = T means: design (the betas as given: alpha_bar_T = 0.132 here, so training
        # never reaches the N(0, I) sampling starts from) | scaled (betas x 1000/T, as
        # lucidrains) | zero (Lin et al.'s zero terminal SNR; needs objective v or x0).
        terminal_snr="design",
        objective="eps",           # what the network predicts: eps | x0 | v
        loss_weighting="none",     # none | min_snr (Hang et al. 2023)
        min_snr_gamma=5.0,         # min_snr: the SNR clip gamma
    ))

    config.model = ml_collections.ConfigDict(dict(
        dim=28,
        init_dim=config_dict.placeholder(int),   # None -> dim // 3 * 2
        dim_mults=(1, 2, 4),
        with_time_emb=True,
        resnet_block_groups=8,
        use_convnext=True,
        convnext_mult=2,
        dropout=0.0,
        dtype="float32",           # compute dtype: float32 | bfloat16 (params stay float32)
        num_classes=0,             # > 0: class-conditional (configs/fashion_cond.py)
    ))

    config.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,
        warmup_steps=0,            # linear warmup from 0 over this many steps
        grad_clip_norm=0.0,        # clip the global gradient norm to this; 0 = off
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        ema_decay=0.995,           # the final decay; see ema_warmup
        # Warm the decay up as min(ema_decay, (1 + m) / (10 + m)) after m averaged updates,
        # so the EMA does not keep the random initialisation (docs/sample_quality.md).
        ema_warmup=True,
        # The EMA copies the weights for this many updates and averages from then on
        # (ema-pytorch's update_after_step): an average lags the fast first steps.
        ema_start=100,
    ))

    config.training = ml_collections.ConfigDict(dict(
        batch_size=128,            # global, over all devices and processes
        num_train_steps=config_dict.placeholder(int),  # None -> num_epochs of the train split
        num_epochs=5,
        log_every=100,
        checkpoint_every=500,
        keep_checkpoints=3,
        sample_every=1000,         # 0 = no sample grids during training
        num_sample_images=16,
        nan_policy="skip",         # skip | stop: what a non-finite loss or gradient does
        compilation_cache_dir="~/.cache/ddpm_jax/xla",  # "" = off
        label_dropout=0.1,         # conditional models: share of labels replaced by "no class"
        # Steps per compiled call (k > 1: one lax.scan, for launch-bound GPUs; 4x slower on
        # XLA:CPU). Log/checkpoint/sample/total steps must be multiples. docs/speed.md
        steps_per_call=1,
    ))

    config.sampling = ml_collections.ConfigDict(dict(
        sampler="ddpm",            # ddpm | ddim | dpmpp (DPM-Solver++; docs/sampling.md)
        steps=50,                  # network calls of ddim and dpmpp (ddpm takes all T)
        ddim_eta=0.0,
        solver_order=2,            # dpmpp: 1 (= DDIM), 2 (2M) or 3
        step_spacing="time",       # dpmpp: steps uniform in "time" or in "logsnr"
        dynamic_threshold=0.0,     # dpmpp: Imagen's thresholding at this quantile; 0 = off
        # Step through the predicted x0 clipped to [-1, 1] (the DDPM paper's sampler);
        # False: the design's Equation 11 (docs/sample_quality.md has the measurements).
        clip_denoised=True,
        guidance=0.0,              # conditional models: classifier-free guidance scale w
    ))

    # Test-set bits/dim and sample quality every K steps (off by default).
    config.eval = suite.default_config()
    config.lock()
    return config
