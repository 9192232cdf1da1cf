"""The design's UNet noise predictor in Flax Linen, layer for layer equal to PyTorch.

Each module mirrors the PyTorch class of the same name in the design document
("The Annotated Diffusion Model", its lost minus signs restored from the math),
with images NHWC instead of NCHW. Input channel counts are inferred from the
input, as usual in Flax, so a PyTorch `Block(dim, dim_out)` is `Block(dim_out)`.

Where PyTorch and Flax defaults differ, PyTorch's are used: GroupNorm epsilon
1e-5, exact (erf) GELU, the padding of `ConvTranspose2d(d, d, 4, 2, 1)`, and
PyTorch's default initialisation (uniform in +-1/sqrt(fan_in) for weights and
biases), so that training from scratch starts where the design's does.

Submodule names are the PyTorch attribute paths, with each '.' before a list
index written '_': PyTorch's `downs.0.2.fn.norm.weight` is Flax's
`downs_0_2/fn/norm/scale`. `ddpm_jax.models.torch_weights` relies on this to port weights.

Beyond the design: `dropout` in the residual blocks (off by default), a
compute `dtype` (e.g. bfloat16 activations with float32 parameters; GroupNorm
statistics and softmax stay float32) and `num_classes` > 0, a class embedding
added to the time embedding (`ddpm_jax.models.embeddings`); with 0 the network and its
parameters are exactly the design's.
"""
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import conv
from ddpm_jax.models.embeddings import ClassEmbedding, SinusoidalPositionEmbeddings, check_labels
from ddpm_jax.models.unet_checks import check_architecture, check_image_size

GROUP_NORM_EPSILON = 1e-5  # PyTorch's; Flax defaults to 1e-6.

gelu = functools.partial(nn.gelu, approximate=False)  # PyTorch nn.GELU is the exact erf form.


# --- PyTorch's default initialisation ---------------------------------------------------------

def _torch_kernel_init():
    """kaiming_uniform(a=sqrt(5)) of nn.Conv2d/nn.Linear: U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    """PyTorch's bias init U(+-1/sqrt(fan_in)); the bound needs the layer's fan_in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv(features: int, kernel_size: int, in_features: int, *, dtype, name: str,
          padding: int = 0, strides: int = 1, use_bias: bool = True) -> nn.Conv:
    """PyTorch `nn.Conv2d(in_features, features, kernel_size, strides, padding)`."""
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=padding, use_bias=use_bias, dtype=dtype,
                   kernel_init=_torch_kernel_init(),
                   bias_init=_torch_bias_init(in_features * kernel_size ** 2), name=name)


def _dense(features: int, in_features: int, *, dtype, name: str) -> nn.Dense:
    """PyTorch `nn.Linear(in_features, features)`."""
    return nn.Dense(features, dtype=dtype, kernel_init=_torch_kernel_init(),
                    bias_init=_torch_bias_init(in_features), name=name)


def _group_norm(groups: int, *, dtype, name: str) -> nn.GroupNorm:
    """PyTorch `nn.GroupNorm(groups, c)`; Flax computes its statistics in float32."""
    return nn.GroupNorm(num_groups=groups, epsilon=GROUP_NORM_EPSILON, dtype=dtype, name=name)


def _softmax(x, axis: int):
    """Softmax in float32 whatever the compute dtype, cast back."""
    return jax.nn.softmax(x.astype(jnp.float32), axis=axis).astype(x.dtype)


# --- Building blocks ---------------------------------------------------------------------------

