"""PyTorch weights in Flax: the design's Unet and pytorch-fid's Inception-v3.

The one place that reads `.pt`/`.pth` files and maps state_dict keys and
layouts onto Flax variables; PyTorch is imported only to read the files, so
the package runs without it.

The Unet's Flax names are PyTorch's with '.' before a list index written '_' (see
unet.py), so each Flax parameter has exactly one PyTorch name. Layouts:
conv kernels [out, in, kh, kw] -> [kh, kw, in, out]; transposed-conv kernels
[in, out, kh, kw] -> [kh, kw, out, in] (the same permutation, read by
`transpose_kernel=True`); Linear [out, in] -> [in, out]; GroupNorm weight ->
scale.
"""
import re
from typing import Any, Dict, Mapping, Tuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm_jax.models.unet import Unet

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


def to_numpy(value) -> np.ndarray:
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
        array = to_numpy(value)
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


def read_state_dict(path: str, what: str) -> Mapping[str, Any]:
    """The object `torch.save` wrote to `path` (local or a URL), read on the CPU; `what`
    names the file in the error if PyTorch is missing."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError(f"reading {what} (a PyTorch file) needs PyTorch: "
                          f"pip install torch") from err
    with epath.Path(path).open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def load_torch_checkpoint(path: str, model: Unet) -> Dict:
    """Flax params for `model` from a `torch.save(model.state_dict(), path)` file."""
    state_dict = read_state_dict(path, f"the checkpoint {path!r}")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict "
                         f"(a mapping of parameter names to tensors)")
    return torch_to_flax(state_dict, abstract_params(model))


# --- pytorch-fid's Inception-v3 (`inception.FIDInceptionV3`) ---------------------------------

# (collection, Flax leaf name) -> PyTorch state_dict suffix.
_INCEPTION_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                   ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                   ("batch_stats", "var"): "running_var"}
# In the file but not in the feature network: the 1008-way logits and BatchNorm's step counters.
_INCEPTION_UNUSED_KEYS = ("fc.weight", "fc.bias")
_INCEPTION_UNUSED_SUFFIX = ".num_batches_tracked"


def inception_key(path: Tuple[str, ...]) -> str:
    """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
    collection, *modules, leaf = path
    return ".".join([*modules, _INCEPTION_LEAF[(collection, leaf)]])


def inception_variables(state_dict: Mapping[str, Any], template: Dict) -> Dict:
    """Flax variables of `FIDInceptionV3` from pytorch-fid's Inception state_dict.

    Args:
      state_dict: state_dict keys -> tensors or arrays (`fc.*` and
        `*.num_batches_tracked` are ignored).
      template: `inception.variables_template(model)` (or initialized variables).

    Raises:
      ValueError naming the first key (in state_dict order) that the network
      lacks or whose shape differs (both shapes in PyTorch layout), or else
      the keys the file lacks.
    """
    expected = {inception_key(path): (path, leaf.shape)
                for path, leaf in flax.traverse_util.flatten_dict(dict(template)).items()}
    flat = {}
    for key, value in state_dict.items():
        if key in _INCEPTION_UNUSED_KEYS or key.endswith(_INCEPTION_UNUSED_SUFFIX):
            continue
        value = to_numpy(value)
        if key not in expected:
            raise ValueError(f"Inception weights: parameter {key!r} (shape {value.shape}) is not "
                             f"in FIDInceptionV3; is this pytorch-fid's "
                             f"pt_inception-2015-12-05 file?")
        path, shape = expected[key]
        if value.shape != _torch_shape(path, shape):
            raise ValueError(f"Inception weights: parameter {key!r} has shape {value.shape} in "
                             f"the file, FIDInceptionV3 expects {_torch_shape(path, shape)}")
        flat[path] = value.transpose(_KERNEL_TO_FLAX[4]) if path[-1] == "kernel" else value
    missing = [key for key, (path, _) in expected.items() if path not in flat]
    if missing:
        raise ValueError(f"Inception weights: the file lacks {len(missing)} parameters of "
                         f"FIDInceptionV3, first {missing[:3]}")
    return flax.traverse_util.unflatten_dict(flat)
