"""config.init_from / config.freeze_backbone (rwseg.train.init_from): the refinement protocol
starts a method from a trained baseline's backbone, array for array, with a fresh optimiser."""

import json
import pathlib

import jax
import numpy as np
import pytest

from rwseg import data
from rwseg.train.checkpoint import _path_name, read_state
from rwseg.train.config_check import ConfigError, check_config, config_changes
from rwseg.train.config_upgrade import upgrade_config
from rwseg.train.init_from import InitFromError, checkpoint_location, init_backbone, init_params
from rwseg.train.state import create
from rwseg.train.trainer import train_and_evaluate
from _train_cli import smoke_config

K = data.dataset_info("synthetic").num_classes
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _smoke(method, **overrides):
    return smoke_config(method, **{"eval_at_end": False, **overrides})


def _flat(tree):
    return {_path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("base")
    train_and_evaluate(_smoke("baseline", num_steps=3, checkpoint_every=3), workdir)
    return workdir


def test_init_copies_exactly_the_backbone(base):
    config = _smoke("spn", init_from=str(base))
    setup = create(config, K, {})
    new, where = init_backbone(setup.state, str(base))
    assert "step 3" in where
    saved = _flat(read_state(base)[1]["params"]["backbone"])
    got = _flat(new["params"]["backbone"])
    assert got.keys() == saved.keys() and len(got) > 10
    for k in got:
        np.testing.assert_array_equal(got[k], saved[k], err_msg=k)
    fresh = _flat(setup.state["params"]["backbone"])
    assert any(not np.array_equal(fresh[k], saved[k]) for k in got)  # the copy changed something
    # the method's own layers and the optimiser state are the fresh ones
    for part in ("params", "opt_state"):
        a = _flat({k: v for k, v in setup.state[part].items() if k != "backbone"} if part == "params"
                  else setup.state[part])
        b = _flat({k: v for k, v in new[part].items() if k != "backbone"} if part == "params" else new[part])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part}/{k}")


def test_backbone_mismatch_is_a_clear_error(base):
    config = _smoke("spn", init_from=str(base))
    config.model.features = 24
    setup = create(config, K, {})
    with pytest.raises(InitFromError, match=r"does not fit this config's model.*backbone/.*model \("):
        init_backbone(setup.state, str(base))


def test_checkpoint_locations(base):
    assert checkpoint_location(str(base)) == (base, "latest", None)
    assert checkpoint_location(str(base / "best")) == (base, "best", None)
    assert checkpoint_location(str(base / "checkpoints" / "3")) == (base, "latest", 3)
    with pytest.raises(InitFromError, match="init_from"):
        init_backbone(create(_smoke("baseline"), K, {}).state, str(base / "nothing"))


def test_control_continues_from_the_checkpoint(base, tmp_path):
    # baseline + init_from with a negligible learning rate: the run ends where the base ended
    config = _smoke("baseline", init_from=str(base), num_steps=2, checkpoint_every=2)
    config.optimizer.learning_rate = 1e-12
    train_and_evaluate(config, tmp_path / "control")
    saved, got = _flat(read_state(base)[1]["params"]), _flat(read_state(tmp_path / "control")[1]["params"])
    assert saved.keys() == got.keys()
    for k in got:
        np.testing.assert_allclose(got[k], saved[k], rtol=0, atol=1e-8, err_msg=k)


def test_frozen_backbone_stays_fixed(base, tmp_path):
    config = _smoke("spn", init_from=str(base), freeze_backbone=True, num_steps=2, checkpoint_every=2)
    train_and_evaluate(config, tmp_path / "frozen")
    state = read_state(tmp_path / "frozen")[1]
    saved, got = _flat(read_state(base)[1]["params"]["backbone"]), _flat(state["params"]["backbone"])
    for k in got:
        np.testing.assert_array_equal(got[k], saved[k], err_msg=k)
    initial = _flat({k: v for k, v in create(config, K, {}).state["params"].items() if k != "backbone"})
    trained = _flat({k: v for k, v in state["params"].items() if k != "backbone"})
    assert any(not np.allclose(trained[k], initial[k]) for k in trained)  # the method's layers did train


