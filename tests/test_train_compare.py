"""The main job (`python -m rwseg.compare`) trains baseline + a method, prints the table
and writes the panels."""

import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from _train_cli import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_smoke(tmp_path):
    env = subprocess_env(1, {"TFDS_DATA_DIR": str(tmp_path / "tfds")})  # private dataset build
    proc = subprocess.run([sys.executable, "-m", "rwseg.compare", "--smoke", "--methods", "spn", "--workdir",
                           str(tmp_path), "--no_progress"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "| method | mIoU | fw-IoU | pixel acc |" in out
    assert "| baseline |" in out and "| spn |" in out
    assert f"panels (image | ground truth | baseline | method): {tmp_path / 'panels_spn.png'}" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"baseline", "spn"}
    assert all(0 <= r["mean_iou"] <= 1 for r in results.values())
    w, h = Image.open(tmp_path / "panels_spn.png").size
    assert w > h > 0  # 4 columns, 2 rows (smoke)
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "rwseg.compare", "--smoke", "--methods", "nope", "--workdir",
                        str(tmp_path / "x"), "--no_progress"], env=env, capture_output=True,
                       cwd=ROOT, timeout=300, check=True)
