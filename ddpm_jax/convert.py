"""Port a PyTorch state_dict of the design's Unet to `ddpm_jax.unet` parameters.

Flax names are PyTorch's with '.' before a list index written '_' (see
unet.py), so each Flax parameter has exactly one PyTorch name. Layouts:
conv kernels [out, in, kh, kw] -> [kh, kw, in, out]; transposed-conv kernels
[in, out, kh, kw] -> [kh, kw, out, in] (the same permutation, read by
`transpose_kernel=True`); Linear [out, in] -> [in, out]; GroupNorm weight ->
scale. PyTorch is imported only to read `.pt` files, so the package runs
without it.
"""
import re
from typing import Any, Dict, Mapping, Tuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm_jax.unet import Unet

_KERNEL_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}  # PyTorch axis order -> Flax, by ndim
_KERNEL_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}


def torch_name(flax_path: Tuple[str, ...]) -> str:
    """The PyTorch state_dict key of the Flax parameter at `flax_path`.

    ('downs_0_2', 'fn', 'norm', 'scale') -> 'downs.0.2.fn.norm.weight'.
    """
    *modules, leaf = flax_path
    modules = [re.sub(r"_(\d+)(?=_|$)", r".\1", m) for m in modules]
    return ".".join([*modules, "bias" if leaf == "bias" else "weight"])


def _torch_shape(flax_path: Tuple[str, ...], flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if flax_path[-1] == "kernel":
        return tuple(flax_shape[axis] for axis in _KERNEL_TO_TORCH[len(flax_shape)])
    return tuple(flax_shape)


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (any device, float dtype) or array-like as a float32 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def torch_to_flax(state_dict: Mapping[str, Any], params_template: Mapping[str, Any]) -> Dict:
    """Flax params with the structure of `params_template`, taken from a PyTorch state_dict.

    Args:
      state_dict: PyTorch parameter names -> tensors or numpy arrays, of the
        design's `Unet` or of any of its blocks.
      params_template: the 'params' collection of the matching Flax module
        (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`).

    Raises:
      ValueError naming the first parameter (in state_dict order) whose shape
      differs, with both shapes in PyTorch layout, or a name one side lacks.
    """
    if set(params_template) == {"params"}:
        raise ValueError("params_template is a variables dict: pass its 'params' entry")
    template = flax.traverse_util.flatten_dict(params_template)
    path_of = {torch_name(path): path for path in template}
    converted = {}
    for name, value in state_dict.items():
        if name not in path_of:
            raise ValueError(f"checkpoint parameter {name!r} has no counterpart in the Flax "
                             f"model: the checkpoint is of another architecture")
        path = path_of[name]
        array = _to_numpy(value)
        expected = _torch_shape(path, template[path].shape)
        if array.shape != expected:
            raise ValueError(f"parameter {name!r} has shape {tuple(array.shape)} in the "
                             f"checkpoint but {expected} in the model: the checkpoint is of "
                             f"another architecture")
        if path[-1] == "kernel":
            array = array.transpose(_KERNEL_TO_FLAX[array.ndim])
        converted[path] = jnp.asarray(array, dtype=template[path].dtype)
    missing = [torch_name(path) for path in template if path not in converted]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} parameter(s) of the model, "
                         f"first {missing[0]!r}: it is of another architecture")
    return flax.traverse_util.unflatten_dict(converted)


def abstract_params(model: Unet) -> Dict:
    """Shapes and dtypes of `model`'s params, without computing anything.

    Parameter shapes do not depend on the image size, so the smallest size
    the network accepts is used.
    """
    side = 2 ** (len(model.dim_mults) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, model.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]


def load_torch_checkpoint(path: str, model: Unet) -> Dict:
    """Flax params for `model` from a `torch.save(model.state_dict(), path)` file."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError("load_torch_checkpoint needs PyTorch to read .pt files: "
                          "pip install torch") from err
    with epath.Path(path).open("rb") as f:  # local or a URL
        state_dict = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict "
                         f"(a mapping of parameter names to tensors)")
    return torch_to_flax(state_dict, abstract_params(model))
