"""Config validation before training (issue 9, items 3 and 7): every bad value is refused
before any data or model is built, with a message naming its ``config.`` key; resuming
compares configs key by key."""

import pathlib
import subprocess

import ml_collections
import pytest

from rwseg.train.config_check import HARMLESS_KEYS, METHOD_OPTIONS, ConfigError, check_config, config_changes
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
    if METHOD_OPTIONS[method]:
        assert set(config[method].keys()) == set(METHOD_OPTIONS[method])


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
    ("rwn", {"rwn.alpha": 1.0}, "config.rwn.alpha: expected a finite number in [0, 1), got 1.0"),
    ("rwn", {"rwn.alpha": -0.1}, "config.rwn.alpha"),
    ("rwn", {"rwn.tol": 0.0}, "config.rwn.tol: expected a finite number in (0, inf)"),
    ("rwn", {"rwn.walk_downsample": 3}, "config.rwn.walk_downsample: expected a divisor of config.data.crop_size"),
    ("rwn", {"rwn.eval_radius": 0}, "config.rwn.eval_radius: expected an int >= 1"),
    ("rawks", {"data.scribbles": False}, "config.data.scribbles: expected True for method 'rawks'"),
    ("rawks", {"rawks.width": 12}, "config.rawks.width: expected a channel count"),
    ("rawks", {"rawks.max_boundary": 0.0}, "config.rawks.max_boundary"),
    ("spn", {"spn.downsample": 0}, "config.spn.downsample: expected an int >= 1"),
    ("spn", {"spn.aux_weight": -1.0}, "config.spn.aux_weight"),
    ("spn", {"spn.guidance_input": "image,depth"}, "config.spn.guidance_input: expected distinct comma-separated "
     "names from 'image', 'stem', 'features'"),
    ("gcrf", {"gcrf.num_layers": 0}, "config.gcrf.num_layers: expected an int >= 1"),
    ("gcrf", {"gcrf.crf_downsample": 3}, "config.gcrf.crf_downsample: expected a divisor"),
    ("dilated", {"dilated.rates": (1, 0)}, "config.dilated.rates: expected a non-empty tuple of ints >= 1"),
    ("dilated", {"dilated.lam": -1.0}, "config.dilated.lam"),
    ("dilated", {"dilated.iterations": -1}, "config.dilated.iterations: expected an int >= 0"),
    ("dilated", {"dilated.decoder_depth": 2}, "config.dilated.decoder_width: expected >= 1 with decoder_depth = 2"),
    ("dilated", {"dilated.decoder_depth": 1, "dilated.decoder_width": 12}, "config.dilated.decoder_width: expected a "
     "channel count"),
])
def test_bad_value_names_its_key(method, overrides, expected):
    assert expected in _error(_config(method, **overrides))


def test_all_problems_reported_at_once():
    text = _error(_config("rwn", **{"num_steps": -3, "model.width": 12, "rwn.alpha": 1.0}))
    assert text.startswith("invalid configuration:")
    assert all(key in text for key in ("config.num_steps", "config.model.width", "config.rwn.alpha"))


def test_missing_option_in_method_section():
    config = _config("rwn")
    with config.unlocked():
        del config.rwn["tol"]
    assert "config.rwn.tol: missing" in _error(config)


def test_options_added_later_may_be_absent():
    """A config written before an optional key existed (config.json of an older run) still passes."""
    config = _config("dilated")
    with config.unlocked():
        del config.dilated["decoder_width"], config.dilated["decoder_depth"]
    check_config(config, num_devices=1, num_processes=1)


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
    new = _config("rwn", **{"num_steps": 50, "eval_batches": 3, "rwn.alpha": 0.5, "progress": True})
    assert config_changes(old, new) == {}
    new = _config("rwn", **{"model.width": 16, "rwn.train_radius": 3, "seed": 1})
    assert config_changes(old, new) == {"model.width": (8, 16), "rwn.train_radius": (2, 3), "seed": (0, 1)}
    # a saved config.json (lists, not tuples; a key an older version did not write) compares equal
    saved = ml_collections.ConfigDict(old.to_dict())
    saved_dict = {k: v for k, v in saved.to_dict().items() if k != "allow_config_change"}
    assert config_changes(saved_dict, old) == {}
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
                              {"rwn.alpha": 1.0, "num_steps": -3, "model.width": 12}), tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for text in ("rwseg.train: error: invalid configuration:", "config.rwn.alpha: expected a finite number in [0, 1)",
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
    """rwseg.evaluate must see a harmless change made on resume (e.g. rwn.alpha), not config.json."""
    import json

    from rwseg.train.evaluate import load_config

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)
    first = {"method": "rwn", "rwn": {"alpha": 0.9}}
    (tmp_path / "config.json").write_text(json.dumps(first))
    assert load_config(tmp_path).rwn.alpha == 0.9  # a run from before the history file
    later = {"method": "rwn", "rwn": {"alpha": 0.5}}
    (tmp_path / "config_history.jsonl").write_text(
        json.dumps({"step": 0, "config": first}) + "\n" + json.dumps({"step": 4, "config": later}) + "\n")
    assert load_config(tmp_path).rwn.alpha == 0.5
