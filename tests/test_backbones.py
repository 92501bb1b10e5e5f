"""DeepLab-ResNet backbones and the torchvision/timm weight import, against a torch reference.

The reference (tests/torch_resnet.py) is torchvision's ResNet rebuilt in plain torch.nn with
torchvision's parameter names (torchvision does not import beside the CPU torch wheel used
here); it is randomly initialised, its BatchNorms calibrated on a random batch, and saved as a
state dict (``.pth`` with torch, ``.safetensors`` with the safetensors package). No weights are
downloaded. torch comes with the ``test`` extra.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_resnet
from rwseg.models.backbones import (ResNet, ResNetEncoder, WeightImportError, build_backbone, load_torch_weights,
                                    read_state_dict)
from rwseg.models.backbones.resnet import BLOCKS, HEADS, LEVELS, FrozenAffine, FrozenBatchNorm, level_grid, stage_dilations
from rwseg.layers.grid import upsample

SIZE = (33, 37)  # odd and even: torch's symmetric padding, rounded-up sizes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{depth: (state dict, .pth path, .safetensors path)} of randomly initialised references."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("resnet_checkpoints")
    out = {}
    for depth in (50, 101):
        sd = torch_resnet.resnet(BLOCKS[depth], seed=depth).state_dict()
        pth, st = folder / f"resnet{depth}.pth", folder / f"resnet{depth}.safetensors"
        torch.save(sd, pth)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
        out[depth] = (sd, pth, st)
    return out


def _encoder(blocks, output_stride):
    """An encoder without initialisation (every array comes from the checkpoint)."""
    return nnx.eval_shape(lambda: ResNetEncoder(blocks, output_stride=output_stride, rngs=nnx.Rngs(0)))


def _images(seed=0, size=SIZE, batch=2):
    return np.random.default_rng(seed).standard_normal((batch, *size, 3)).astype(np.float32)


def _torch_levels(model, x):
    with torch.no_grad():
        levels = model.levels(torch.from_numpy(x).permute(0, 3, 1, 2))
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in levels.items()}


# both depths, both strides and both file formats in two cases (each case is an eager ResNet
# forward of 10-25 s on 2 cores; the other two combinations add no code path)
@pytest.mark.parametrize("depth,output_stride", [(50, 16), (101, 8)])
def test_encoder_features_match_torch(checkpoints, depth, output_stride):
    sd, pth, st = checkpoints[depth]
    ref = torch_resnet.with_stride(sd, BLOCKS[depth], output_stride)
    x = _images(depth + output_stride)
    expected = _torch_levels(ref, x)
    encoder = _encoder(BLOCKS[depth], output_stride)
    source = pth if output_stride == 8 else st  # both file formats, on both depths
    report = load_torch_weights(encoder, source)
    assert report.initialised == () and len(report.loaded) == len(nnx.to_flat_state(nnx.state(encoder)))
    got = encoder(jnp.asarray(x))
    assert set(got) == set(LEVELS)
    for level in LEVELS:
        s = level_grid(level, output_stride).stride
        assert got[level].shape == expected[level].shape == (2, -(-SIZE[0] // s), -(-SIZE[1] // s),
                                                               got[level].shape[-1])
        assert got[level].dtype == jnp.float32
        assert np.abs(expected[level]).max() > 0.5  # calibrated: O(1) features, not vanished or exploded
        err, scale = np.abs(np.asarray(got[level]) - expected[level]).max(), np.abs(expected[level]).max()
        assert err <= 1e-4 * max(1.0, scale), (level, err, scale)  # float32: relative to the features' scale


def test_both_file_formats_give_the_same_arrays(checkpoints):
    sd, pth, st = checkpoints[50]
    a, _ = read_state_dict(pth)
    b, _ = read_state_dict(st)
    assert set(a) == set(b) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], sd[k].numpy())


def test_dilation_recipe_is_torchvisions():
    """stage_dilations against the dilations/strides torchvision's recipe puts in the reference's 3x3 convs."""
    for os_ in (8, 16, 32):
        with torch.device("meta"):
            ref = torch_resnet.ResNet([2, 2, 2, 2], replace_stride_with_dilation={
                8: [False, True, True], 16: [False, False, True], 32: [False] * 3}[os_])
        for (stride, first, rest), name in zip(stage_dilations(os_), ("layer1", "layer2", "layer3", "layer4")):
            convs = [b.conv2 for b in getattr(ref, name)]
            assert (convs[0].stride[0], convs[0].dilation[0], convs[1].dilation[0]) == (stride, first, rest)
            assert convs[0].padding[0] == first and convs[1].padding[0] == rest
    assert stage_dilations(8) == ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))


def test_report_and_model_paths(checkpoints):
    sd, _, _ = checkpoints[50]
    model = nnx.eval_shape(lambda: ResNet(3, depth=50, head="deeplabv3plus", rngs=nnx.Rngs(0)))
    report = load_torch_weights(model, sd)
    n_conv = sum(1 for k in sd if k.endswith(".weight") and sd[k].ndim == 4)
    n_bn = sum(1 for k in sd if k.endswith(".running_mean"))
    assert len(report.loaded) == n_conv + 2 * n_bn
    assert "encoder/layer1/0/downsample/0/kernel" in report.loaded
    assert "encoder/layer3/5/bn2/scale" in report.loaded
    assert report.initialised and all(p.startswith("head/") for p in report.initialised)
    assert set(report.unused) == {"fc.weight", "fc.bias"} | {k for k in sd if k.endswith("num_batches_tracked")}
    assert "freshly initialised (head/aspp" in report.summary()
    # the folded BatchNorm: scale = gamma / sqrt(var + eps), bias = beta - mean * scale
    bn = model.encoder.layer2[1].bn3
    g, b, m, v = (sd[f"layer2.1.bn3.{k}"].double().numpy() for k in ("weight", "bias", "running_mean", "running_var"))
    np.testing.assert_allclose(np.asarray(bn.scale.get_value()), g / np.sqrt(v + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.bias.get_value()), b - m * g / np.sqrt(v + 1e-5), rtol=1e-5, atol=1e-6)
    kernel = np.asarray(model.encoder.layer2[1].conv2.kernel.get_value())
    np.testing.assert_array_equal(kernel, sd["layer2.1.conv2.weight"].numpy().transpose(2, 3, 1, 0))


def test_mismatched_checkpoints_are_refused_naming_the_key(checkpoints, tmp_path):
    from safetensors.numpy import save_file

    sd101 = {k: v.numpy() for k, v in checkpoints[101][0].items()}
    enc50 = _encoder(BLOCKS[50], 8)
    with pytest.raises(WeightImportError, match=re.escape("\n  layer3.6.conv1.weight: not in the model (shape (256, 1024, 1, 1))\n")):
        load_torch_weights(enc50, sd101)  # a ResNet-101 checkpoint for a ResNet-50
    bad = dict(sd101, **{"conv1.weight": np.zeros((64, 3, 3, 3), np.float32)})
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(WeightImportError, match=re.escape("conv1.weight: expected shape (64, 3, 7, 7), got (64, 3, 3, 3)")) as e:
        load_torch_weights(_encoder(BLOCKS[101], 16), path)
    assert str(path) in str(e.value)
    missing = {k: v for k, v in sd101.items() if k != "layer4.2.bn3.running_var"}
    with pytest.raises(WeightImportError, match=re.escape("layer4.2.bn3.running_var: missing (expected shape (2048,))")):
        load_torch_weights(_encoder(BLOCKS[101], 16), missing)
    deep_stem = dict(sd101, **{"conv1.0.weight": np.zeros((32, 3, 3, 3), np.float32)})  # e.g. timm's resnet101d
    with pytest.raises(WeightImportError, match=re.escape("conv1.0.weight: not in the model")):
        load_torch_weights(_encoder(BLOCKS[101], 16), deep_stem)
    with pytest.raises(TypeError, match="ResNet backbone"):
        load_torch_weights(nnx.eval_shape(lambda: build_backbone(_compact(), 3, rngs=nnx.Rngs(0))), sd101)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_torch_weights(enc50, tmp_path / "absent.pth")


def _compact():
    from rwseg.configs import get_config

    return get_config("baseline").model


def test_read_state_dict_unwraps_wrappers_and_prefixes():
    sd = {"module.conv1.weight": torch.ones(2, 3), "fc.bias": np.zeros(3)}
    out, where = read_state_dict({"state_dict": sd})
    assert set(out) == {"conv1.weight", "fc.bias"} and where == "a state dict"
    assert isinstance(out["conv1.weight"], np.ndarray) and out["conv1.weight"].shape == (2, 3)


def _filled(build, seed=0):
    """``build()`` without its initialisers (slow op by op): He-normal kernels, zero biases,
    unit GroupNorm scales, identity frozen BatchNorms."""
    model = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Variable):
            shape, name = v.get_value().shape, str(path[-1])
            if len(shape) == 4:
                value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:3]))
            else:
                value = np.ones(shape) if name == "scale" else np.zeros(shape)
            v.set_value(jnp.asarray(value, jnp.float32))
    return model


@pytest.mark.parametrize("head", HEADS)
def test_resnet_interface_shapes_and_grids(head):
    """The backbone interface on every head; ``stem`` is conv1's map placed on its grid: its pixel
    2i is conv1's cell i (torch's symmetric padding centres cell i on pixel 2i)."""
    model = _filled(lambda: ResNet(4, depth=50, blocks=(1, 1, 1, 1), output_stride=16, head=head, aspp_rates=(2, 3),
                                   head_channels=16, low_level_channels=8, rngs=nnx.Rngs(0)))
    grid, num_features = model.grid(SIZE), model.num_features
    out = model(jnp.asarray(_images(size=SIZE)))  # eager: cheaper than compiling here
    stride = 4 if head == "deeplabv3plus" else 16
    assert grid == (level_grid("layer1" if stride == 4 else "layer4", 16),) * 2 and grid[0].stride == stride
    h, w = -(-SIZE[0] // stride), -(-SIZE[1] // stride)
    assert out["logits"].shape == (2, h, w, 4) and out["features"].shape == (2, h, w, num_features)
    assert num_features == {"aspp": 2048, "largefov": 16, "deeplabv3plus": 16}[head]
    assert out["stem"].shape == (2, *SIZE, 64) and model.stem_channels == 64
    conv1 = np.asarray(out["conv1"])
    np.testing.assert_allclose(np.asarray(out["stem"])[:, 0::2, 0::2], conv1, rtol=1e-5, atol=1e-5)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_frozen_batchnorm_is_a_constant_not_a_parameter():
    model = nnx.eval_shape(lambda: ResNet(3, depth=50, rngs=nnx.Rngs(0)))
    frozen = nnx.state(model, FrozenAffine)
    params = nnx.state(model, nnx.Param)
    assert len(nnx.to_flat_state(frozen)) == 2 * 53  # 53 BatchNorms in ResNet-50
    assert not any("bn" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(params))
    fresh = FrozenBatchNorm(3)
    x = jnp.asarray(_images(size=(2, 2))[..., :3])
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(x))  # the identity until loaded


def test_readme_refinement_layer_on_a_resnet(checkpoints, capsys):
    """The README's "A refinement layer on a ResNet" example, run as written with its checkpoint
    path pointing at this module's randomly initialised torchvision-layout ResNet-101: the weights
    load (the report is printed) and the refined scores come out at image resolution."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("**A refinement layer on a ResNet**", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"resnet101-63fe2227.pth"' in code
    ns = {}
    exec(compile(code.replace('"resnet101-63fe2227.pth"', repr(str(checkpoints[101][1]))), "README.md", "exec"), ns)
    assert "loaded" in capsys.readouterr().out
    model = ns["model"]
    image = jnp.asarray(_images(size=(32, 32), batch=1))
    out = nnx.jit(lambda m, x: m(x))(model, image)
    assert out.shape == (1, 32, 32, 21) and bool(jnp.all(jnp.isfinite(out)))
