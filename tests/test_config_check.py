"""Config validation before training: every bad value is refused before any data or model
is built, with a message naming its ``config.`` key; a method's layer section is checked
against its layer's signature; an older run's config is upgraded once, at load time;
resuming compares configs key by key."""

import pathlib
import subprocess

import ml_collections
import pytest

from rwseg.models import model_class
from rwseg.train.config_check import HARMLESS_KEYS, METHOD_OPTIONS, ConfigError, check_config, config_changes
from rwseg.train.config_upgrade import upgrade_config
from rwseg.train.config_files import load_config_file
from _train_cli import subprocess_env, train_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "rwseg" / "configs"
METHODS = sorted(METHOD_OPTIONS)


def _config(name, arg="smoke", **overrides):
    config = load_config_file(str(CONFIGS / f"{name}.py"), arg)
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[last] = value
    return config


def _error(config, **kw):
    kw.setdefault("num_devices", 1)
    kw.setdefault("num_processes", 1)
    with pytest.raises(ConfigError) as info:
        check_config(config, **kw)
    return str(info.value)


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("method", METHODS)
def test_shipped_configs_are_valid(method, arg):
    config = _config(method, arg)
    check_config(config, num_devices=1, num_processes=1)
    assert config.allow_config_change is False
    # every option the method's model reads is checked, and nothing else is in its section
    if model_class(method).LAYER is not None:
        assert set(config[method].keys()) == set(METHOD_OPTIONS[method]) | {"layer"}


