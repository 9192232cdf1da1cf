"""Schedules, forward process, losses and samplers against the PyTorch design."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddpm_jax import diffusion, schedules
from torch_reference import diffusion as ref

pytestmark = pytest.mark.newest_stack

DESIGN_ARRAYS = ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas",
                 "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_variance")


def _ref_constants(name, timesteps, dtype=torch.float64):
    """The design's constants, computed in float64 and then stored in `dtype`.

    (In float32 end to end, PyTorch's cumprod drifts by ~2e-6 over 200 steps;
    the specification is the exact arithmetic.)
    """
    constants = ref.Constants(ref.SCHEDULES[name](timesteps, dtype=torch.float64))
    for field, value in vars(constants).items():
        if isinstance(value, torch.Tensor):
            setattr(constants, field, value.to(dtype))
    return constants


@pytest.mark.parametrize("timesteps", [200, 1000])
@pytest.mark.parametrize("name", sorted(schedules.BETA_SCHEDULES))
def test_schedule_arrays_match_design(name, timesteps):
    ours = schedules.make_schedule(name, timesteps)
    theirs = _ref_constants(name, timesteps)
    for field in DESIGN_ARRAYS:
        got = np.asarray(getattr(ours, field), np.float64)
        want = getattr(theirs, field).numpy()
        assert got.shape == (timesteps,), field
        assert np.abs(got - want).max() <= 1e-6, field


@pytest.mark.parametrize("name", sorted(schedules.BETA_SCHEDULES))
def test_derived_constants_closed_forms(name):
    s = schedules.make_schedule(name, 1000)
    c = _ref_constants(name, 1000)
    ac, acp, betas = (c.alphas_cumprod.numpy(), c.alphas_cumprod_prev.numpy(), c.betas.numpy())
    expected = {
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
        "posterior_mean_coef1": betas * np.sqrt(acp) / (1 - ac),
        "posterior_mean_coef2": (1 - acp) * np.sqrt(c.alphas.numpy()) / (1 - ac),
        "posterior_log_variance_clipped": np.log(np.concatenate(
            [c.posterior_variance.numpy()[1:2], c.posterior_variance.numpy()[1:]])),
    }
    for field, want in expected.items():
        np.testing.assert_allclose(np.asarray(getattr(s, field)), want, rtol=1e-6, atol=1e-6,
                                   err_msg=field)


def test_schedule_is_an_immutable_pytree():
    s = schedules.make_schedule("linear", 10)
    assert len(jax.tree.leaves(s)) == 13
    with pytest.raises(Exception):
        s.betas = s.betas * 2
    doubled = jax.tree.map(lambda a: a * 2, s)
    np.testing.assert_allclose(np.asarray(doubled.betas), 2 * np.asarray(s.betas))


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"unknown beta schedule 'cosin'.*'cosine'"):
        schedules.make_schedule("cosin", 10)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="timesteps must be an integer >= 1"):
            schedules.make_schedule("linear", bad)
    assert schedules.make_schedule("linear", 1).num_timesteps == 1


def _batch(seed, shape=(4, 8, 8, 3)):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, shape).astype(np.float32),
            rng.standard_normal(shape).astype(np.float32))


def test_q_sample_matches_design():
    s, c = schedules.make_schedule("linear", 200), _ref_constants("linear", 200, torch.float32)
    x, noise = _batch(0)
    t = np.array([0, 17, 100, 199], np.int32)
    got = diffusion.q_sample(s, jnp.asarray(x), jnp.asarray(t), jnp.asarray(noise))
    want = ref.q_sample(c, torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(noise))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6)


def _toy_denoiser_jax(x, t):
    return 0.9 * jnp.tanh(0.5 * x + 0.01 * t.reshape(-1, 1, 1, 1).astype(x.dtype))


def _toy_denoiser_torch(x, t):
    return 0.9 * torch.tanh(0.5 * x + 0.01 * t.reshape(-1, 1, 1, 1).to(x.dtype))


@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
def test_p_losses_matches_design(loss_type):
    s, c = schedules.make_schedule("cosine", 200), _ref_constants("cosine", 200, torch.float32)
    x, noise = _batch(1)
    noise = noise * 2.0  # Reach both branches of the huber loss.
    t = np.array([3, 50, 120, 199], np.int32)
    got = diffusion.p_losses(s, _toy_denoiser_jax, jnp.asarray(x), jnp.asarray(t),
                             jnp.asarray(noise), loss_type)
    want = ref.p_losses(c, _toy_denoiser_torch, torch.from_numpy(x), torch.from_numpy(t).long(),
                        torch.from_numpy(noise), loss_type)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    with pytest.raises(ValueError, match=r"unknown loss_type 'l3'.*'huber'"):
        diffusion.p_losses(s, _toy_denoiser_jax, jnp.asarray(x), jnp.asarray(t),
                           jnp.asarray(noise), "l3")


@pytest.mark.parametrize("t_index", [0, 1, 150])
def test_p_sample_matches_design(t_index):
    s, c = schedules.make_schedule("linear", 200), _ref_constants("linear", 200, torch.float32)
    x, _ = _batch(2)
    key = jax.random.PRNGKey(7)
    t = np.full((x.shape[0],), t_index, np.int32)
    got = diffusion.p_sample(s, _toy_denoiser_jax, jnp.asarray(x), jnp.asarray(t), key)
    noise = np.array(jax.random.normal(key, x.shape))
    want = ref.p_sample(c, _toy_denoiser_torch, torch.from_numpy(x), torch.from_numpy(t).long(),
                        t_index, torch.from_numpy(noise))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6)
    if t_index == 0:  # Algorithm 2: no noise at the last step.
        mean = diffusion.p_mean(s, jnp.asarray(x), jnp.asarray(t),
                                _toy_denoiser_jax(jnp.asarray(x), jnp.asarray(t)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(mean))


def _loop_noises(key, shape, timesteps):
    """The draws `p_sample_loop` makes: x_T from the first half of the key, step t from fold_in."""
    init_key, loop_key = jax.random.split(key)
    x_T = np.array(jax.random.normal(init_key, shape))
    noises = [torch.from_numpy(np.array(jax.random.normal(jax.random.fold_in(loop_key, t), shape)))
              for t in range(timesteps)]
    return x_T, noises


def test_p_sample_loop_trajectory_matches_design():
    timesteps, shape = 200, (3, 6, 6, 2)
    s, c = schedules.make_schedule("linear", timesteps), _ref_constants("linear", timesteps,
                                                                         torch.float32)
    key = jax.random.PRNGKey(42)
    loop = jax.jit(lambda k: diffusion.p_sample_loop(s, _toy_denoiser_jax, shape, k,
                                                     return_trajectory=True))
    got = np.asarray(loop(key))
    x_T, noises = _loop_noises(key, shape, timesteps)
    want = np.stack(ref.p_sample_loop(c, _toy_denoiser_torch, torch.from_numpy(x_T), noises))
    assert got.shape == (timesteps,) + shape
    assert np.abs(got - want).max() < 1e-4
    final = diffusion.p_sample_loop(s, _toy_denoiser_jax, shape, key)
    np.testing.assert_allclose(np.asarray(final), got[-1], atol=1e-6)


def test_ddim_timesteps():
    np.testing.assert_array_equal(diffusion.ddim_timesteps(10, 10), np.arange(9, -1, -1))
    ts = diffusion.ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 200\]"):
        diffusion.ddim_timesteps(200, 201)


def test_ddim_eta_one_all_steps_is_ddpm():
    """With eta = 1 and all T steps, DDIM's variance is the DDPM posterior variance."""
    s = schedules.make_schedule("linear", 200)
    t = jnp.arange(1, 200)
    sigma = diffusion.ddim_sigma(s, t, t - 1, 1.0)
    np.testing.assert_allclose(np.asarray(sigma ** 2), np.asarray(s.posterior_variance[1:]),
                               rtol=1e-5)
    # And the whole update equals Algorithm 2's step with the same noise.
    x, _ = _batch(3)
    key = jax.random.PRNGKey(3)
    for step in (150, 1):
        ddim = diffusion.ddim_step(s, _toy_denoiser_jax, jnp.asarray(x), step, step - 1, 1.0, key)
        ddpm = diffusion.p_sample(s, _toy_denoiser_jax, jnp.asarray(x),
                                  jnp.full((x.shape[0],), step, jnp.int32), key)
        np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), atol=2e-5)


def test_ddim_eta_zero_is_deterministic_given_x_T():
    s = schedules.make_schedule("cosine", 200)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 1))
    run = lambda key: diffusion.ddim_sample_loop(s, _toy_denoiser_jax, None, key, 20, 0.0, x_T=x_T)
    a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = diffusion.ddim_sample_loop(s, _toy_denoiser_jax, None, jax.random.PRNGKey(2), 20, 1.0,
                                   x_T=x_T)
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-2
    trajectory = diffusion.ddim_sample_loop(s, _toy_denoiser_jax, None, jax.random.PRNGKey(1), 20,
                                            0.0, x_T=x_T, return_trajectory=True)
    assert trajectory.shape == (20, 2, 5, 5, 1)
    np.testing.assert_allclose(np.asarray(trajectory[-1]), np.asarray(a), atol=1e-6)
