"""``rwseg bench``: run a benchmark script of a source checkout.

The benchmarks (``experiments/benchmarks/bench_<name>.py``: ``stencil``, ``spn_gcrf``,
``random_walks``, ``train``) compare rwseg with peers (scipy, PyTorch, pydensecrf) that
are not rwseg dependencies, so they stay in the repository, out of the installed
package; this module only finds and runs them. The folder is ``--benchmarks_dir``, else
``experiments/benchmarks`` of the checkout the imported rwseg lives in (an editable
install), else of the current directory or one of its parents; installed from a wheel
and run outside a checkout, it is an error that says so.

    rwseg bench                         # list the benchmarks
    rwseg bench stencil -- --repeats 5  # flags after -- go to the script (its own argparse flags)
"""

from __future__ import annotations

import ast
import pathlib
import runpy
import sys

import rwseg

__all__ = ["find_benchmarks", "run_script", "summary"]

SUBDIR = pathlib.Path("experiments") / "benchmarks"


def _candidates(directory) -> list[pathlib.Path]:
    if directory is not None:
        return [pathlib.Path(directory)]
    package_root = pathlib.Path(rwseg.__file__).resolve().parents[1]
    cwd = pathlib.Path.cwd().resolve()
    return [package_root / SUBDIR] + [d / SUBDIR for d in (cwd, *cwd.parents)]


def find_benchmarks(directory=None) -> dict[str, pathlib.Path]:
    """``{name: path}`` of the ``bench_<name>.py`` scripts (see the module docstring for where).

    Raises:
      FileNotFoundError: no benchmark folder found (the message says where it looked).
    """
    tried = _candidates(directory)
    for folder in tried:
        scripts = sorted(folder.glob("bench_*.py"))
        if scripts:
            return {p.stem.removeprefix("bench_"): p for p in scripts}
    where = ", ".join(str(p) for p in tried[:3]) + (" and the parents of the current directory" if len(tried) > 3
                                                    else "")
    raise FileNotFoundError(
        f"--benchmarks_dir: no bench_*.py scripts in {where}. The benchmarks are part of the source "
        "repository (experiments/benchmarks/), not of the installed package: run `rwseg bench` inside a "
        "checkout or pass --benchmarks_dir=/path/to/experiments/benchmarks")


def summary(path: pathlib.Path) -> str:
    """First line of a script's docstring."""
    doc = ast.get_docstring(ast.parse(pathlib.Path(path).read_text())) or ""
    return doc.strip().split("\n", 1)[0]


def run_script(path: pathlib.Path, args) -> int:
    """Run ``path`` as ``__main__`` with ``args`` as its command line; returns its exit status."""
    saved = sys.argv
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