@pytest.mark.parametrize("method, overrides, expected", [
    ("baseline", {"num_steps": -3}, "config.num_steps: expected an int >= 1, got -3"),
    ("baseline", {"num_steps": 0}, "config.num_steps: expected an int >= 1, got 0"),
    ("baseline", {"model.width": 12}, "config.model.width: expected channel counts model.width x (1, 2, 4) = "
                                      "(12, 24, 48) each < 8 or a multiple of 8 (GroupNorm"),
    ("baseline", {"model.width": 5}, "(5, 10, 20) each < 8"),  # 5 < 8 but 2 x 5 = 10 is not
    ("baseline", {"model.features": 20}, "config.model.features: expected a channel count < 8 or a multiple of 8"),
    ("baseline", {"model.norm": "batch"}, "config.model.norm: expected one of 'group', 'none', got 'batch'"),
    ("baseline", {"data.crop_size": 36}, "config.data.crop_size: expected a multiple of 8"),
    ("baseline", {"data.name": "voc3"}, "config.data.name: expected one of"),
    ("baseline", {"batch_size": 0}, "config.batch_size: expected an int >= 1"),
    ("baseline", {"optimizer.learning_rate": float("nan")}, "config.optimizer.learning_rate: expected a finite"),
    ("baseline", {"optimizer.name": "lamb"}, "config.optimizer.name: expected one of 'adamw', 'sgd'"),
    ("baseline", {"optimizer.momentum": 1.0}, "config.optimizer.momentum"),
    ("baseline", {"checkpoint_every": 0}, "config.checkpoint_every: expected an int >= 1"),
    ("baseline", {"eval_every": -1}, "config.eval_every: expected an int >= 0"),
    ("baseline", {"trimap_widths": ()}, "config.trimap_widths"),
    ("baseline", {"progress": "yes"}, "config.progress: expected True or False"),
    ("baseline", {"method": "spn"}, "config.spn: method 'spn' reads its options from config.spn"),
    ("baseline", {"method": "crf"}, "config.method: expected one of"),
    ("rwn", {"rwn.layer.alpha": 1.0}, "config.rwn.layer.alpha: expected a finite number in [0, 1), got 1.0"),
    ("rwn", {"rwn.layer.alpha": -0.1}, "config.rwn.layer.alpha"),
    ("rwn", {"rwn.layer.tol": 0.0}, "config.rwn.layer.tol: expected a finite number in (0, inf)"),
    ("rwn", {"rwn.layer.downsample": 3}, "config.rwn.layer.downsample: expected a divisor of config.data.crop_size"),
    ("rwn", {"rwn.layer.theta_init": "x"}, "config.rwn.layer.theta_init: expected a finite number"),
    ("rwn", {"rwn.layer.eval_radius": 0}, "config.rwn.layer.eval_radius: expected an int >= 1"),
    ("rawks", {"data.scribbles": False}, "config.data.scribbles: expected True for method 'rawks'"),
    ("rawks", {"rawks.layer.boundary_channels": 12}, "config.rawks.layer.boundary_channels: expected a channel "
     "count"),
    ("rawks", {"rawks.targets": "hard"}, "config.rawks.targets: expected 'soft' unless config.freeze_method"),
    ("rawks", {"rawks.layer.max_boundary": 0.0}, "config.rawks.layer.max_boundary"),
    ("spn", {"spn.layer.downsample": 0}, "config.spn.layer.downsample: expected an int >= 1"),
    ("spn", {"spn.layer.merge": "sum"}, "config.spn.layer.merge: expected one of 'max', 'mean', got 'sum'"),
    ("spn", {"spn.aux_weight": -1.0}, "config.spn.aux_weight"),
    ("spn", {"spn.guidance_input": "image,depth"}, "config.spn.guidance_input: expected distinct comma-separated "
     "names from 'image', 'stem', 'features'"),
    ("gcrf", {"gcrf.layer.num_steps": -1}, "config.gcrf.layer.num_steps: expected an int >= 0"),
    ("gcrf", {"gcrf.layer.downsample": 3}, "config.gcrf.layer.downsample: expected a divisor"),
    ("dilated", {"dilated.layer.rates": (1, 0)}, "config.dilated.layer.rates: expected a non-empty tuple of ints >= 1"),
    ("dilated", {"dilated.layer.lam": -1.0}, "config.dilated.layer.lam"),
    ("dilated", {"dilated.layer.num_steps": -1}, "config.dilated.layer.num_steps: expected an int >= 0"),
    ("dilated", {"dilated.layer.colour_sigma_init": -0.1}, "config.dilated.layer.colour_sigma_init"),
    ("dilated", {"dilated.refined_weight": -1.0}, "config.dilated.refined_weight"),
    ("dilated", {"dilated.layer.decoder_depth": 2}, "config.dilated.layer.decoder_width: expected >= 1 with decoder_depth = 2"),
    ("dilated", {"dilated.layer.decoder_depth": 1, "dilated.layer.decoder_width": 12}, "config.dilated.layer.decoder_width: expected a "
     "channel count"),
])
def test_bad_value_names_its_key(method, overrides, expected):
    assert expected in _error(_config(method, **overrides))


def test_all_problems_reported_at_once():
    text = _error(_config("rwn", **{"num_steps": -3, "model.width": 12, "rwn.layer.alpha": 1.0}))
    assert text.startswith("invalid configuration:")
    assert all(key in text for key in ("config.num_steps", "config.model.width", "config.rwn.layer.alpha"))


def test_missing_option_in_method_section():
    config = _config("rwn")
    with config.unlocked():
        del config.rwn.layer["tol"]
    assert "config.rwn.layer.tol: missing" in _error(config)


def test_layer_section_holds_only_the_layer_arguments():
    """An old or misspelt key is refused, naming the layer's arguments; a model's own
    options sit apart from its layer's."""
    config = _config("gcrf")
    with config.unlocked():
        config.gcrf.layer.num_layers = 5
        config.gcrf.crf_downsample = 2
    text = _error(config)
    assert "config.gcrf.layer.num_layers: expected an argument of GaussianCRF (embedding_channels, num_filters, " \
           "radius, downsample, num_steps, tol, max_iters, margin, compat_init, colour_sigma_init, eval_radius, " \
           "eval_downsample), got an unknown key" \
        in text
    assert "config.gcrf.crf_downsample: expected one of aux_weight, pretrain_steps, pretrain_weight or layer" in text
    config = _config("spn")
    with config.unlocked():
        config.spn.layer.norm = "none"  # supplied by the model (config.model.norm)
    assert "config.spn.layer.norm: expected an argument of SpatialPropagation" in _error(config)
    config = _config("dilated")
    with config.unlocked():
        del config.dilated["layer"]
    assert "config.dilated.layer: missing (expected the arguments of DilatedAffinity: rates, " in _error(config)


