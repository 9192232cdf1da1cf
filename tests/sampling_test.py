"""The sharded sampler against the foundation's loops and the PyTorch design; grids and GIFs."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_jax import diffusion, sampling, schedules
from ddpm_jax.models import torch_weights
from ddpm_jax.runtime import images
from ddpm_jax.models.unet import Unet
from torch_reference import diffusion as ref
from tests.support.train_helpers import subprocess_env

pytestmark = pytest.mark.newest_stack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (6, 6, 2)


def random_params(model: Unet, seed: int = 0):
    """Parameters of PyTorch's initial scale, U(+-1/sqrt(fan_in)), drawn with numpy.

    (`model.init` would do, but XLA:CPU takes a minute to compile it.)
    """
    rng = np.random.default_rng(seed)

    def draw(leaf):
        bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)

    return jax.tree.map(draw, torch_weights.abstract_params(model))


def _toy_apply(scale, x, t):
    """A fixed toy network (the foundation's), its 'params' a scale."""
    return scale * jnp.tanh(0.5 * x + 0.01 * t.reshape(-1, 1, 1, 1).astype(x.dtype))


def _toy_torch(x, t):
    return 0.9 * torch.tanh(0.5 * x + 0.01 * t.reshape(-1, 1, 1, 1).to(x.dtype))


def _toy_denoise(x, t):
    return _toy_apply(0.9, x, t)


def _generate(num_images, **kwargs):
    schedule = kwargs.pop("schedule", schedules.make_schedule("linear", 50))
    return sampling.generate(_toy_apply, jnp.float32(0.9), schedule, SHAPE, num_images, **kwargs)


def test_ddpm_trajectory_matches_design_and_p_sample_loop():
    """Image i is the design's Algorithm 2 run from image i's own x_T and step noises."""
    timesteps = 200
    schedule = schedules.make_schedule("linear", timesteps)
    constants = ref.Constants(ref.linear_beta_schedule(timesteps).to(torch.float32))
    result = _generate(5, schedule=schedule, seed=11, chunk_size=2, trajectory_indices=[4, 1])
    assert result.trajectory.shape == (timesteps, 2, *SHAPE)
    for slot, index in enumerate([4, 1]):
        key = sampling.image_keys(11, [index])[0]
        init_key, loop_key = jax.random.split(key)
        x_T = torch.from_numpy(np.array(jax.random.normal(init_key, (1, *SHAPE))))
        noises = [torch.from_numpy(np.array(jax.random.normal(jax.random.fold_in(loop_key, t),
                                                              (1, *SHAPE))))
                  for t in range(timesteps)]
        want = np.stack(ref.p_sample_loop(constants, _toy_torch, x_T, noises))[:, 0]
        assert np.abs(result.trajectory[:, slot] - want).max() < 1e-4
        loop = diffusion.p_sample_loop(schedule, _toy_denoise, (1, *SHAPE), key,
                                       return_trajectory=True)
        np.testing.assert_allclose(result.trajectory[:, slot], np.asarray(loop)[:, 0], atol=1e-6)
        np.testing.assert_array_equal(result.images[index], result.trajectory[-1, slot])


def test_ddim_matches_ddim_sample_loop_and_eta0_is_deterministic_given_x_T():
    schedule = schedules.make_schedule("linear", 50)
    keys = sampling.image_keys(5, np.arange(3))
    x_T = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], SHAPE))(keys)
    for eta in (0.0, 0.7):
        result = _generate(3, schedule=schedule, seed=5, sampler="ddim", ddim_steps=8,
                           ddim_eta=eta, trajectory_indices=[2])
        assert result.trajectory.shape == (8, 1, *SHAPE)
        loop = diffusion.ddim_sample_loop(schedule, _toy_denoise, (1, *SHAPE), keys[2], 8, eta,
                                          return_trajectory=True)
        np.testing.assert_allclose(result.trajectory[:, 0], np.asarray(loop)[:, 0], atol=1e-5)
        # The same x_T with unrelated step keys: equal for eta = 0 only.
        other_keys = diffusion.ddim_sample_loop(schedule, _toy_denoise, None,
                                                jax.random.key(999), 8, eta, x_T=x_T)
        difference = np.abs(result.images - np.asarray(other_keys)).max()
        if eta == 0.0:
            assert difference < 1e-5
        else:
            assert difference > 1e-2
    again = _generate(3, schedule=schedule, seed=5, sampler="ddim", ddim_steps=8)
    np.testing.assert_array_equal(again.images, _generate(3, schedule=schedule, seed=5,
                                                          sampler="ddim", ddim_steps=8).images)


