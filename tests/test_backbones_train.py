"""Every method model trains one step on a DeepLab-ResNet backbone started from a checkpoint.

The trainer's own path: ``config.model.backbone = "resnet50"``, ``config.model.resnet`` (the
ResNet's arguments), ``config.model.pretrained`` = a ``.safetensors`` state dict of the
plain-torch torchvision reference, :func:`rwseg.train.state.create` (which loads it) and one
:func:`rwseg.train.state.make_train_step`. To keep compilation cheap the encoder has one
bottleneck per stage (``resnet.blocks = (1, 1, 1, 1)``): the methods see the same interface
(full-resolution ``stem``, head ``features`` and ``logits`` on the ResNet's grids) as with the
full ResNet-50 / -101, whose encoders tests/test_backbones.py checks against torch. The heads
rotate over the methods so that each is compiled and stepped once (``STEPPED``); every method
is wired on the ResNet and its step traced.
"""

import jax
import numpy as np
import pytest
import torch

import torch_resnet
from rwseg.configs import get_config
from rwseg.models import METHODS, dataset_statistics
from rwseg.train import parallel
from rwseg.train.config_check import check_config
from rwseg.train.state import create, make_train_step

BLOCKS = (1, 1, 1, 1)
HEAD = {"baseline": "aspp", "spn": "largefov", "rwn": "deeplabv3plus", "gcrf": "largefov",
        "dilated": "deeplabv3plus", "rawks": "aspp"}
K, S = 4, 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from safetensors.torch import save_file

    sd = torch_resnet.resnet(BLOCKS, seed=3).state_dict()
    path = tmp_path_factory.mktemp("resnet_tiny") / "resnet_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return sd, path


def _batch(scribbles):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, S, S, 3)).astype(np.float32)
    label = np.zeros((2, S, S), np.int32)
    label[:, :, S // 2:] = 1
    label[:, S // 2:, :] += 2  # four quadrants
    batch = {"image": image, "label": label}
    if scribbles:
        batch["scribbles"] = np.where(rng.random((2, S, S)) < 0.1, label, -1).astype(np.int32)
    return batch


# One method per head runs the compiled step (aspp with scribbles, largefov, deeplabv3plus: the
# code paths that differ); the others trace the same step abstractly (jax.eval_shape: every layer
# wired on the ResNet, no compilation). Each compiled step is 10-20 s on 2 cores.
STEPPED = {"rawks", "gcrf", "rwn"}


@pytest.mark.slow  # three train-step compilations
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_one_step_on_a_pretrained_resnet(method, checkpoint, capsys):
    sd, path = checkpoint
    config = get_config(method, "smoke")
    config.model.backbone = "resnet50"
    config.model.resnet = dict(output_stride=8, head=HEAD[method], aspp_rates=(2, 4), head_channels=16,
                               low_level_channels=8, blocks=BLOCKS)
    config.model.pretrained = str(path)
    config.batch_size, config.eval_batch_size = 2, 2
    config.optimizer.warmup_steps = 0
    check_config(config, num_devices=1, num_processes=1)
    batch = _batch(bool(config.data.scribbles))
    setup = create(config, K, dataset_statistics(config, batch["label"]))
    assert "arrays loaded from" in capsys.readouterr().out  # the import report is printed
    stats = setup.state["stats"]["backbone"]["encoder"]
    scale = sd["layer2.0.bn2.weight"].double() / torch.sqrt(sd["layer2.0.bn2.running_var"].double() + 1e-5)
    np.testing.assert_allclose(np.asarray(stats["layer2"][0]["bn2"]["scale"]), scale.numpy(), rtol=1e-6)
    kernel = setup.state["params"]["backbone"]["encoder"]["layer4"][0]["conv2"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), sd["layer4.0.conv2.weight"].numpy().transpose(2, 3, 1, 0))
    before = jax.tree.map(np.asarray, setup.state)

    mesh = parallel.make_mesh()
    if len(mesh.devices.flat) != 1:
        pytest.skip("single-device step (batch 2)")
    step, global_batch = make_train_step(setup, mesh), parallel.global_batch(batch, mesh)
    if method not in STEPPED:
        state, metrics = jax.eval_shape(step, setup.state, global_batch, np.int32(0))
        assert metrics["loss"].shape == () and jax.tree.structure(state) == jax.tree.structure(setup.state)
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(setup.state)):
            assert (got.shape, got.dtype) == (want.shape, want.dtype)
        return
    # the trainer's jitted step, compiled without XLA's backend optimisations: the same program
    # (the checks below do not depend on them), about half the compile time on CPU
    step = step.lower(setup.state, global_batch, np.int32(0)).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    state, metrics = step(setup.state, global_batch, np.int32(0))
    metrics = jax.tree.map(float, metrics)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0 and np.isfinite(metrics["grad_norm"])
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["params"], before["params"])
    assert all(jax.tree.leaves(moved["backbone"]["encoder"])), "every encoder parameter trains"
    assert any(jax.tree.leaves(moved["backbone"]["head"]))
    # the frozen BatchNorm affine (and the other constants) do not move
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["stats"]), before["stats"])


@pytest.mark.slow  # one deep train-step compilation
def test_full_depth_resnet101_trains_one_step():
    """The full ResNet-101 (3, 4, 23, 3 bottlenecks, torchvision's widths) under the trainer's step:
    every encoder block gets a gradient and moves. One representative method: the methods see only
    the backbone's interface, which the reduced-depth test above trains for each of them; the depth
    (and the features at every level, against torch) is what this and tests/test_backbones.py add."""
    config = get_config("baseline", "smoke")
    config.model.backbone = "resnet101"
    config.model.resnet = dict(output_stride=16, head="aspp", aspp_rates=(2, 4), head_channels=16)
    config.batch_size, config.eval_batch_size = 2, 2
    config.optimizer.warmup_steps = 0
    check_config(config, num_devices=1, num_processes=1)
    batch = _batch(False)
    setup = create(config, K, dataset_statistics(config, batch["label"]))
    encoder = setup.state["params"]["backbone"]["encoder"]
    assert [len(encoder[f"layer{i}"]) for i in (1, 2, 3, 4)] == [3, 4, 23, 3]
    before = jax.tree.map(np.asarray, setup.state["params"])
    mesh = parallel.make_mesh()
    if len(mesh.devices.flat) != 1:
        pytest.skip("single-device step (batch 2)")
    global_batch = parallel.global_batch(batch, mesh)
    step = make_train_step(setup, mesh).lower(setup.state, global_batch, np.int32(0)).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    state, metrics = step(setup.state, global_batch, np.int32(0))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["params"], before)
    assert all(jax.tree.leaves(moved["backbone"]["encoder"])), "every encoder parameter trains"
