"""The PyTorch -> Flax converter: names, layouts, errors, .pt files, and life without torch."""
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from ddpm_jax import diffusion, schedules
from ddpm_jax.models import torch_weights, unet
from torch_reference import unet as ref

FASHION = dict(dim=28, dim_mults=(1, 2, 4), channels=1)
TINY = dict(dim=8, dim_mults=(1, 2), channels=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)


@pytest.mark.parametrize("flax_path, name", [
    (("init_conv", "kernel"), "init_conv.weight"),
    (("time_mlp_1", "bias"), "time_mlp.1.bias"),
    (("downs_0_2", "fn", "fn", "to_out_0", "kernel"), "downs.0.2.fn.fn.to_out.0.weight"),
    (("downs_1_0", "net_3", "scale"), "downs.1.0.net.3.weight"),
    (("mid_block1", "block2", "norm", "bias"), "mid_block1.block2.norm.bias"),
    (("ups_0_3", "kernel"), "ups.0.3.weight"),
    (("final_conv_0", "res_conv", "kernel"), "final_conv.0.res_conv.weight"),
    (("kernel",), "weight"),
])
def test_torch_name(flax_path, name):
    assert torch_weights.torch_name(flax_path) == name


@pytest.mark.parametrize("config", [
    FASHION, dict(dim=128, dim_mults=(1, 2, 2, 2), channels=3, use_convnext=False)],
    ids=["fashion_convnext", "cifar_resnet"])
def test_every_parameter_has_exactly_one_pytorch_counterpart(config):
    template = traverse_util.flatten_dict(torch_weights.abstract_params(unet.Unet(**config)))
    state_dict = ref.Unet(**config).state_dict()
    assert sorted(torch_weights.torch_name(path) for path in template) == sorted(state_dict)


def test_layouts():
    state_dict = ref.Unet(**TINY).state_dict()
    params = torch_weights.torch_to_flax(state_dict, torch_weights.abstract_params(unet.Unet(**TINY)))
    np.testing.assert_array_equal(  # conv [out, in, kh, kw] -> [kh, kw, in, out]
        params["init_conv"]["kernel"][1, 2, 0, 3], state_dict["init_conv.weight"][3, 0, 1, 2])
    np.testing.assert_array_equal(  # transposed conv [in, out, kh, kw] -> [kh, kw, out, in]
        params["ups_0_3"]["kernel"][0, 3, 1, 2], state_dict["ups.0.3.weight"][2, 1, 0, 3])
    np.testing.assert_array_equal(  # depthwise [c, 1, 7, 7] -> [7, 7, 1, c]
        params["downs_0_0"]["ds_conv"]["kernel"][4, 5, 0, 3],
        state_dict["downs.0.0.ds_conv.weight"][3, 0, 4, 5])
    np.testing.assert_array_equal(  # Linear [out, in] -> [in, out]
        params["time_mlp_3"]["kernel"][5, 9], state_dict["time_mlp.3.weight"][9, 5])
    np.testing.assert_array_equal(
        params["mid_attn"]["fn"]["norm"]["scale"], state_dict["mid_attn.fn.norm.weight"])


def test_numpy_state_dict_gives_the_same_params():
    state_dict = ref.Unet(**TINY).state_dict()
    template = torch_weights.abstract_params(unet.Unet(**TINY))
    from_tensors = torch_weights.torch_to_flax(state_dict, template)
    from_numpy = torch_weights.torch_to_flax({k: v.numpy() for k, v in state_dict.items()}, template)
    jax.tree.map(np.testing.assert_array_equal, from_tensors, from_numpy)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(from_numpy))


@pytest.mark.parametrize("torch_config, message", [
    (dict(FASHION, dim=32),
     r"'init_conv.weight' has shape \(20, 1, 7, 7\) in the checkpoint but \(18, 1, 7, 7\)"),
    (dict(FASHION, channels=3),
     r"'init_conv.weight' has shape \(18, 3, 7, 7\) in the checkpoint but \(18, 1, 7, 7\)"),
    (dict(FASHION, use_convnext=False, resnet_block_groups=4),
     r"'downs.0.0.mlp.1.weight' has shape \(28, 112\) in the checkpoint but \(18, 112\)"),
    (dict(FASHION, dim_mults=(1, 2, 4, 8)),
     r"'downs.2.3.weight' has no counterpart"),
], ids=["dim", "channels", "resnet_into_convnext", "extra_level"])
def test_wrong_architecture_names_first_mismatch(torch_config, message):
    template = torch_weights.abstract_params(unet.Unet(**FASHION))
    with pytest.raises(ValueError, match=message):
        torch_weights.torch_to_flax(ref.Unet(**torch_config).state_dict(), template)


def test_variables_dict_as_template_is_rejected():
    template = {"params": torch_weights.abstract_params(unet.Unet(**TINY))}
    with pytest.raises(ValueError, match="pass its 'params' entry"):
        torch_weights.torch_to_flax(ref.Unet(**TINY).state_dict(), template)


def test_missing_parameter_is_named():
    state_dict = ref.Unet(**TINY).state_dict()
    del state_dict["final_conv.1.bias"]
    with pytest.raises(ValueError, match=r"lacks 1 parameter\(s\).*'final_conv.1.bias'"):
        torch_weights.torch_to_flax(state_dict, torch_weights.abstract_params(unet.Unet(**TINY)))


def test_pytorch_checkpoint_loads_and_samples(tmp_path):
    """A model saved by the PyTorch design predicts the same noise here, and samples."""
    torch_model = ref.Unet(**TINY)
    path = tmp_path / "model.pt"
    torch.save(torch_model.state_dict(), path)
    model = unet.Unet(**TINY)
    params = torch_weights.load_torch_checkpoint(str(path), model)

    x, t = torch.randn(2, 1, 4, 6), torch.tensor([0, 9])
    expected = torch_model(x, t).detach().numpy().transpose(0, 2, 3, 1)
    got = model.apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                      jnp.asarray(t.numpy(), jnp.int32))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)

    schedule = schedules.make_schedule("linear", 10)
    samples = jax.jit(lambda key: diffusion.p_sample_loop(
        schedule, lambda x, t: model.apply({"params": params}, x, t), (2, 4, 6, 1), key))(
            jax.random.key(0))
    assert samples.shape == (2, 4, 6, 1) and bool(jnp.all(jnp.isfinite(samples)))


def test_file_without_a_state_dict_is_rejected(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="holds a list, not a state_dict"):
        torch_weights.load_torch_checkpoint(str(path), unet.Unet(**TINY))


@pytest.mark.subprocess
def test_package_works_without_torch(tmp_path):
    """With torch unimportable, the model and the array converter work; only .pt needs it."""
    arrays = tmp_path / "state_dict.npz"
    np.savez(arrays, **{k: v.numpy() for k, v in ref.Unet(**TINY).state_dict().items()})
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from ddpm_jax.models import torch_weights, unet
        model = unet.Unet(**{TINY!r})
        template = torch_weights.abstract_params(model)
        params = torch_weights.torch_to_flax(dict(np.load(sys.argv[1])), template)
        print("converted", len(params))
        torch_weights.load_torch_checkpoint("unused.pt", model)
    """)
    result = subprocess.run([sys.executable, "-c", code, str(arrays)], capture_output=True,
                            text=True, check=False, cwd=pathlib.Path(__file__).parents[1])
    assert "converted" in result.stdout, result.stderr
    assert "needs PyTorch: pip install torch" in result.stderr