def test_second_stage_copies_every_parameter_and_freezes_the_method(tmp_path):
    """init_params = "all" + freeze_method: a second stage of a method starts from all of a run's
    parameters (e.g. RAWKS "train P, Q, then Q"); the method's layers stay exactly fixed and the
    backbone trains. A run of another method does not fit."""
    first = tmp_path / "spn"
    train_and_evaluate(_smoke("spn", num_steps=2, checkpoint_every=2), first)
    saved = _flat(read_state(first)[1]["params"])
    config = _smoke("spn", init_from=str(first), init_params="all", freeze_method=True, num_steps=2,
                    checkpoint_every=2)
    setup = create(config, K, {})
    new, _ = init_params(setup.state, str(first), subtrees=None)
    got = _flat(new["params"])
    assert got.keys() == saved.keys() and any(not k.startswith("backbone") for k in got)
    for k in got:
        np.testing.assert_array_equal(got[k], saved[k], err_msg=k)
    train_and_evaluate(config, tmp_path / "stage2")
    trained = _flat(read_state(tmp_path / "stage2")[1]["params"])
    for k in trained:
        if not k.startswith("backbone"):
            np.testing.assert_array_equal(trained[k], saved[k], err_msg=k)
    assert any(not np.array_equal(trained[k], saved[k]) for k in trained if k.startswith("backbone"))
    with pytest.raises(InitFromError, match=r"parameters \(.*\) of .* do not fit .*missing in the checkpoint: "):
        init_params(create(_smoke("gcrf"), K, {}).state, str(first), subtrees=None)
    with pytest.raises(ConfigError, match=r"config.freeze_method: expected False unless config.init_from is set and "
                                          r"config.init_params is 'all'"):
        check_config(_smoke("spn", init_from=str(first), freeze_method=True), num_devices=1, num_processes=1)
    with pytest.raises(ConfigError, match=r"config.freeze_method: expected False with config.freeze_backbone True"):
        check_config(_smoke("spn", init_from=str(first), init_params="all", freeze_method=True, freeze_backbone=True),
                     num_devices=1, num_processes=1)
    with pytest.raises(ConfigError, match=r"config.init_params: expected one of"):
        check_config(_smoke("spn", init_params="some"), num_devices=1, num_processes=1)
    with pytest.raises(ConfigError, match=r"config.rawks.targets: expected 'soft' unless config.freeze_method is True"):
        check_config(_smoke("rawks", **{"rawks.targets": "hard"}), num_devices=1, num_processes=1)
    with pytest.raises(ConfigError, match=r"config.rawks.targets: expected one of"):
        check_config(_smoke("rawks", **{"rawks.targets": "argmax"}), num_devices=1, num_processes=1)


def test_method_lr_mult_scales_only_the_method_layers():
    """optimizer.method_lr_mult = m: the update of every parameter outside the backbone is m
    times the one of the same step without it; the backbone's update is unchanged."""
    params = create(_smoke("spn"), K, {}).state["params"]
    grads = jax.tree.map(lambda x: np.random.default_rng(x.size).normal(size=x.shape).astype(x.dtype), params)

    def first_update(mult, freeze=False):
        c = _smoke("spn", **{"optimizer.method_lr_mult": mult, "optimizer.warmup_steps": 0,  # lr > 0 at step 0
                             "init_from": "x" if freeze else "", "freeze_backbone": freeze})
        tx = create(c, K, {}).tx
        return _flat(tx.update(grads, tx.init(params), params)[0])

    plain, scaled = first_update(1.0), first_update(10.0)
    frozen_plain, frozen = first_update(1.0, freeze=True), first_update(10.0, freeze=True)
    for k in plain:
        if k.startswith("backbone"):
            np.testing.assert_allclose(scaled[k], plain[k], rtol=1e-6, err_msg=k)
            np.testing.assert_array_equal(frozen[k], 0 * plain[k], err_msg=k)
        else:
            np.testing.assert_allclose(scaled[k], 10 * plain[k], rtol=1e-5, atol=1e-12, err_msg=k)
            np.testing.assert_allclose(frozen[k], 10 * frozen_plain[k], rtol=1e-5, atol=1e-12, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in plain.items() if not k.startswith("backbone"))
    with pytest.raises(ConfigError, match=r"config.optimizer.method_lr_mult: expected a finite number in \(0, inf\)"):
        check_config(_smoke("spn", **{"optimizer.method_lr_mult": 0.0}), num_devices=1, num_processes=1)


