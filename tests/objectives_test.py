"""The eps, x0 and v objectives, Min-SNR weighting and the schedules that reach noise
(terminal_snr 'scaled' and 'zero'): closed forms, finiteness at t = T, every sampler, bits/dim."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from configs import fashion, fashion_scaled_v_minsnr, tiny
from ddpm_jax import diffusion, likelihood, sampling, schedules
from ddpm_jax.config_validation import ConfigError, validate_config
from tests.likelihood_test import _numpy_bound, _toy_denoiser

pytestmark = pytest.mark.newest_stack

SHAPE = (3, 4, 4, 1)


def _alpha_sigma(schedule, t):
    """float64 sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) [B, 1, 1, 1] from the float32 table."""
    alpha = np.asarray(schedule.sqrt_alphas_cumprod, np.float64)[t].reshape(-1, 1, 1, 1)
    sigma = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)[t].reshape(-1, 1, 1, 1)
    return alpha, sigma


def _draws(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, SHAPE).astype(np.float32),
            rng.standard_normal(SHAPE).astype(np.float32))


@pytest.mark.parametrize("name", sorted(schedules.BETA_SCHEDULES))
@pytest.mark.parametrize("timesteps", [20, 200, 1000])
def test_zero_terminal_snr_reaches_zero_keeps_the_start_and_snr_falls(name, timesteps):
    design = schedules.beta_schedule(name, timesteps)
    betas = schedules.beta_schedule(name, timesteps, "zero")
    ab = np.cumprod(1 - betas)
    assert ab[-1] == 0.0 and betas[-1] == 1.0
    assert ab[0] == pytest.approx(1 - design[0], rel=1e-12)  # the first step is kept
    snr = ab / (1 - ab)
    assert np.all(np.diff(snr) < 0)
    # Lin et al.: sqrt(alpha_bar) is the design's, shifted and scaled (an affine map).
    sqrt_design = np.sqrt(np.cumprod(1 - design))
    slope = (np.sqrt(ab)[1:] - np.sqrt(ab)[:-1]) / (sqrt_design[1:] - sqrt_design[:-1])
    np.testing.assert_allclose(slope, slope[0], rtol=1e-8)
    constants = schedules.make_schedule(name, timesteps, "zero")
    for field, value in vars(constants).items():
        assert np.isfinite(np.asarray(value)).all(), field
    assert float(constants.sqrt_recip_alphas_cumprod[-1]) == 2.0 ** 12  # the 2^-24 floor


def test_scaled_betas_are_lucidrains_and_cosine_is_unchanged():
    # lucidrains: scale = 1000 / T; linspace(scale * 1e-4, scale * 0.02, T).
    np.testing.assert_allclose(schedules.beta_schedule("linear", 200, "scaled"),
                               np.linspace(5e-4, 0.1, 200), rtol=1e-12)
    assert np.cumprod(1 - schedules.beta_schedule("linear", 200, "scaled"))[-1] == pytest.approx(
        3.03e-5, rel=1e-2)  # FIELD_NOTES: 3.0e-5 (the design's: 0.132)
    np.testing.assert_array_equal(schedules.beta_schedule("linear", 1000, "scaled"),
                                  schedules.beta_schedule("linear", 1000))
    np.testing.assert_array_equal(schedules.beta_schedule("cosine", 200, "scaled"),
                                  schedules.beta_schedule("cosine", 200))
    # T = 20 would reach beta = 1 (0.02 * 50): capped like the cosine schedule.
    assert schedules.beta_schedule("linear", 20, "scaled").max() == schedules.MAX_SCALED_BETA
    with pytest.raises(ValueError, match=r"valid choices: \['design', 'scaled', 'zero'\]"):
        schedules.make_schedule("linear", 20, "zeros")


# eps is undefined at SNR 0 (config validation refuses it with terminal_snr 'zero').
@pytest.mark.parametrize("objective,terminal_snr,t", [
    (objective, "design", t) for objective in diffusion.OBJECTIVES for t in (0, 57, 199)] + [
    (objective, "zero", t) for objective in ("x0", "v") for t in (1, 120, 199)])
def test_each_objective_converts_back_to_x0_and_eps(objective, terminal_snr, t):
    """The network's exact target (`objective_target`) converts back to the x0 and eps that
    made x_t, by the closed forms v = alpha eps - sigma x0, including t = T at zero SNR."""
    schedule = schedules.make_schedule("linear", 200, terminal_snr)
    x0, eps = _draws()
    ts = np.full(SHAPE[0], t, np.int32)
    alpha, sigma = _alpha_sigma(schedule, ts)
    x_t = (alpha * x0 + sigma * eps).astype(np.float32)
    want_target = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[objective]
    target = diffusion.objective_target(schedule, objective, x0, ts, eps)
    np.testing.assert_allclose(target, want_target, atol=1e-6)
    got_x0, got_eps = diffusion.predict_x0_eps(schedule, objective, x_t, ts, target)
    # x_t's float32 rounding, divided by alpha (eps -> x0) or sigma (x0 -> eps).
    a, b = float(alpha[0, 0, 0, 0]), float(sigma[0, 0, 0, 0])
    np.testing.assert_allclose(got_x0, x0, atol=2e-6 / a if objective == "eps" else 2e-6)
    np.testing.assert_allclose(got_eps, eps, atol=2e-6 / b if objective == "x0" else 2e-6)
    if terminal_snr == "zero" and t == 199:  # pure noise: x_T = eps, v = -x0
        np.testing.assert_array_equal(x_t, eps)
        if objective == "v":
            np.testing.assert_array_equal(target, -x0)


@pytest.mark.parametrize("terminal_snr", ["design", "zero"])
def test_min_snr_weights_are_the_formulas(terminal_snr):
    schedule = schedules.make_schedule("linear", 200, terminal_snr)
    t = np.arange(200)
    ab = np.cumprod(1 - schedules.beta_schedule("linear", 200, terminal_snr))
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = ab / (1 - ab)
        clipped = np.minimum(snr, 5.0)
        want = {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1)}
    for objective, weights in want.items():
        weights = np.where(snr == 0, 1.0, weights)  # the official code's weight at SNR 0
        got = np.asarray(diffusion.min_snr_weight(schedule, objective, t, 5.0))
        np.testing.assert_allclose(got, weights, rtol=2e-5)
    assert (snr[-1] == 0) == (terminal_snr == "zero")
    assert np.asarray(diffusion.min_snr_weight(schedule, "eps", t, 5.0))[:10].max() < 0.05


def test_weighted_loss_is_the_weighted_mean_of_per_example_losses():
    schedule = schedules.make_schedule("linear", 50, "scaled")
    x0, eps = _draws(1)
    t = np.array([0, 17, 49], np.int32)
    prediction = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    for objective in diffusion.OBJECTIVES:
        target = np.asarray(diffusion.objective_target(schedule, objective, x0, t, eps))
        per_example = ((prediction - target) ** 2).mean(axis=(1, 2, 3))
        weights = np.asarray(diffusion.min_snr_weight(schedule, objective, t, 5.0))
        got = diffusion.p_losses(schedule, lambda x, tt: prediction, x0, t, eps, "l2",
                                 objective, "min_snr", 5.0)
        np.testing.assert_allclose(float(got), np.mean(weights * per_example), rtol=1e-5)
        plain = diffusion.p_losses(schedule, lambda x, tt: prediction, x0, t, eps, "l2",
                                   objective)
        np.testing.assert_allclose(float(plain), per_example.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="valid choices: \\['none', 'min_snr'\\]"):
        diffusion.p_losses(schedule, lambda x, tt: prediction, x0, t, eps, "l2", "v", "snr")


def _as_objective(schedule, objective, eps_fn):
    """The network of `objective` whose outputs imply the same x0 and eps as `eps_fn`."""
    def denoise(x, t, *labels):
        eps = eps_fn(x, t, *labels)
        x0 = diffusion.predict_start_from_noise(schedule, x, t, eps)
        return diffusion.objective_target(schedule, objective, x0, t, eps)
    return denoise


@pytest.mark.parametrize("objective", diffusion.OBJECTIVES)
def test_bpd_of_every_objective_is_the_numpy_bound_and_the_sum_of_its_terms(objective):
    timesteps = 20
    s = schedules.make_schedule("linear", timesteps)
    x0 = (np.random.default_rng(0).integers(0, 256, SHAPE) / 127.5 - 1.0).astype(np.float32)
    key = jax.random.PRNGKey(5)
    out = likelihood.calc_bpd_loop(s, _as_objective(s, objective, _toy_denoiser),
                                   jnp.asarray(x0), key, objective)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, t), SHAPE), np.float64)
              for t in range(timesteps)]
    want = _numpy_bound(schedules.linear_beta_schedule(timesteps), x0.astype(np.float64), noises)
    np.testing.assert_allclose(np.asarray(out["total_bpd"]), want, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(out["total_bpd"]),
                               np.asarray(out["terms_bpd"].sum(1) + out["prior_bpd"]), rtol=1e-6)


@pytest.mark.parametrize("objective", ["x0", "v"])
def test_bpd_at_zero_terminal_snr_of_the_exact_network_is_its_decoder_term(objective):
    """Data that is one image c: the exact network makes every KL term 0, and at zero
    terminal SNR the prior term is exactly 0 too; the bound is the decoder's NLL."""
    timesteps = 50
    s = schedules.make_schedule("linear", timesteps, "zero")
    c = jnp.asarray((np.random.default_rng(1).integers(0, 256, (2, 3, 3, 1)) / 127.5 - 1.0)
                    .astype(np.float32))

    def exact(x_t, t):
        alpha = diffusion.extract(s.sqrt_alphas_cumprod, t, x_t.shape)
        sigma = diffusion.extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        return diffusion.objective_target(s, objective, c, t, (x_t - alpha * c) / sigma)

    out = likelihood.calc_bpd_loop(s, exact, c, jax.random.PRNGKey(0), objective)
    np.testing.assert_array_equal(np.asarray(out["prior_bpd"]), 0.0)
    np.testing.assert_allclose(np.asarray(out["terms_bpd"][:, 1:]), 0.0, atol=2e-3)
    std = np.sqrt(schedules.schedule_constants(schedules.beta_schedule(
        "linear", timesteps, "zero"))["posterior_variance"][1])
    c64 = np.asarray(c, np.float64)
    upper = np.where(c64 > 0.999, np.inf, c64 + 1 / 255)
    lower = np.where(c64 < -0.999, -np.inf, c64 - 1 / 255)
    decoder = -np.log(norm.cdf(upper, c64, std) - norm.cdf(lower, c64, std))
    np.testing.assert_allclose(np.asarray(out["total_bpd"]),
                               decoder.mean(axis=(1, 2, 3)) / np.log(2), rtol=1e-3)