class Downsample(nn.Module):
    """PyTorch `nn.Conv2d(dim, dim, 4, 2, 1)`: halves height and width.

    Parameters as flax `nn.Conv`'s: kernel [4, 4, in, dim], bias [dim]. On CPU
    the input gradient is a transposed conv (`conv.downsample`: 3x faster on XLA:CPU).
    """
    dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param("kernel", _torch_kernel_init(), (4, 4, in_features, self.dim),
                            jnp.float32)
        bias = self.param("bias", _torch_bias_init(in_features * 4 * 4), (self.dim,),
                          jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv.downsample(x, kernel, bias)


class Upsample(nn.Module):
    """PyTorch `nn.ConvTranspose2d(dim, dim, 4, 2, 1)`: doubles height and width.

    The transposed conv pads the dilated input by kernel - 1 - padding = 2 on
    each side; `transpose_kernel=True` makes the kernel the forward conv's, as
    in PyTorch (its [in, out, kh, kw] weight is this kernel's [kh, kw, out, in]).
    On CPU it is computed by `conv.upsample_conv_transpose` (four 2x2 convs,
    5-8x faster on XLA:CPU, equal within float32 rounding); elsewhere by
    `lax.conv_transpose`. Parameters, as flax `nn.ConvTranspose`'s:
    kernel [4, 4, dim, in], bias [dim].
    """
    dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param("kernel", _torch_kernel_init(), (4, 4, self.dim, in_features),
                            jnp.float32)
        bias = self.param("bias", _torch_bias_init(self.dim * 4 * 4), (self.dim,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv.upsample(x, kernel, bias)


class DepthwiseConv(nn.Module):
    """ConvNeXt's depthwise conv, PyTorch `nn.Conv2d(c, c, k, padding=k // 2, groups=c)`.

    XLA:CPU runs grouped convolutions 20-50x slower than PyTorch and XLA:GPU
    their gradient slowly, so on CPU and GPU `conv.depthwise` uses shifted
    multiply-adds (equal within float32 rounding); on TPU the grouped convolution.
    Parameters: kernel [k, k, 1, c], bias [c].
    """
    kernel_size: int = 7
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        channels, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", _torch_kernel_init(), (k, k, 1, channels), jnp.float32)
        bias = self.param("bias", _torch_bias_init(k * k), (channels,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv.depthwise(x, kernel, bias)


class Block(nn.Module):
    """3x3 conv, GroupNorm, SiLU."""
    dim_out: int
    groups: int = 8
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = _conv(self.dim_out, 3, x.shape[-1], padding=1, dtype=self.dtype, name="proj")(x)
        x = _group_norm(self.groups, dtype=self.dtype, name="norm")(x)
        return nn.silu(x)


def _residual_path(x, dim_out: int, dtype):
    """The design's `res_conv`: a 1x1 conv where the channel count changes, else identity."""
    if x.shape[-1] == dim_out:
        return x
    return _conv(dim_out, 1, x.shape[-1], dtype=dtype, name="res_conv")(x)


class ResnetBlock(nn.Module):
    """Two Blocks with the time embedding added in between (https://arxiv.org/abs/1512.03385).

    Dropout, beyond the design, acts before block2's conv as in the DDPM recipe.
    """
    dim_out: int
    groups: int = 8
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, time_emb=None, *, train: bool = False):
        h = Block(self.dim_out, self.groups, self.dtype, name="block1")(x)
        if time_emb is not None:
            condition = _dense(self.dim_out, time_emb.shape[-1], dtype=self.dtype,
                               name="mlp_1")(nn.silu(time_emb))
            h = h + condition[:, None, None, :]
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Block(self.dim_out, self.groups, self.dtype, name="block2")(h)
        return h + _residual_path(x, self.dim_out, self.dtype)


class ConvNextBlock(nn.Module):
    """ConvNeXt block (https://arxiv.org/abs/2201.03545) with the time embedding added.

    Dropout, beyond the design, acts after the GELU (the design's net.2).
    """
    dim_out: int
    mult: int = 2
    norm: bool = True
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, time_emb=None, *, train: bool = False):
        dim, hidden = x.shape[-1], self.dim_out * self.mult
        h = DepthwiseConv(7, self.dtype, name="ds_conv")(x)
        if time_emb is not None:
            condition = _dense(dim, time_emb.shape[-1], dtype=self.dtype,
                               name="mlp_1")(gelu(time_emb))
            h = h + condition[:, None, None, :]
        if self.norm:
            h = _group_norm(1, dtype=self.dtype, name="net_0")(h)
        h = _conv(hidden, 3, dim, padding=1, dtype=self.dtype, name="net_1")(h)
        h = gelu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _group_norm(1, dtype=self.dtype, name="net_3")(h)
        h = _conv(self.dim_out, 3, hidden, padding=1, dtype=self.dtype, name="net_4")(h)
        return h + _residual_path(x, self.dim_out, self.dtype)


def _qkv(x, heads: int, dim_head: int, dtype, name: str = "to_qkv"):
    """The 1x1 `to_qkv` conv, split into q, k, v of [B, H*W, heads, dim_head].

    Channels split as PyTorch's "(h c)" (head outer) and pixels flatten as its
    "(x y)" (row-major), so attention sees the same sequence as in PyTorch.
    """
    b, height, width, dim = x.shape
    qkv = _conv(heads * dim_head * 3, 1, dim, use_bias=False, dtype=dtype, name=name)(x)
    return [t.reshape(b, height * width, heads, dim_head) for t in jnp.split(qkv, 3, axis=-1)]


class Attention(nn.Module):
    """Multi-head self-attention over all pixels (used at the lowest resolution)."""
    heads: int = 4
    dim_head: int = 32
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, height, width, dim = x.shape
        hidden = self.heads * self.dim_head
        q, k, v = _qkv(x, self.heads, self.dim_head, self.dtype)
        q = q * self.dim_head ** -0.5
        sim = jnp.einsum("bihd,bjhd->bhij", q, k)
        # The design subtracts the row max first; softmax does the same itself.
        attn = _softmax(sim, axis=-1)
        out = jnp.einsum("bhij,bjhd->bihd", attn, v).reshape(b, height, width, hidden)
        return _conv(dim, 1, hidden, dtype=self.dtype, name="to_out")(out)


class LinearAttention(nn.Module):
    """Linear attention (Shen et al. 2018): cost linear in the number of pixels."""
    heads: int = 4
    dim_head: int = 32
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, height, width, dim = x.shape
        hidden = self.heads * self.dim_head
        q, k, v = _qkv(x, self.heads, self.dim_head, self.dtype)
        q = _softmax(q, axis=-1)  # over the features d (PyTorch's dim=-2)
        k = _softmax(k, axis=1)   # over the pixels n (PyTorch's dim=-1)
        q = q * self.dim_head ** -0.5
        context = jnp.einsum("bnhd,bnhe->bhde", k, v)
        out = jnp.einsum("bhde,bnhd->bnhe", context, q).reshape(b, height, width, hidden)
        out = _conv(dim, 1, hidden, dtype=self.dtype, name="to_out_0")(out)
        return _group_norm(1, dtype=self.dtype, name="to_out_1")(out)


class PreNorm(nn.Module):
    """GroupNorm(1, c), then `fn`."""
    fn: nn.Module
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        return self.fn(_group_norm(1, dtype=self.dtype, name="norm")(x))


class Residual(nn.Module):
    """fn(x) + x."""
    fn: nn.Module

    def __call__(self, x):
        return self.fn(x) + x


def _attention_layer(attention_cls, *, dtype, name: str) -> Residual:
    """The design's `Residual(PreNorm(dim, attention_cls(dim)))`, named as in PyTorch.

    The inner modules are built unbound (parent=None) so that they nest under
    the wrapper as `fn`, like PyTorch's `.fn.fn`.
    """
    attention = attention_cls(dtype=dtype, parent=None)
    return Residual(PreNorm(attention, dtype=dtype, parent=None), name=name)


# --- The network -------------------------------------------------------------------------------

class Unet(nn.Module):
    """The design's U-Net: noisy images [B, H, W, channels] and int timesteps [B] -> noise.

    Call as `Unet(...).apply({'params': p}, x, t, train=False)`, with int class
    labels [B] as a third argument when num_classes > 0; with `train=True`
    and dropout > 0 pass `rngs={'dropout': key}`. The output is float32
    [B, H, W, out_dim] whatever the compute `dtype`. A configuration the design
    cannot build raises ValueError at construction, an image size it cannot
    halve at the first call.
    """
    dim: int
    init_dim: Optional[int] = None
    out_dim: Optional[int] = None
    dim_mults: Sequence[int] = (1, 2, 4, 8)
    channels: int = 3
    with_time_emb: bool = True
    resnet_block_groups: int = 8
    use_convnext: bool = True
    convnext_mult: int = 2
    dropout: float = 0.0
    dtype: Any = jnp.float32
    num_classes: int = 0

    def __post_init__(self):
        check_architecture(dim=self.dim, dim_mults=self.dim_mults, init_dim=self.init_dim,
                           with_time_emb=self.with_time_emb,
                           resnet_block_groups=self.resnet_block_groups,
                           use_convnext=self.use_convnext, dropout=self.dropout,
                           num_classes=self.num_classes)
        super().__post_init__()

    def _block(self, dim_out: int, name: str) -> nn.Module:
        if self.use_convnext:
            return ConvNextBlock(dim_out, mult=self.convnext_mult, dropout=self.dropout,
                                 dtype=self.dtype, name=name)
        return ResnetBlock(dim_out, groups=self.resnet_block_groups, dropout=self.dropout,
                           dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x, time, labels=None, *, train: bool = False):
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"x must be NHWC [B, H, W, channels={self.channels}], "
                             f"got shape {x.shape}")
        if self.with_time_emb and time.shape != x.shape[:1]:
            raise ValueError(f"time must be timesteps of shape [B] = {x.shape[:1]}, "
                             f"got shape {time.shape}")
        check_labels(labels, self.num_classes, x.shape[0])
        check_image_size(x.shape[1:3], self.dim_mults)
        init_dim = self.dim // 3 * 2 if self.init_dim is None else self.init_dim
        dims = [init_dim, *(self.dim * m for m in self.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        num_resolutions = len(in_out)
        dtype = self.dtype

        x = _conv(init_dim, 7, self.channels, padding=3, dtype=dtype, name="init_conv")(x)

        t = None
        if self.with_time_emb:
            time_dim = self.dim * 4
            t = SinusoidalPositionEmbeddings(self.dim)(time)
            t = _dense(time_dim, self.dim, dtype=dtype, name="time_mlp_1")(t)
            t = gelu(t)
            t = _dense(time_dim, time_dim, dtype=dtype, name="time_mlp_3")(t)
            if self.num_classes:
                t = t + ClassEmbedding(self.num_classes, time_dim, dtype, name="class_emb")(labels)

        h = []
        for ind, (_, dim_out) in enumerate(in_out):
            x = self._block(dim_out, f"downs_{ind}_0")(x, t, train=train)
            x = self._block(dim_out, f"downs_{ind}_1")(x, t, train=train)
            x = _attention_layer(LinearAttention, dtype=dtype, name=f"downs_{ind}_2")(x)
            h.append(x)
            if ind < num_resolutions - 1:
                x = Downsample(dim_out, dtype=dtype, name=f"downs_{ind}_3")(x)

        mid_dim = dims[-1]
        x = self._block(mid_dim, "mid_block1")(x, t, train=train)
        x = _attention_layer(Attention, dtype=dtype, name="mid_attn")(x)
        x = self._block(mid_dim, "mid_block2")(x, t, train=train)

        # As in the design, every up stage upsamples (its is_last is never true
        # here) and the first level's skip h[0] is left unused.
        for ind, (dim_in, _) in enumerate(reversed(in_out[1:])):
            x = jnp.concatenate([x, h.pop()], axis=-1)
            x = self._block(dim_in, f"ups_{ind}_0")(x, t, train=train)
            x = self._block(dim_in, f"ups_{ind}_1")(x, t, train=train)
            x = _attention_layer(LinearAttention, dtype=dtype, name=f"ups_{ind}_2")(x)
            x = Upsample(dim_in, dtype=dtype, name=f"ups_{ind}_3")(x)

        out_dim = self.channels if self.out_dim is None else self.out_dim
        x = self._block(self.dim, "final_conv_0")(x, train=train)  # no time embedding here
        x = _conv(out_dim, 1, self.dim, dtype=dtype, name="final_conv_1")(x)
        return x.astype(jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(config) -> Unet:
    """The config's network, for images of `config.data.channels` channels: the one
    constructor that training, evaluation and sampling share."""
    m = config.model
    return Unet(dim=m.dim, init_dim=m.init_dim, dim_mults=tuple(m.dim_mults),
                channels=config.data.channels, with_time_emb=m.with_time_emb,
                resnet_block_groups=m.resnet_block_groups, use_convnext=m.use_convnext,
                convnext_mult=m.convnext_mult, dropout=m.dropout, dtype=DTYPES[m.dtype],
                num_classes=m.num_classes)