def test_config_checks_and_resume_compatibility(tmp_path):
    with pytest.raises(ConfigError, match=r"config.freeze_backbone: expected False without config.init_from"):
        check_config(_smoke("spn", freeze_backbone=True), num_devices=1, num_processes=1)
    with pytest.raises(ConfigError, match=r"config.data.scale_range: expected \(lo, hi\)[\s\S]*"
                                          r"config.data.color_jitter: expected \(brightness"):
        check_config(_smoke("spn", **{"data.scale_range": (2.0, 1.0), "data.color_jitter": (0.1, 2.0, 0.0)}),
                     num_devices=1, num_processes=1)
    with pytest.raises(ConfigError, match=r"config.init_from: expected a run directory"):
        check_config(_smoke("spn", init_from=str(tmp_path / "absent")), num_devices=1, num_processes=1)
    # a run recorded before these keys existed resumes, upgraded, with their defaults unchanged ...
    old = json.loads(_smoke("spn").to_json())
    for key in ("init_from", "init_params", "freeze_backbone", "freeze_method", "allow_config_change"):
        old.pop(key)
    old["optimizer"].pop("max_nonfinite_skips")
    old["optimizer"].pop("method_lr_mult")
    for key in ("scale_range", "flip", "color_jitter", "train_labels"):  # data keys added later
        old["data"].pop(key)
    old = upgrade_config(old)
    assert config_changes(old, _smoke("spn")) == {}
    # ... but not with another backbone start or a frozen backbone
    assert set(config_changes(old, _smoke("spn", init_from="x", freeze_backbone=True))) == {"init_from",
                                                                                           "freeze_backbone"}


def test_scribble_only_baseline_trains_on_the_scribbles(tmp_path):
    """data.train_labels = "scribbles": the first step's loss is the cross-entropy of the
    initial model on batch 0's scribble pixels (recomputed independently), not on its labels."""
    from rwseg.models.common import cross_entropy
    from rwseg.train.state import merge, source_kwargs

    config = _smoke(str(CONFIGS / "scribble_baseline.py"), num_steps=1, checkpoint_every=1)
    train_and_evaluate(config, tmp_path / "scribbles")
    logged = json.loads((tmp_path / "scribbles" / "metrics.jsonl").read_text().splitlines()[0])["ce"]
    source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
    batch = next(data.make_batches(source, batch_size=config.batch_size, crop_size=config.data.crop_size, train=True,
                                   seed=config.seed, num_steps=1, scribbles=True, shard_index=0, shard_count=1))
    model = merge(*(lambda s: (s.graphdef, s.state))(create(config, K, {})))
    logits = model.coarse_scores(jax.numpy.asarray(batch["image"]))
    on_scribbles = float(cross_entropy(logits, jax.numpy.asarray(batch["scribbles"])))
    on_labels = float(cross_entropy(logits, jax.numpy.asarray(batch["label"])))
    assert 0 < (batch["scribbles"] >= 0).mean() < 0.2
    assert logged == pytest.approx(on_scribbles, rel=1e-4) and abs(on_scribbles - on_labels) > 1e-3
    with pytest.raises(ConfigError, match="config.data.train_labels: expected 'dense' unless"):
        check_config(_smoke("baseline", **{"data.train_labels": "scribbles"}), num_devices=1, num_processes=1)
