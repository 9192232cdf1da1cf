"""The FID Inception-v3 of pytorch-fid in Flax, and its weights from pytorch-fid's .pth file.

The standard FID (the number papers report) uses the pool3 features of the
Inception-v3 graph that TensorFlow published on 2015-12-05. pytorch-fid ports
that graph onto torchvision's `Inception3` with its own FID blocks, and its
weights `pt_inception-2015-12-05-6726825d.pth` (FID_WEIGHTS_URL) are the
ones this module loads. The FID blocks differ from torchvision's: the average
pools of Mixed_5b-5d, 6b-6e and 7b leave padding out of the mean
(count_include_pad=False), and Mixed_7c pools its last branch with a max
pool. BatchNorm runs in inference mode with eps 1e-3.

Input handling follows pytorch-fid, which reads PNGs as RGB in [0, 1]: the
images are resized to 299x299 bilinearly (PyTorch's `F.interpolate`,
align_corners=False, no antialiasing) and mapped to 2x - 1. Our images are
already in [-1, 1] (x = 2 * png / 255 - 1), so they enter unchanged; grayscale
images are repeated to 3 channels, as PIL's convert('RGB') does.

Convolutions and the resize run at `Precision.HIGHEST` by default, so an
accelerator computes float32 products as the CPU reference does, not TF32/bf16.
The weights are read and mapped by `torch_weights`.
"""
import functools
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh

from ddpm_jax.models import torch_weights
from ddpm_jax.runtime import parallel

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
FEATURE_DIM = 2048

Variables = Dict[str, Any]
IntPair = Union[int, Tuple[int, int]]


def _pair(value: IntPair) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# --- Resize ---------------------------------------------------------------------------------

def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of PyTorch's bilinear resize (align_corners=False).

    Output pixel o samples the input at s = max((o + 0.5) * in/out - 0.5, 0),
    between floor(s) and floor(s) + 1, the upper index clamped to the last
    pixel: `F.interpolate`'s rule (no antialiasing, also when shrinking). s is
    rounded to float32 once, after a fused multiply-add, as PyTorch's CPU
    kernel does; the weights then equal PyTorch's bit for bit.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    centers = (np.arange(out_size, dtype=f32) + f32(0.5)).astype(np.float64)
    source = np.maximum((np.float64(scale) * centers - 0.5).astype(f32), f32(0.0))
    low = np.minimum(source.astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low.astype(f32)
    rows = np.arange(out_size)
    weights = np.zeros((out_size, in_size), f32)
    np.add.at(weights, (rows, low), f32(1.0) - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def resize_bilinear(images: jnp.ndarray, size: int, precision=jax.lax.Precision.HIGHEST
                    ) -> jnp.ndarray:
    """NHWC images resized to [B, size, size, C] as `F.interpolate(mode='bilinear')` does."""
    rows = jnp.asarray(bilinear_matrix(images.shape[1], size))
    cols = jnp.asarray(bilinear_matrix(images.shape[2], size))
    images = jnp.einsum("oh,bhwc->bowc", rows, images, precision=precision)
    return jnp.einsum("pw,bowc->bopc", cols, images, precision=precision)


# --- Network --------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (running statistics, eps 1e-3), ReLU."""
    features: int
    kernel_size: IntPair
    strides: int = 1
    padding: IntPair = 0
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        pad_h, pad_w = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=self.strides,
                    padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                    precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 stride-1 average over the pixels inside the image (TF's 'SAME' average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3(x, stride: int, padding: int = 0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride),
                       padding=((padding, padding), (padding, padding)))


class FIDInceptionA(nn.Module):
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, 1, name="branch1x1")(x)
        b5 = conv(48, 1, name="branch5x5_1")(x)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, 1, name="branch3x3dbl_1")(x)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, 3, strides=2, name="branch3x3")(x)
        bd = conv(64, 1, name="branch3x3dbl_1")(x)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, stride=2)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1),
                                                                  padding=(3, 0))
        b1 = conv(192, 1, name="branch1x1")(x)
        b7 = conv(c7, 1, name="branch7x7_1")(x)
        b7 = conv(c7, **row, name="branch7x7_2")(b7)
        b7 = conv(192, **col, name="branch7x7_3")(b7)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = conv(192, **row, name="branch7x7dbl_5")(bd)
        bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, 1, name="branch3x3_1")(x)
        b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, 1, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2)], axis=-1)


class FIDInceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (pool='avg', Mixed_7b) or FIDInceptionE_2 ('max', 7c)."""
    pool: str
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1),
                                                                  padding=(1, 0))
        b1 = conv(320, 1, name="branch1x1")(x)
        b3 = conv(384, 1, name="branch3x3_1")(x)
        b3 = [conv(384, **row, name="branch3x3_2a")(b3), conv(384, **col, name="branch3x3_2b")(b3)]
        bd = conv(448, 1, name="branch3x3dbl_1")(x)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = [conv(384, **row, name="branch3x3dbl_3a")(bd),
              conv(384, **col, name="branch3x3dbl_3b")(bd)]
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1, padding=1)
        bp = conv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """Images [B, H, W, 1 or 3] in [-1, 1] -> pool3 features [B, 2048].

    Module names are pytorch-fid's (torchvision's Inception3 attribute names),
    so each variable has one state_dict key (`torch_key`).
    """
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be NHWC with 1 or 3 channels, got {images.shape}")
        x = resize_bilinear(images.astype(jnp.float32), INPUT_SIZE, self.precision)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        p = self.precision
        x = BasicConv2d(32, 3, strides=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, stride=2)
        x = BasicConv2d(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, stride=2)
        x = FIDInceptionA(32, p, name="Mixed_5b")(x)
        x = FIDInceptionA(64, p, name="Mixed_5c")(x)
        x = FIDInceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        for name, channels in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):
            x = FIDInceptionC(channels, p, name=f"Mixed_{name}")(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = FIDInceptionE("avg", p, name="Mixed_7b")(x)
        x = FIDInceptionE("max", p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def variables_template(model: FIDInceptionV3) -> Variables:
    """Shapes ({'params', 'batch_stats'} of `jax.ShapeDtypeStruct`) without initializing."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


# --- Weights from pytorch-fid's .pth file ---------------------------------------------------

def missing_weights_message(path: str) -> str:
    return (f"Inception weights file {path!r} not found. Download pytorch-fid's FID Inception "
            f"weights from {FID_WEIGHTS_URL} on a machine with internet, copy the file here "
            f"and pass its path with --inception_weights=PATH (evaluate.py) or "
            f"config.eval.inception_weights (training).")


def load_inception(path: str, precision=jax.lax.Precision.HIGHEST
                   ) -> Tuple[FIDInceptionV3, Variables]:
    """The FID Inception network and its variables from pytorch-fid's weights file."""
    if not epath.Path(path).is_file():  # local or a URL
        raise FileNotFoundError(missing_weights_message(path))
    model = FIDInceptionV3(precision=precision)
    state_dict = torch_weights.read_state_dict(path, f"the Inception weights {path!r}")
    variables = torch_weights.inception_variables(state_dict, variables_template(model))
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


# --- Features of many images -----------------------------------------------------------------

def _features_sharded(model, variables, images, *, mesh):
    out = model.apply(variables, images)
    return jax.lax.with_sharding_constraint(out, parallel.replicated(mesh))


_features_jit = jax.jit(_features_sharded, static_argnames=("model", "mesh"))


def inception_features(model: FIDInceptionV3, variables: Variables, images: np.ndarray, *,
                       batch_size: int = 100, mesh: Optional[Mesh] = None) -> np.ndarray:
    """pool3 features [N, 2048] (float32 numpy) of images [N, H, W, C] in [-1, 1].

    Fixed batches (one compilation per image shape) of `batch_size` rounded up
    to the device count of `mesh` (default: the first local device), split over
    its devices; the last batch is padded and the padding dropped. Every
    process passes the same images and gets all features.
    """
    mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices()[:1])
    variables = jax.device_put(variables, parallel.replicated(mesh))
    return parallel.map_batches(
        lambda batch: _features_jit(model, variables, batch, mesh=mesh),
        [np.asarray(images, np.float32)], batch_size, mesh=mesh)