# config.gcrf of the gcrf smoke config as rwseg wrote it before the layer sections (an older
# workdir's config.json)
OLD_GCRF = {"radius": 1, "crf_downsample": 2, "features": 16, "filters": 0, "num_layers": 5, "tol": 1e-4,
            "max_layers": 200, "margin": 0.5, "aux_weight": 0.5, "pretrain_steps": 2, "pretrain_weight": 0.1,
            "compat_init": 0.5}


def test_an_old_config_is_upgraded_once_at_load_time(tmp_path):
    import json

    from rwseg.train.workdir import load_config

    new = _config("gcrf").to_dict()
    old = json.loads(json.dumps(new))  # as saved: lists for tuples
    for key in ("allow_config_change", "init_from", "init_params", "freeze_backbone", "freeze_method"):
        del old[key]
    for key in ("max_nonfinite_skips", "method_lr_mult"):
        del old["optimizer"][key]
    for key in ("scale_range", "flip", "color_jitter", "train_labels"):
        del old["data"][key]
    old["gcrf"] = dict(OLD_GCRF)
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = load_config(tmp_path)
    assert dict(loaded.gcrf.layer) == {"radius": 1, "downsample": 2, "embedding_channels": 16, "num_filters": 0,
                                       "num_steps": 5, "tol": 1e-4, "max_iters": 200, "margin": 0.5,
                                       "compat_init": 0.5, "colour_sigma_init": 0.0,
                                       "eval_radius": 1, "eval_downsample": 2}  # as trained: radius, downsample
    assert config_changes(loaded, _config("gcrf")) == {}  # resuming the old run with today's config
    check_config(loaded, num_devices=1, num_processes=1)
    assert upgrade_config(upgrade_config(old)) == upgrade_config(old) == json.loads(json.dumps(new))
    assert upgrade_config(json.loads(json.dumps(new))) == json.loads(json.dumps(new))  # a current one: unchanged


def test_an_rwn_config_from_before_feature_theta_init_keeps_its_feature_start():
    """feature_theta_init was split from theta_init: an older RWN run started its feature weights
    at theta_init, which is what its absence means (not today's default)."""
    import json
    new = _config("rwn").to_dict()
    old = {**new, "rwn": {**new["rwn"], "layer": {k: v for k, v in new["rwn"]["layer"].items()
                                                  if k != "feature_theta_init"}}}
    old["rwn"]["layer"]["theta_init"] = -2.5
    assert upgrade_config(old)["rwn"]["layer"]["feature_theta_init"] == -2.5
    flat = {**new, "rwn": {k: v for k, v in new["rwn"].items() if k != "layer"}}  # before the layer section
    flat["rwn"].update(theta_init=-0.7, walk_downsample=2)
    layer = upgrade_config(flat)["rwn"]["layer"]
    assert (layer["theta_init"], layer["feature_theta_init"], layer["downsample"]) == (-0.7, -0.7, 2)
    current = {**new, "rwn": {**new["rwn"], "layer": {**new["rwn"]["layer"], "feature_theta_init": 0.0}}}
    assert upgrade_config(current) == current  # a current one: unchanged
    other = _config("gcrf").to_dict()  # another method's config gets no rwn keys
    assert "feature_theta_init" not in json.dumps(upgrade_config(other))


