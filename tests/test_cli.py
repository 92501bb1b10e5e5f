"""The `rwseg` command line: subcommands, --config by name or path.
(End to end: test_train.py runs train/evaluate, test_wheel.py `rwseg compare --smoke`.)"""

import pathlib
import subprocess
import sys

import pytest

from rwseg import cli, configs
from rwseg.train.config_files import load_config_file, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_help_lists_the_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "compare", "plan", "check-kernels"):
        assert f"\n  {command} " in out
    assert cli.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_subcommand_help_lists_its_flags():
    proc = subprocess.run([sys.executable, "-m", "rwseg", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: rwseg train --config")
    for flag in ("--config:", "--workdir:", "--num_processes:", "--verbosity"):
        assert flag in proc.stdout


def test_config_by_name_or_path(tmp_path, monkeypatch):
    spn = configs.path("spn")
    assert spn.is_file() and spn.name == "spn.py"
    assert resolve("spn:smoke") == f"{spn}:smoke" and resolve("spn") == str(spn)
    assert resolve(str(spn) + ":smoke") == f"{spn}:smoke"
    by_name, by_path = load_config_file("spn:smoke"), load_config_file(str(spn), "smoke")
    assert by_name.to_dict() == by_path.to_dict() == configs.get_config("spn", "smoke").to_dict()
    assert by_name.num_steps == 5 and load_config_file("spn").num_steps > 5
    monkeypatch.chdir(tmp_path)  # outside a checkout "rwseg/configs/NAME.py" means the shipped config
    assert resolve("rwseg/configs/rwn.py:smoke") == f"{configs.path('rwn')}:smoke"
    own = tmp_path / "mine.py"  # an experiment's config file, importing the shared fields
    own.write_text("from rwseg.configs import common\n\n"
                   "def get_config(arg=None):\n    c = common.get_config('baseline')\n    c.seed = 7\n"
                   "    return common.finalize(c, arg)\n")
    assert load_config_file("mine.py:smoke").seed == 7 and "rwseg_config_file_mine" not in sys.modules
    with pytest.raises(FileNotFoundError, match="'nope' is neither a config file nor a shipped config name"):
        resolve("nope:smoke")
    with pytest.raises(ValueError, match="config name: expected one of"):
        configs.get_config("common")
