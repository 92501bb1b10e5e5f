"""The documentation site (issue 10, item 5) builds with warnings as errors.

``mkdocs build --strict`` (mkdocs.yml) into a temporary folder: a docstring that griffe
cannot parse (a malformed ``Args:``/``Returns:``/``Raises:`` section, a documented
parameter that is not in the signature), a broken link or a missing page fails the test.
The notebooks appear with their outputs: the build takes the copies that
tests/_notebooks.py executed (shared with tests/test_notebooks.py, so each notebook runs
once per pytest run). The build itself takes a few seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from _notebooks import NAMES, ROOT, docs_hooks, executed_notebooks  # noqa: F401 (executed_notebooks: fixture)

for _module in ("mkdocs", "mkdocstrings_handlers.python", "mkdocs_jupyter"):
    pytest.importorskip(_module, reason=f"the docs packages are not installed ({_module}); pip install -e '.[test]'")


def test_api_reference_lists_every_public_module():
    """One API page per public module or subpackage of rwseg, found on disk (a new one appears by itself)."""
    modules = docs_hooks().public_modules()
    on_disk = {p.stem for p in (ROOT / "rwseg").glob("*.py")} | {
        p.parent.name for p in (ROOT / "rwseg").glob("*/__init__.py")}
    assert set(modules) == {m for m in on_disk if not m.startswith("_")}
    for expected in ("stencil", "linsolve", "rwn", "rawks", "spn", "gcrf", "dilated", "metrics", "data", "models",
                     "train"):
        assert expected in modules
    assert modules.index("stencil") < modules.index("rwn") < modules.index("compare")  # API_ORDER, not alphabetical


def test_links_of_repository_pages_are_rewritten():
    hooks = docs_hooks()
    text = ("[methods](docs/methods.md), [bench](docs/benchmarks/README.md#x), [nb](notebooks/README.md), "
            "[cfg](experiments/configs/), [web](https://example.org/a.md), ![img](docs/a.png), [a](#anchor)")
    out = hooks.rewrite_links(text, "README.md", "index.md")
    assert out == ("[methods](methods.md), [bench](benchmarks/README.md#x), [nb](notebooks/index.md), "
                   "cfg, [web](https://example.org/a.md), ![img](docs/a.png), [a](#anchor)")
    # from a page one folder down: experiments/README.md -> experiments/index.md
    assert hooks.rewrite_links("[log](stanford_baseline_log.md) [home](../README.md)", "experiments/README.md",
                               "experiments/index.md") == "[log](stanford_baseline_log.md) [home](../index.md)"


def test_sphinx_roles_become_optional_cross_references():
    html = ("see :func:<code>batch_dataset</code>, :mod:<code>~rwseg.train.state</code> and "
            ":data:<code>rwseg.data.IGNORE_INDEX</code>; <code>plain</code>")
    assert docs_hooks().sphinx_roles_to_autorefs(html, "rwseg.data") == (
        'see <autoref identifier="rwseg.data.batch_dataset" optional><code>batch_dataset</code></autoref>, '
        '<autoref identifier="rwseg.train.state" optional><code>state</code></autoref> and '
        '<autoref identifier="rwseg.data.IGNORE_INDEX" optional><code>rwseg.data.IGNORE_INDEX</code></autoref>; '
        '<code>plain</code>')
    literal = 'the energy::</p>\n<div class="highlight"><pre>E = ...</pre></div> a::b'
    assert docs_hooks().sphinx_roles_to_autorefs(literal, "rwseg") == (
        'the energy:</p>\n<div class="highlight"><pre>E = ...</pre></div> a::b')


def test_home_page_links_module_names_to_their_api_pages():
    text = "`rwseg.rwn` and `rwseg.rwn.random_walk`, `rwseg.nothing`\n```python\nx = `rwseg.rwn`\n```\n| `rwseg.data` |"
    assert docs_hooks().link_modules(text, ["rwn", "data"]) == (
        "[`rwseg.rwn`](api/rwn.md) and `rwseg.rwn.random_walk`, `rwseg.nothing`\n```python\nx = `rwseg.rwn`\n```\n"
        "| [`rwseg.data`](api/data.md) |")


@pytest.mark.slow
def test_docs_build_strict(executed_notebooks, tmp_path):
    """mkdocs build --strict: the docstrings, pages and links are valid; notebooks carry their outputs."""
    # first the notebooks no other worker is executing, then wait for the others
    notebooks = {name: executed_notebooks(name, wait=False) for name in NAMES}
    notebooks = {name: path or executed_notebooks(name) for name, path in notebooks.items()}
    folders = {path.parent for path in notebooks.values()}
    assert len(folders) == 1
    site = tmp_path / "site"
    env = {**os.environ, "RWSEG_DOCS_NOTEBOOKS": str(folders.pop()), "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(
        line for line in log.splitlines() if not line.startswith("INFO"))

    def page(path):
        return (site / path / "index.html").read_text(encoding="utf-8")

    # the home page is the README, with its links rewritten to the site's pages
    home = page(".")
    assert "What is this" in home and 'href="methods/"' in home and 'href="api/rwn/"' in home
    # the API reference: a page per public module, rendered from the docstrings
    for module in docs_hooks().public_modules():
        assert f'id="rwseg.{module}"' in page(f"api/{module}"), module
    assert 'id="rwseg.rwn.random_walk"' in page("api/rwn")
    assert 'id="rwseg.data.make_batches"' in page("api/data")
    # the Sphinx roles of the docstrings became cross-references, e.g. from one module's page to another's
    api = "".join(page(f"api/{m}") for m in docs_hooks().public_modules())
    assert not re.search(r":(func|class|mod|data|meth|attr|exc|obj):<code>", api)
    assert re.search(r'class="autorefs autorefs-internal"[^>]* href="\.\./\w+/#rwseg\.', api)
    # the notebooks with their outputs: printed text and figures
    operators = page("notebooks/operators")
    assert "rows of G from the scan match spn.propagation_matrix" in operators
    assert len(re.findall(r"data:image/png;base64", operators)) >= 3
    assert "check_grads passed" in page("notebooks/gradients")
    for path in ("methods", "benchmarks", "benchmarks/train", "experiments"):
        assert page(path)
