"""The notebooks, executed once per test session for tests/test_notebooks.py and tests/test_docs.py.

:func:`executed_notebooks` is a session fixture giving ``get(name) -> path`` of an executed
copy of ``notebooks/<name>``. The copies live in a folder shared by the xdist workers of
one pytest run; a lock file per notebook makes the first test that asks execute it and
every other test (on any worker) read that copy, so the suite executes each notebook once.
A notebook whose execution fails is not stored: the next test that asks executes it again
(and fails the same way).

Execution is ``execute_notebook`` of the docs build's hook (docs/hooks/rwseg_docs.py), in a
fresh ``python3`` kernel of this interpreter with ``cwd = notebooks/``, at a small size
(:data:`KERNEL_ENV`); ``gradients.ipynb`` runs with ``RWSEG_STANFORD_DIR`` pointing at an
empty folder, so the synthetic fallback is exercised end to end.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pathlib

import pytest

from _train_cli import with_test_xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("operators.ipynb", "gradients.ipynb")
SIZE = "48"
CELL_TIMEOUT = 300  # seconds per cell; at SIZE = 48 the slowest cell takes ~10 s
# The arrays are tiny, so XLA compilation dominates: the kernels compile with the suite's XLA
# flags (_train_cli.TEST_XLA_FLAGS, optimisation level 0 among them: about half the compile time).
KERNEL_ENV = {
    "RWSEG_NOTEBOOK_SIZE": SIZE,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": with_test_xla_flags(),
}
NO_STANFORD = "no-stanford"  # empty folder given to gradients.ipynb as RWSEG_STANFORD_DIR


def docs_hooks():
    """The docs build's hook module (docs/hooks/rwseg_docs.py), loaded by path."""
    path = ROOT / "docs" / "hooks" / "rwseg_docs.py"
    spec = importlib.util.spec_from_file_location("rwseg_docs_hooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shared_dir(tmp_path_factory) -> pathlib.Path:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N, shared by this run's workers (each has .../pytest-N/popen-gwK)
    folder = base / "executed-notebooks"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory):
    """``get(name, wait=True) -> pathlib.Path`` of ``notebooks/<name>`` executed (once per pytest run)."""
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    import nbformat

    folder = _shared_dir(tmp_path_factory)
    (folder / NO_STANFORD).mkdir(exist_ok=True)

    def get(name: str, *, wait: bool = True) -> pathlib.Path | None:
        """The executed copy; with ``wait=False``, None while another worker is executing it."""
        out = folder / name
        with open(folder / f"{name}.lock", "w") as lock:
            try:  # released when the file closes
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return None
            if not out.exists():
                env = dict(KERNEL_ENV)
                if name == "gradients.ipynb":
                    env["RWSEG_STANFORD_DIR"] = str(folder / NO_STANFORD)
                nb = docs_hooks().execute_notebook(NOTEBOOKS / name, env=env, timeout=CELL_TIMEOUT)
                partial = folder / f"{name}.partial"
                nbformat.write(nb, partial)
                partial.replace(out)
        return out

    return get
