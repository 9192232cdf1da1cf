"""`python sample.py` on a checkpoint of the tiny config and on a PyTorch state_dict."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from configs import tiny
from ddpm_jax.runtime import images
from torch_reference import unet as torch_ref_unet
from tests.support import train_helpers

pytestmark = pytest.mark.newest_stack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = train_helpers.TINY_CHECKPOINT_STEP


def _sample(*args, expect_ok=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == expect_ok, done.stdout + done.stderr
    return done


def _tiny_config():
    config = tiny.get_config()
    config.training.compilation_cache_dir = ""  # leave the user's cache alone
    return config


@pytest.mark.subprocess
def test_grid_gif_and_npz(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    done = _sample(f"--workdir={tiny_checkpoint}", "--num_images=10", "--nrow=4", "--seed=3",
                   f"--output={out}/grid.png", f"--save_npz={out}/samples.npz",
                   f"--gif={out}/denoise.gif", "--gif_images=3")
    assert f"step {STEP} (EMA parameters)" in done.stdout
    assert "images/s" in done.stdout and "wall time" in done.stdout
    assert "chunk 1/1: 10/10 images" in done.stdout
    grid = Image.open(out / "grid.png")
    assert grid.size == (4 * 30 + 2, 3 * 30 + 2) and grid.mode == "L"  # 28x28, padding 2
    samples = np.load(out / "samples.npz")["images"]
    assert samples.shape == (10, 28, 28, 1) and np.isfinite(samples).all()
    np.testing.assert_array_equal(np.asarray(grid)[..., None],
                                  images.make_grid(samples, nrow=4))
    gif = Image.open(out / "denoise.gif")
    assert gif.n_frames == 20  # the tiny config's T = 20 DDPM steps
    assert gif.size == (2 * 30 + 2, 2 * 30 + 2)  # 3 images, 2 per row
    gif.seek(gif.n_frames - 1)  # the last frame shows the first 3 finished images
    np.testing.assert_array_equal(np.asarray(gif.convert("L")),
                                  images.make_grid(samples[:3], nrow=2)[..., 0])

    # Raw parameters and DDIM: other images; the GIF keeps 3 of the 5 DDIM steps.
    done = _sample(f"--workdir={tiny_checkpoint}", "--num_images=10", "--nrow=4", "--seed=3",
                   "--use_ema=false", "--sampler=ddim", "--ddim_steps=5",
                   f"--output={out}/raw.png", f"--save_npz={out}/raw.npz",
                   f"--gif={out}/raw.gif", "--gif_images=2", "--gif_frames=3", "--chunk_size=4")
    assert "(raw parameters)" in done.stdout and "chunk 3/3: 10/10 images" in done.stdout
    raw = np.load(out / "raw.npz")["images"]
    assert raw.shape == samples.shape and np.abs(raw - samples).max() > 0.1
    assert Image.open(out / "raw.gif").n_frames == 3


@pytest.mark.subprocess
def test_dpmpp_grid_and_gif(tiny_checkpoint, tmp_path):
    done = _sample(f"--workdir={tiny_checkpoint}", "--num_images=4", "--sampler=dpmpp", "--steps=20",
                   f"--output={tmp_path}/grid.png", f"--save_npz={tmp_path}/samples.npz",
                   f"--gif={tmp_path}/denoise.gif", "--gif_images=2")
    # T = 20: 21 points from 19 to 0 round to 20 distinct timesteps, t = 0 left to the end.
    assert "dpmpp, 19 steps, order 2, time spacing, x0 clipped" in done.stdout
    samples = np.load(tmp_path / "samples.npz")["images"]
    assert samples.shape == (4, 28, 28, 1) and np.abs(samples).max() <= 1.0
    assert Image.open(tmp_path / "grid.png").size == (2 * 30 + 2, 2 * 30 + 2)
    assert Image.open(tmp_path / "denoise.gif").n_frames == 19


@pytest.mark.subprocess
def test_clip_denoised_flag(tiny_checkpoint, tmp_path):
    """--clip_denoised steps through x0 clipped to [-1, 1]: the images end in range."""
    for flag, clipped in (("--clip_denoised", True), ("--noclip_denoised", False)):
        done = _sample(f"--workdir={tiny_checkpoint}", "--num_images=4", "--sampler=ddim",
                       "--ddim_steps=5", flag, f"--output={tmp_path}/grid.png",
                       f"--save_npz={tmp_path}/samples.npz")
        assert ("x0 clipped" in done.stdout) == clipped
        samples = np.load(tmp_path / "samples.npz")["images"]
        assert (np.abs(samples).max() <= 1.0) == clipped


@pytest.mark.subprocess
def test_torch_checkpoint(tmp_path):
    config = _tiny_config()
    m = config.model
    network = torch_ref_unet.Unet(dim=m.dim, init_dim=m.init_dim, dim_mults=m.dim_mults,
                                  channels=config.data.channels, with_time_emb=m.with_time_emb,
                                  resnet_block_groups=m.resnet_block_groups,
                                  use_convnext=m.use_convnext, convnext_mult=m.convnext_mult)
    path = tmp_path / "model.pt"
    torch.save(network.state_dict(), path)
    done = _sample(f"--torch_checkpoint={path}", "--config=configs/tiny.py",
                   "--config.training.compilation_cache_dir=", "--num_images=2",
                   "--sampler=ddim", "--ddim_steps=2", f"--output={tmp_path}/grid.png")
    assert f"from {path}" in done.stdout
    assert Image.open(tmp_path / "grid.png").size == (2 * 30 + 2, 30 + 2)

    # A state_dict of another network (dim 12, not 8) is refused by name, not with a traceback.
    torch.save(torch_ref_unet.Unet(dim=12, dim_mults=(1, 2), channels=1).state_dict(), path)
    done = _sample(f"--torch_checkpoint={path}", "--config=configs/tiny.py", expect_ok=False)
    assert "has shape" in done.stderr and "another architecture" in done.stderr
    assert "Traceback" not in done.stderr
    path.write_bytes(b"not a checkpoint")
    done = _sample(f"--torch_checkpoint={path}", "--config=configs/tiny.py", expect_ok=False)
    assert "cannot be read as a PyTorch state_dict" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --workdir"),
    (["--torch_checkpoint=/nonexistent/model.pt"], "--torch_checkpoint needs --config"),
    (["--torch_checkpoint=/nonexistent/model.pt", "--config=configs/tiny.py"],
     "--torch_checkpoint=/nonexistent/model.pt: no such file"),
    (["--workdir=/nonexistent/run"], "has no checkpoints/ directory"),
])
def test_clear_errors_without_a_checkpoint(args, message):
    done = _sample(*args, expect_ok=False)
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.subprocess
def test_clear_errors_with_a_checkpoint(tiny_checkpoint, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for args, message in [
        ([f"--workdir={tmp_path}"], "no checkpoint in"),
        ([f"--workdir={tiny_checkpoint}", "--image_size=32"],
         "--image_size=32, but the model was trained on 28x28 images"),
        ([f"--workdir={tiny_checkpoint}", "--sampler=ddim", "--ddim_steps=21"],
         "--steps must be in [1, 20]"),
        ([f"--workdir={tiny_checkpoint}", "--steps=3", "--ddim_steps=4"],
         "--steps and its older name --ddim_steps disagree"),
        ([f"--workdir={tiny_checkpoint}", "--sampler=ddim", "--dynamic_threshold=0.9"],
         "--dynamic_threshold applies to sampler 'dpmpp' only"),
        ([f"--workdir={tiny_checkpoint}", "--config=configs/tiny.py"],
         "--config goes with --torch_checkpoint only"),
        ([f"--workdir={tiny_checkpoint}", f"--output={tiny_checkpoint}"], "is a directory"),
    ]:
        done = _sample(*args, expect_ok=False)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
