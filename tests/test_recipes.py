"""The papers' VOC + SBD recipes (rwseg/configs/voc/), the backbone config keys and the poly schedule."""

import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from rwseg.configs import NAMES, get_config
from rwseg.models import build_model
from rwseg.models.backbones import ResNet, check_model_config
from rwseg.train.config_check import ConfigError, check_config
from rwseg.train.config_files import load_config_file
from rwseg.train.optim import make_schedule

RECIPES = pathlib.Path(__file__).resolve().parents[1] / "rwseg" / "configs" / "voc"


@pytest.mark.parametrize("method", NAMES)
def test_recipe_loads_passes_the_check_and_builds(method):
    c = load_config_file(str(RECIPES / f"{method}.py"))
    assert c.method == method and c.data.name == "voc2012_aug"
    assert c.model.backbone == "resnet101" and c.optimizer.schedule == "poly" and c.optimizer.power == 0.9
    assert c.data.crop_size in (320, 512) and tuple(c.data.scale_range) == (0.5, 1.5) and c.data.flip
    for devices in (1, 4, 8, 16):  # one host of a v4-8 / v5e-16 and the chips
        check_config(c, num_devices=devices, num_processes=1)
    # the config builds the model it names (abstractly: no arrays)
    model = nnx.eval_shape(lambda: build_model(c, 21, rngs=nnx.Rngs(0), statistics={
        "frequencies": np.ones((len(c.dilated.layer.rates), 9), np.float32)} if method == "dilated" else None))
    assert isinstance(model.backbone, ResNet) and len(model.backbone.encoder.layer3) == 23
    assert model.backbone.output_stride == c.model.resnet.output_stride
    smoke = load_config_file(str(RECIPES / f"{method}.py"), "smoke")
    assert smoke.num_steps == 5


def _resnet_config(**resnet):
    c = get_config("baseline")
    c.model.backbone = "resnet50"
    c.model.resnet = ml_collections.ConfigDict(resnet)
    return c


def test_backbone_config_errors_name_the_key(tmp_path):
    assert check_model_config(get_config("baseline")) == []
    assert check_model_config(_resnet_config(output_stride=8, head="aspp")) == []
    problems = "\n".join(check_model_config(_resnet_config(output_stride=4, head="fcn", head_channels=20)))
    assert "config.model.resnet.output_stride: expected one of (8, 16, 32), got 4" in problems
    assert "config.model.resnet.head: expected one of 'aspp', 'largefov', 'deeplabv3plus', got 'fcn'" in problems
    assert check_model_config(_resnet_config(head="largefov", head_channels=20)) == [
        "config.model.resnet.head_channels: expected < 8 or a multiple of 8 (GroupNorm with min(8, C) groups; "
        "or config.model.resnet.head_norm='none'), got 20"]
    assert "unknown keys ['stride']" in check_model_config(_resnet_config(stride=8))[0]
    c = get_config("baseline")
    c.model.backbone = "resnet152"
    with pytest.raises(ConfigError, match="config.model.backbone: expected one of 'compact', 'resnet50', 'resnet101'"):
        check_config(c, num_devices=1, num_processes=1)
    c = get_config("baseline")
    c.model.pretrained = str(tmp_path / "r50.pth")
    assert "expected '' with config.model.backbone 'compact'" in check_model_config(c)[0]
    c = _resnet_config()
    c.model.pretrained = str(tmp_path / "r50.pth")
    assert check_model_config(c) == [f"config.model.pretrained: expected an existing checkpoint file, got "
                                     f"{str(tmp_path / 'r50.pth')!r}"]
    (tmp_path / "r50.pth").write_bytes(b"")
    assert check_model_config(c) == []
    c.model.pretrained = ""
    c.init_from = str(tmp_path)
    assert "config.model.pretrained: expected the checkpoint the base run started from" in check_model_config(c)[0]


def test_poly_schedule_is_deeplabs():
    opt = ml_collections.ConfigDict(dict(learning_rate=0.01, warmup_steps=0, end_factor=0.0, schedule="poly",
                                         power=0.9))
    f = make_schedule(opt, 1000)
    for t in (0, 1, 250, 999, 1000):
        np.testing.assert_allclose(float(f(t)), 0.01 * (1 - t / 1000) ** 0.9, rtol=1e-5, atol=1e-12)
    opt.warmup_steps, opt.end_factor = 100, 0.1
    f = make_schedule(opt, 1100)
    np.testing.assert_allclose([float(f(t)) for t in (0, 50, 100, 600, 1100)],
                               [0.0, 0.005, 0.01, 0.001 + 0.009 * 0.5 ** 0.9, 0.001], rtol=1e-5)
    opt.schedule = "step"
    with pytest.raises(ValueError, match="config.optimizer.schedule"):
        make_schedule(opt, 10)
    c = get_config("baseline")
    c.optimizer.schedule = "linear"
    with pytest.raises(ConfigError, match="config.optimizer.schedule: expected one of 'cosine', 'poly'"):
        check_config(c, num_devices=1, num_processes=1)
    assert jax.numpy.isfinite(make_schedule(get_config("baseline").optimizer, 300)(10))  # cosine by default
