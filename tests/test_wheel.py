"""rwseg as users get it: a wheel installed into a fresh virtual environment, run from an
unrelated directory (no checkout on ``sys.path``, configs from the package).

The wheel is built without network (``pip wheel --no-deps --no-build-isolation --no-index``,
with the setuptools and wheel of the test extra) from a copy of the sources, so the checkout
gets no ``build/`` or ``*.egg-info``. The new environment reuses the current one's
dependencies through a ``.pth`` file naming its site-packages: a ``.pth`` line only adds
the directory, the ``.pth`` files inside it are not run, so the editable rwseg install of
the current environment cannot shadow the wheel (checked: ``rwseg.__file__`` lies in the
new environment).
"""

import importlib.metadata
import json
import os
import pathlib
import shutil
import site
import subprocess
import sys

import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build_tools_missing() -> str | None:
    try:
        setuptools = importlib.metadata.version("setuptools")
        importlib.metadata.version("wheel")
    except importlib.metadata.PackageNotFoundError as e:
        return f"{e.name} is not installed"
    if int(setuptools.split(".")[0]) < 68:
        return f"setuptools {setuptools} < 68"
    return None


def _env(**extra) -> dict:
    """The environment of a user's shell: no PYTHONPATH (it would put the checkout first), CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment with the rwseg wheel installed (no network)."""
    missing = _build_tools_missing()
    if missing:  # the test extra declares both; an older environment needs `pip install -e '.[test]'`
        pytest.skip(f"building the wheel offline needs the test extra's setuptools>=68 and wheel ({missing})")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "rwseg", src / "rwseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist"), str(src)], timeout=300)
    (wheel,) = (tmp / "dist").glob("rwseg-*.whl")

    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], timeout=120)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   env=_env()).stdout.strip()
    here = site.getsitepackages() + [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    here = [p for p in dict.fromkeys(here) if os.path.isdir(p)]  # this environment's packages, not the checkout
    (pathlib.Path(purelib) / "_rwseg_test_dependencies.pth").write_text("\n".join(here) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], timeout=300)
    return env_dir


@pytest.mark.slow
def test_wheel_runs_compare_smoke_outside_the_checkout(venv, tmp_path):
    python, rwseg = venv / "bin" / "python", venv / "bin" / "rwseg"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import rwseg, rwseg.configs; print(rwseg.__file__); "
                  "print(rwseg.configs.path('spn'))"], env=_env(), cwd=elsewhere).stdout.split()
    assert all(pathlib.Path(p).is_relative_to(venv) for p in where), where  # the wheel, not the checkout

    help_text = _run([str(rwseg), "--help"], env=_env(), cwd=elsewhere).stdout
    for command in ("train", "evaluate", "compare"):
        assert f"\n  {command} " in help_text, help_text

    out = elsewhere / "runs"
    proc = _run([str(rwseg), "compare", "--smoke", "--workdir", "runs", "--no_progress"], cwd=elsewhere,
                env=_env(TFDS_DATA_DIR=str(tmp_path / "tfds")), timeout=900)
    assert "| method | mIoU | fw-IoU | pixel acc |" in proc.stdout
    assert "| baseline |" in proc.stdout and "| spn |" in proc.stdout
    assert "panels (image | ground truth | baseline | method): runs/panels_spn.png" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"baseline", "spn"} and all(0 <= r["mean_iou"] <= 1 for r in results.values())
    w, h = Image.open(out / "panels_spn.png").size
    assert w > h > 0  # image | ground truth | baseline | spn, 2 rows (smoke)
