"""The main job's command line (`python -m rwseg compare` = `rwseg compare`).

The end-to-end run (baseline + spn smoke configs: the table, results.json, the panels) is
tests/test_wheel.py, which runs it from an installed wheel outside the checkout."""

import subprocess
import sys

from _train_cli import subprocess_env


def test_compare_rejects_unknown_method(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rwseg", "compare", "--smoke", "--methods", "spn,nope", "--workdir",
                           str(tmp_path / "x"), "--no_progress"], env=subprocess_env(1), capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    assert "rwseg compare: error: --methods:" in proc.stderr and "'nope'" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is trained or written