def test_batch_size_against_devices():
    config = _config("baseline")  # batch 4, eval batch 4
    check_config(config, num_devices=4, num_processes=1)
    text = _error(config, num_devices=8)
    assert "config.batch_size: expected a multiple of the device count 8" in text
    assert "config.eval_batch_size: expected a multiple of the device count 8" in text
    config.eval_at_end = False  # no evaluation: its batch size does not matter
    assert "eval_batch_size" not in _error(config, num_devices=8)


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    assert f"workdir: expected a directory or a path to create, got {path} which is an existing file" \
        in _error(_config("baseline"), workdir=path)
    assert f"whose parent {path} is a file" in _error(_config("baseline"), workdir=path / "run")
    check_config(_config("baseline"), workdir=tmp_path / "new" / "run", num_devices=1, num_processes=1)


def test_config_changes_ignore_harmless_keys():
    old = _config("rwn")
    new = _config("rwn", **{"num_steps": 50, "eval_batches": 3, "rwn.layer.alpha": 0.5, "progress": True})
    assert config_changes(old, new) == {}
    new = _config("rwn", **{"model.width": 16, "rwn.layer.train_radius": 3, "seed": 1})
    assert config_changes(old, new) == {"model.width": (8, 16), "rwn.layer.train_radius": (2, 3), "seed": (0, 1)}
    # a saved config.json (lists, not tuples; a key an older version did not write) compares equal, upgraded
    saved = ml_collections.ConfigDict(old.to_dict())
    saved_dict = {k: v for k, v in saved.to_dict().items() if k != "allow_config_change"}
    assert config_changes(upgrade_config(saved_dict), old) == {}
    assert config_changes(_config("rwn"), _config("spn"))["method"] == ("rwn", "spn")
    assert "allow_config_change" in HARMLESS_KEYS and "model.width" not in HARMLESS_KEYS


def _cli(args, tmp_path):
    return subprocess.run(args, env=subprocess_env(1, {"TFDS_DATA_DIR": str(tmp_path / "tfds")}),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_refuses_bad_config_before_training(tmp_path):
    """The issue's cases in one CLI call: nothing is trained or written, exit status 1, one line per key."""
    workdir = tmp_path / "file"
    workdir.write_text("not a directory")
    proc = _cli(train_command(str(CONFIGS / "rwn.py") + ":smoke", workdir,
                              {"rwn.layer.alpha": 1.0, "num_steps": -3, "model.width": 12}), tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for text in ("rwseg train: error: invalid configuration:", "config.rwn.layer.alpha: expected a finite number in [0, 1)",
                 "config.num_steps: expected an int >= 1, got -3", "config.model.width: expected channel counts",
                 f"workdir: expected a directory or a path to create, got {workdir}"):
        assert text in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tfds").exists()  # refused before any data was built


def test_cli_method_without_its_section(tmp_path):
    proc = _cli(train_command(str(CONFIGS / "baseline.py") + ":smoke", tmp_path / "run", {"method": "spn"}), tmp_path)
    assert proc.returncode == 1
    assert "config.spn: method 'spn' reads its options from config.spn" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_evaluation_loads_the_latest_config_of_the_run(tmp_path):
    """rwseg evaluate must see a harmless change made on resume (e.g. rwn.layer.alpha), not config.json."""
    import json

    from rwseg.train.workdir import load_config

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)
    first = {"method": "rwn", "rwn": {"alpha": 0.9}}
    (tmp_path / "config.json").write_text(json.dumps(first))
    assert load_config(tmp_path).rwn.layer.alpha == 0.9  # a run from before the history file
    later = {"method": "rwn", "rwn": {"alpha": 0.5}}
    (tmp_path / "config_history.jsonl").write_text(
        json.dumps({"step": 0, "config": first}) + "\n" + json.dumps({"step": 4, "config": later}) + "\n")
    assert load_config(tmp_path).rwn.layer.alpha == 0.5
