"""The design document's diffusion code in PyTorch, minus signs restored.

The specification that ddpm_jax is checked against. It is
written from the design document, "The Annotated Diffusion Model", with two changes
that keep the arithmetic identical: the constants are computed in a chosen
dtype (float64 for the schedule checks), and the noise of `p_sample` is passed
in so that both frameworks can use the same draws.
"""
import torch
import torch.nn.functional as F


def cosine_beta_schedule(timesteps, s=0.008, dtype=torch.float64):
    steps = timesteps + 1
    x = torch.linspace(0, timesteps, steps, dtype=dtype)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * torch.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0.0001, 0.9999)


def linear_beta_schedule(timesteps, dtype=torch.float64):
    beta_start = 0.0001
    beta_end = 0.02
    return torch.linspace(beta_start, beta_end, timesteps, dtype=dtype)


def quadratic_beta_schedule(timesteps, dtype=torch.float64):
    beta_start = 0.0001
    beta_end = 0.02
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=dtype) ** 2


def sigmoid_beta_schedule(timesteps, dtype=torch.float64):
    beta_start = 0.0001
    beta_end = 0.02
    betas = torch.linspace(-6, 6, timesteps, dtype=dtype)
    return torch.sigmoid(betas) * (beta_end - beta_start) + beta_start


SCHEDULES = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "quadratic": quadratic_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


class Constants:
    """The design's module-level constants, computed from `betas`."""

    def __init__(self, betas):
        self.timesteps = betas.shape[0]
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, axis=0)
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        self.sqrt_recip_alphas = torch.sqrt(1.0 / self.alphas)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))


def extract(a, t, x_shape):
    batch_size = t.shape[0]
    out = a.gather(-1, t.cpu())
    return out.reshape(batch_size, *((1,) * (len(x_shape) - 1))).to(t.device)


def q_sample(c, x_start, t, noise):
    sqrt_alphas_cumprod_t = extract(c.sqrt_alphas_cumprod, t, x_start.shape)
    sqrt_one_minus_alphas_cumprod_t = extract(c.sqrt_one_minus_alphas_cumprod, t, x_start.shape)
    return sqrt_alphas_cumprod_t * x_start + sqrt_one_minus_alphas_cumprod_t * noise


def p_losses(c, denoise_model, x_start, t, noise, loss_type="l1"):
    x_noisy = q_sample(c, x_start=x_start, t=t, noise=noise)
    predicted_noise = denoise_model(x_noisy, t)
    if loss_type == "l1":
        loss = F.l1_loss(noise, predicted_noise)
    elif loss_type == "l2":
        loss = F.mse_loss(noise, predicted_noise)
    elif loss_type == "huber":
        loss = F.smooth_l1_loss(noise, predicted_noise)
    else:
        raise NotImplementedError()
    return loss


@torch.no_grad()
def p_sample(c, model, x, t, t_index, noise):
    betas_t = extract(c.betas, t, x.shape)
    sqrt_one_minus_alphas_cumprod_t = extract(c.sqrt_one_minus_alphas_cumprod, t, x.shape)
    sqrt_recip_alphas_t = extract(c.sqrt_recip_alphas, t, x.shape)
    model_mean = sqrt_recip_alphas_t * (
        x - betas_t * model(x, t) / sqrt_one_minus_alphas_cumprod_t)
    if t_index == 0:
        return model_mean
    posterior_variance_t = extract(c.posterior_variance, t, x.shape)
    return model_mean + torch.sqrt(posterior_variance_t) * noise


@torch.no_grad()
def p_sample_loop(c, model, img, noises):
    """The design's loop from x_T = `img`; `noises[t]` is the noise of step t."""
    b = img.shape[0]
    imgs = []
    for i in reversed(range(0, c.timesteps)):
        img = p_sample(c, model, img, torch.full((b,), i, dtype=torch.long), i, noises[i])
        imgs.append(img.cpu().numpy())
    return imgs
