"""configs/fashion.py with training that reaches noise: betas scaled to T, v, Min-SNR-5.

Three changes to the design's recipe, everything else number for number:
- `diffusion.terminal_snr = "scaled"`: the linear betas times 1000/T, as
  lucidrains does, so that alpha_bar_T = 3.0e-5 instead of 0.132 at T = 200
  (the design's images still carry 36% of their amplitude at t = T);
- `diffusion.objective = "v"` (Salimans & Ho 2022): the network predicts
  v = alpha * eps - sigma * x0, well scaled at both ends of the schedule;
- `diffusion.loss_weighting = "min_snr"`, gamma 5 (Hang et al. 2023).

A best guess from the literature, not yet a measurement: experiments/quality/run.py
compares each lever at an equal budget (docs/training.md).

    python train.py --config=configs/fashion_scaled_v_minsnr.py --workdir=runs/fashion_v
"""
import ml_collections

from configs import fashion


def get_config() -> ml_collections.ConfigDict:
    config = fashion.get_config()
    config.diffusion.terminal_snr = "scaled"
    config.diffusion.objective = "v"
    config.diffusion.loss_weighting = "min_snr"
    config.diffusion.min_snr_gamma = 5.0
    return config