@pytest.mark.parametrize("sampler", [{}, dict(sampler="dpmpp", steps=10, solver_order=3)])
def test_images_do_not_depend_on_chunking_and_seed_changes_them(sampler):
    whole = _generate(13, seed=2, trajectory_indices=[12, 0], **sampler)
    assert whole.plan == sampling.ChunkPlan(13, 1)
    for chunk_size in (1, 6):
        chunked = _generate(13, seed=2, chunk_size=chunk_size, trajectory_indices=[12, 0],
                            **sampler)
        assert chunked.plan.num_chunks == -(-13 // chunk_size)
        np.testing.assert_array_equal(chunked.images, whole.images)
        np.testing.assert_array_equal(chunked.trajectory, whole.trajectory)
    # A prefix of a larger request is the smaller request.
    np.testing.assert_array_equal(_generate(20, seed=2, **sampler).images[:13], whole.images)
    assert np.abs(_generate(13, seed=3, **sampler).images - whole.images).min() > 0


def test_trajectory_keeps_only_the_chosen_steps():
    full = _generate(7, seed=1, chunk_size=3, trajectory_indices=[5, 2])
    assert full.trajectory_steps == tuple(range(50))
    few = _generate(7, seed=1, chunk_size=3, trajectory_indices=[5, 2], trajectory_frames=4)
    assert few.trajectory_steps == (0, 16, 33, 49) and few.trajectory.shape == (4, 2, *SHAPE)
    np.testing.assert_array_equal(few.trajectory, full.trajectory[[0, 16, 33, 49]])
    np.testing.assert_array_equal(few.images, full.images)
    np.testing.assert_array_equal(few.trajectory[-1], full.images[[5, 2]])


def test_progress_reports_every_chunk():
    reports = []
    result = _generate(10, chunk_size=4, progress=reports.append)
    assert result.plan == sampling.ChunkPlan(4, 3)
    assert [(p.chunks_done, p.num_chunks, p.images_done, p.num_images) for p in reports] == [
        (1, 3, 4, 10), (2, 3, 8, 10), (3, 3, 10, 10)]
    assert all(p.elapsed_s > 0 and p.images_per_s > 0 for p in reports)
    assert result.images.shape == (10, *SHAPE) and result.trajectory is None


def test_plan_chunks_wastes_less_than_a_device_per_chunk():
    assert sampling.plan_chunks(13, 8, 64) == sampling.ChunkPlan(16, 1)
    assert sampling.plan_chunks(100, 8, 64) == sampling.ChunkPlan(56, 2)
    assert sampling.plan_chunks(100, 1, 64) == sampling.ChunkPlan(50, 2)
    assert sampling.plan_chunks(64, 8, 64) == sampling.ChunkPlan(64, 1)
    assert sampling.plan_chunks(5, 8, 3) == sampling.ChunkPlan(8, 1)  # at least one per device
    assert sampling.plan_chunks(17, 8, 12) == sampling.ChunkPlan(8, 3)
    for n, d, limit in [(1, 1, 1), (13, 8, 64), (1000, 8, 100), (333, 4, 50), (7, 2, 3)]:
        plan = sampling.plan_chunks(n, d, limit)
        assert plan.chunk_size % d == 0 and plan.num_padded >= n
        assert plan.num_padded - n < plan.num_chunks * d
        assert plan.chunk_size <= max(d, limit)
    assert sampling.default_chunk_size((28, 28, 1), 8) == 83 * 8
    assert sampling.default_chunk_size((256, 256, 3), 2) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="ddpmm"), r"sampler must be one of \['ddpm', 'ddim', 'dpmpp'\], got 'ddpmm'"),
    (dict(sampler="ddim", ddim_steps=51), r"steps must be in \[1, 50\]"),
    (dict(sampler="dpmpp", steps=0), r"steps must be in \[1, 50\]"),
    (dict(steps=5, ddim_steps=6), r"steps=5 and its older name ddim_steps=6 disagree"),
    (dict(sampler="dpmpp", solver_order=4), r"solver_order must be one of \[1, 2, 3\], got 4"),
    (dict(sampler="dpmpp", step_spacing="karras"), r"step_spacing must be one of \['time', "
     r"'logsnr'\], got 'karras'"),
    (dict(sampler="dpmpp", dynamic_threshold=1.5), r"dynamic_threshold must be in \[0, 1\]"),
    (dict(sampler="ddim", dynamic_threshold=0.9), r"applies to sampler 'dpmpp' only"),
    (dict(objective="noise"), r"objective must be one of"),
    (dict(sampler="ddim", ddim_eta=-0.1), r"ddim_eta must be >= 0"),
    (dict(trajectory_indices=[3]), r"trajectory_indices must be in \[0, num_images=3\)"),
    (dict(chunk_size=0), r"chunk_size must be >= 1"),
    (dict(seed=2**31), r"seed must fit in int32"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _generate(3, **kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"num_images must be >= 1"):
        _generate(0)
    with pytest.raises(ValueError, match=r"image_shape must be \(H, W, C\)"):
        sampling.generate(_toy_apply, jnp.float32(0.9), schedules.make_schedule("linear", 5),
                          (6, 6), 2)


_EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from ddpm_jax import sampling, schedules
    from ddpm_jax.models.unet import Unet
    assert jax.device_count() == 8, jax.devices()
    from tests.sampling_test import random_params
    model = Unet(dim=8, dim_mults=(1, 2), channels=1)
    result = sampling.generate(sampling.ModelApply(model), random_params(model),
                               schedules.make_schedule("linear", 20), (8, 8, 1), 13, seed=4,
                               chunk_size=8, trajectory_indices=[12, 3])
    assert result.plan == sampling.ChunkPlan(8, 2), result.plan
    np.savez(sys.argv[1], images=result.images, trajectory=result.trajectory)
""")


@pytest.mark.subprocess
def test_same_images_on_one_and_eight_devices(tmp_path):
    """13 images on 8 simulated devices, in 2 padded chunks, against 1 device."""
    out = tmp_path / "eight.npz"
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(out)], check=True, env=env,
                   cwd=REPO, timeout=300)
    eight = np.load(out)
    model = Unet(dim=8, dim_mults=(1, 2), channels=1)
    params = random_params(model)

    def one_device(chunk_size):
        return sampling.generate(sampling.ModelApply(model), params,
                                 schedules.make_schedule("linear", 20), (8, 8, 1), 13, seed=4,
                                 chunk_size=chunk_size, trajectory_indices=[12, 3])

    # With one image per device call, as on 8 devices, the results are bit for bit equal.
    same_batch = one_device(1)
    np.testing.assert_array_equal(same_batch.images, eight["images"])
    np.testing.assert_array_equal(same_batch.trajectory, eight["trajectory"])
    # With all 13 in one call, XLA's batch-size-dependent kernels round differently.
    whole = one_device(None)
    np.testing.assert_allclose(whole.images, eight["images"], atol=1e-5)
    np.testing.assert_allclose(whole.trajectory, eight["trajectory"], atol=1e-5)
    assert np.abs(whole.images).max() > 0.5


# --- images.py ---------------------------------------------------------------------------------

def test_to_uint8():
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 0, 128, 191, 255, 255])
    assert images.to_uint8(x).dtype == np.uint8


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_grid_layout_and_size(tmp_path, channels, mode):
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, (10, 5, 7, channels)).astype(np.float32)
    path = tmp_path / "grid.png"
    assert images.save_grid(batch, str(path), nrow=4, padding=2) == (3 * 7 + 2, 4 * 9 + 2)
    picture = Image.open(path)
    assert picture.mode == mode and picture.size == (4 * 9 + 2, 3 * 7 + 2)
    pixels = np.asarray(picture).reshape(23, 38, channels)
    # Image 6 sits in row 1, column 2; the padding is black.
    np.testing.assert_array_equal(pixels[9:14, 20:27], images.to_uint8(batch[6]))
    assert pixels[:2].max() == 0 and pixels[:, 18:20].max() == 0
    assert pixels[16:, 29:].max() == 0  # the unused 12th cell
    assert images.grid_size(3, 28, 28, nrow=8, padding=0) == (28, 84)
    assert images.save_grid(batch[:1], str(path), nrow=8, padding=0) == (5, 7)


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match=r"C in \(1, 3\), got shape \(2, 4, 4, 2\)"):
        images.make_grid(np.zeros((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="nrow must be >= 1"):
        images.make_grid(np.zeros((2, 4, 4, 1)), nrow=0)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, C\]"):
        images.save_png(np.zeros((4, 4, 1), np.float32), "unused.png")


def test_trajectory_steps():
    assert sampling.trajectory_steps(5) == (0, 1, 2, 3, 4)
    assert sampling.trajectory_steps(200, 5) == (0, 50, 100, 149, 199)
    assert sampling.trajectory_steps(200, 1) == (199,)
    assert sampling.trajectory_steps(10, 50) == tuple(range(10))
    with pytest.raises(ValueError, match="trajectory_frames must be >= 1"):
        sampling.trajectory_steps(10, 0)


def test_save_gif_frames(tmp_path):
    trajectory = np.random.default_rng(1).uniform(-1, 1, (4, 5, 4, 6, 1))
    path = tmp_path / "a.gif"
    assert images.save_gif(trajectory, str(path), frame_ms=40) == 4
    gif = Image.open(path)
    assert gif.n_frames == 4 and gif.size == (3 * 8 + 2, 2 * 6 + 2)  # nrow = ceil(sqrt(5))
    durations = []
    for frame in range(4):
        gif.seek(frame)
        durations.append(gif.info["duration"])
    assert durations == [40, 40, 40, 1000]
    gif.seek(3)
    np.testing.assert_array_equal(np.asarray(gif.convert("L")),
                                  images.make_grid(trajectory[-1], 3)[..., 0])
    with pytest.raises(ValueError, match=r"trajectory must be \[frames, images, H, W, C\]"):
        images.save_gif(trajectory[0], str(path))