def _toy_v(x, t):
    return 0.5 * jnp.tanh(x) - 0.001 * t.reshape(-1, 1, 1, 1).astype(x.dtype)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("objective", ["x0", "v"])
def test_the_first_step_from_pure_noise_is_the_posterior_at_the_predicted_x0(objective, clip):
    """At zero terminal SNR, x_T carries no signal: the DDPM step's mean is
    sqrt(alpha_bar_{T-1}) x0_hat (coef2 = 0) and DDIM (eta 0) steps to
    sqrt(alpha_bar_{T-1}) x0_hat + sqrt(1 - alpha_bar_{T-1}) x_T, with x0_hat the network's
    (clipped) x0: -v or x0 itself."""
    s = schedules.make_schedule("linear", 50, "zero")
    x_T = jnp.asarray(_draws(3)[1]) * 3.0
    t = jnp.full((SHAPE[0],), 49, jnp.int32)
    output = _toy_v(x_T, t)
    x0_hat = -output if objective == "v" else output
    x0_hat = jnp.clip(x0_hat, -1, 1) if clip else x0_hat
    alpha_prev, sigma_prev = _alpha_sigma(s, np.array([48]))
    mean = diffusion.p_mean_x0(s, x_T, t, output, objective, clip)
    np.testing.assert_allclose(mean, alpha_prev * x0_hat, rtol=1e-6, atol=1e-7)
    step = diffusion.ddim_step(s, _toy_v, x_T, 49, 48, 0.0, jax.random.PRNGKey(0), clip,
                               objective)
    np.testing.assert_allclose(step, alpha_prev * x0_hat + sigma_prev * x_T, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("objective,checked", [("x0", ("ddpm", False)), ("v", ("ddim", True))])
def test_every_sampler_is_finite_at_zero_terminal_snr_and_generate_is_the_loop(objective,
                                                                               checked):
    s = schedules.make_schedule("linear", 20, "zero")
    key = jax.random.fold_in(jax.random.key(0), 0)  # what `generate` gives image 0 of seed 0
    finals = {}
    for clip in (False, True):
        finals["ddpm", clip] = diffusion.p_sample_loop(
            s, _toy_v, (1, 4, 4, 1), key, clip_denoised=clip, objective=objective)
        finals["ddim", clip] = diffusion.ddim_sample_loop(
            s, _toy_v, (1, 4, 4, 1), key, 7, 1.0, clip_denoised=clip, objective=objective)
    for final in finals.values():
        assert np.isfinite(np.asarray(final)).all() and float(jnp.std(final)) > 0.01
    sampler, clip = checked
    got = sampling.generate(lambda params, x, t: _toy_v(x, t), None, s, (4, 4, 1), 1,
                            sampler=sampler, ddim_steps=7, ddim_eta=1.0, clip_denoised=clip,
                            objective=objective).images
    np.testing.assert_allclose(got, np.asarray(finals[checked]), atol=1e-5)
    with pytest.raises(ValueError, match=r"objective must be one of \['eps', 'x0', 'v'\]"):
        sampling.generate(lambda params, x, t: x, None, s, (4, 4, 1), 1, objective="noise")


def test_guidance_on_v_outputs_is_guidance_on_eps():
    s = schedules.make_schedule("linear", 20, "scaled")
    x, _ = _draws(4)
    t = jnp.array([0, 9, 19], jnp.int32)
    labels = jnp.array([1, 2, 0], jnp.int32)
    eps_net = lambda x, t, y: jnp.tanh(x + 0.1 * y.reshape(-1, 1, 1, 1))  # noqa: E731
    guided_eps = diffusion.guided_denoise_fn(eps_net, 3, 2.0)(x, t, labels)
    guided_v = diffusion.guided_denoise_fn(_as_objective(s, "v", eps_net), 3, 2.0)(x, t, labels)
    np.testing.assert_allclose(diffusion.predict_x0_eps(s, "v", x, t, guided_v)[1], guided_eps,
                               atol=2e-5)


def test_config_refuses_eps_at_zero_terminal_snr_and_bad_choices():
    config = tiny.get_config()
    config.diffusion.terminal_snr = "zero"
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert ("config.diffusion.terminal_snr = 'zero': needs config.diffusion.objective 'v' or "
            "'x0' (it is 'eps'") in str(error.value)
    config.diffusion.objective = "v"
    validate_config(config)
    config.diffusion.objective, config.diffusion.terminal_snr = "noise", "zeros"
    config.diffusion.loss_weighting, config.diffusion.min_snr_gamma = "snr", -1.0
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    for line in ("config.diffusion.objective = 'noise': must be one of ['eps', 'v', 'x0']",
                 "config.diffusion.terminal_snr = 'zeros': must be one of ['design', 'scaled', "
                 "'zero'] (did you mean 'zero'?)",
                 "config.diffusion.loss_weighting = 'snr': must be one of ['min_snr', 'none']",
                 "config.diffusion.min_snr_gamma = -1.0: must be in (0.0, inf)"):
        assert line in str(error.value)


def test_the_design_config_keeps_the_design_and_the_recipe_changes_three_fields_and_sampler():
    design, recipe = fashion.get_config(), fashion_scaled_v_minsnr.get_config()
    assert (design.diffusion.terminal_snr, design.diffusion.objective,
            design.diffusion.loss_weighting, design.sampling.sampler) == (
                "design", "eps", "none", "ddpm")
    changed = {(section, k) for section in ("diffusion", "sampling")
               for k, v in recipe[section].items() if design[section][k] != v}
    assert changed == {("diffusion", "terminal_snr"), ("diffusion", "objective"),
                       ("diffusion", "loss_weighting"), ("sampling", "sampler"),
                       ("sampling", "steps"), ("sampling", "step_spacing")}
    assert (recipe.sampling.sampler, recipe.sampling.steps, recipe.sampling.step_spacing) == (
        "dpmpp", 20, "logsnr")
    for section, k in changed:
        recipe[section][k] = design[section][k]
    assert recipe.to_dict() == design.to_dict()
