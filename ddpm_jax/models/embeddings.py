"""What the UNet conditions on besides the image: the timestep and, optionally, a class.

The sinusoidal timestep embedding is the design's. The class embedding is
beyond it (classifier-free guidance, Ho & Salimans 2022): a learned row per
class plus a last "no class" row (`null_label(num_classes) == num_classes`),
added to the time embedding. Training replaces a fraction of the labels by
the null row, so one network predicts both eps(x, c) and eps(x, none).
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class SinusoidalPositionEmbeddings(nn.Module):
    """Timesteps [B] -> [B, dim] embeddings: sin then cos of t * 10000^(-i / (dim/2 - 1))."""
    dim: int

    def __call__(self, time):
        half_dim = self.dim // 2
        scale = math.log(10000) / (half_dim - 1)
        freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -scale)
        args = time.astype(jnp.float32)[:, None] * freqs[None, :]
        return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def null_label(num_classes: int) -> int:
    """The "no class" label: the embedding's last row."""
    return num_classes


def check_labels(labels, num_classes: int, batch: int) -> None:
    """Raise ValueError unless `labels` fits a network of `num_classes` classes (0: none)."""
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels were given to an unconditional network (num_classes=0)")
        return
    if labels is None or labels.shape != (batch,):
        raise ValueError(f"a network with num_classes={num_classes} needs int labels of shape "
                         f"[B] = ({batch},) (0..{num_classes - 1}, or {num_classes} for no "
                         f"class), got {None if labels is None else labels.shape}")


class ClassEmbedding(nn.Module):
    """Labels [B] in 0..num_classes (the last is "no class") -> [B, features].

    Rows start as PyTorch's `nn.Embedding`: N(0, 1).
    """
    num_classes: int
    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, labels):
        return nn.Embed(self.num_classes + 1, self.features, dtype=self.dtype,
                        embedding_init=nn.initializers.normal(1.0), name="embedding")(labels)
