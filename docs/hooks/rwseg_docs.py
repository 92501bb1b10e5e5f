"""mkdocs hooks of the rwseg documentation site (``mkdocs.yml``: ``hooks:``).

Pages that live outside ``docs/`` are added to the site here, so that each text has one
source:

* ``README.md`` becomes the home page; ``notebooks/README.md``, ``experiments/README.md``
  and ``experiments/stanford_baseline_log.md`` become pages too (:data:`REPO_PAGES`).
  Their relative links are rewritten to the site's pages; a link to a repository file
  that is not a page (a script, a config) becomes plain text, as the site does not
  hold it.
* The API reference has one page per public module of ``rwseg`` (every module or
  subpackage whose name does not start with ``_``, found on disk, in the order of
  :data:`API_ORDER` then alphabetical), rendered by mkdocstrings from the docstrings, and
  an overview page with each module's summary line: a new module appears by itself.
* ``notebooks/*.ipynb`` are rendered by mkdocs-jupyter *with their outputs*. The
  notebooks are stored without outputs, so they are executed here, at build time
  (:func:`execute_notebook`, about 1.5 CPU-minutes at ``RWSEG_NOTEBOOK_SIZE=48``),
  unless the environment variable ``RWSEG_DOCS_NOTEBOOKS`` names a folder that holds
  executed copies (``tests/test_docs.py`` passes the copies that the notebook tests
  executed, so the suite runs each notebook once).

:func:`execute_notebook` is also what ``tests/test_notebooks.py`` runs.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import re
import shutil
import tempfile
from typing import Mapping

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOKS_ENV = "RWSEG_DOCS_NOTEBOOKS"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

# repository file -> page of the site (a path inside docs/ is a page already)
REPO_PAGES = {
    "README.md": "index.md",
    "notebooks/README.md": "notebooks/index.md",
    "experiments/README.md": "experiments/index.md",
    "experiments/stanford_baseline_log.md": "experiments/stanford_baseline_log.md",
}

# modules first in the API reference, when they exist; the others follow alphabetically
API_ORDER = ("stencil", "linsolve", "rwn", "rawks", "spn", "spn_pallas", "spn_verify", "gcrf", "dilated", "metrics",
             "constants", "layers", "models", "data", "train", "compare")
API_SECTION = "API reference"

# a Sphinx role left in a docstring, as Markdown renders it: :func:<code>~rwseg.x.f</code>
_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|exc|obj):<code>(~?)([\w.]+)</code>")

# reST's literal-block marker ("text::" then an indented block), which Markdown shows as "::"
_LITERAL_MARKER = re.compile(r"::(</p>\s*<div class=\"highlight\">)")

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")
_executed_dir: str | None = None  # temporary folder of notebooks executed by this build


def execute_notebook(path: str | os.PathLike, *, env: Mapping[str, str] | None = None, timeout: int = 300):
    """Executes a notebook top to bottom in a fresh ``python3`` kernel of this interpreter.

    The kernel runs in the notebook's folder with this process's environment, updated by
    ``env``. Figures are captured as PNG outputs: matplotlib's backend is the inline one
    (``matplotlib_inline``, headless) unless ``env`` names another.

    Args:
        path: the ``.ipynb`` file; it is read, not modified.
        env: environment variables for the kernel, on top of ``os.environ``.
        timeout: seconds allowed for each cell.

    Returns:
        The executed notebook (``nbformat.NotebookNode``) with its outputs.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised (e.g. a failed ``assert``).
    """
    import nbclient
    import nbformat

    path = pathlib.Path(path)
    nb = nbformat.read(path, as_version=4)
    kernel_env = {**os.environ, "MPLBACKEND": INLINE_BACKEND, **(env or {})}
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=kernel_env)
    return nb


def _site_path(repo_path: str) -> str | None:
    """The page of the site that shows a repository file, or None."""
    if repo_path.startswith("docs/") and repo_path.endswith(".md"):
        return repo_path[len("docs/"):]
    return REPO_PAGES.get(repo_path)


def rewrite_links(markdown: str, repo_path: str, site_path: str) -> str:
    """Rewrites the relative links of a repository file shown at ``site_path``."""
    repo_dir = posixpath.dirname(repo_path)
    site_dir = posixpath.dirname(site_path)

    def replace(match: re.Match) -> str:
        text, target = match.groups()
        if re.match(r"^[a-z]+:|^#|^/", target):  # absolute URL, anchor, or absolute path
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(repo_dir, path))
        if resolved in ("docs/benchmarks", "docs/benchmarks/"):
            resolved = "docs/benchmarks/README.md"
        page = _site_path(resolved) or _site_path(posixpath.join(resolved, "README.md"))
        if page is None:
            return text  # not part of the site (a script, a config folder): plain text
        new = posixpath.relpath(page, site_dir or ".")
        return f"[{text}]({new}{'#' + anchor if anchor else ''})"

    return _LINK.sub(replace, markdown)


def _execution_cache() -> dict:
    """Executed notebooks of this process, kept across the rebuilds of ``mkdocs serve``.

    mkdocs loads the hook module anew for every rebuild, so the cache lives in
    ``sys.modules``; it is keyed by the notebook's source and the settings it reads, so an
    edited notebook runs again (a change of the library needs a restart of ``serve``).
    """
    import sys
    import types

    holder = sys.modules.setdefault("_rwseg_docs_executed", types.ModuleType("_rwseg_docs_executed"))
    if not hasattr(holder, "cache"):
        holder.cache = {}
    return holder.cache


def link_modules(markdown: str, modules) -> str:
    """Links each inline code span naming a public module (`` `rwseg.rwn` ``) to its API page.

    Only on the home page (``index.md``); fenced code blocks are left alone.
    """
    pattern = re.compile(r"(?<![\[`])`rwseg\.(" + "|".join(map(re.escape, modules)) + r")`(?![`\]])")
    parts = re.split(r"(^```.*?^```)", markdown, flags=re.S | re.M)
    return "".join(part if part.startswith("```") else pattern.sub(r"[`rwseg.\1`](api/\1.md)", part)
                   for part in parts)


def _executed_notebooks() -> str:
    """A temporary folder holding ``notebooks/<name>.ipynb``, executed, for every notebook."""
    global _executed_dir
    import hashlib

    import nbformat

    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    given = os.environ.get(NOTEBOOKS_ENV)
    if given:
        missing = [n for n in names if not (pathlib.Path(given) / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{NOTEBOOKS_ENV}={given}: no executed copy of {missing}")
    _executed_dir = tempfile.mkdtemp(prefix="rwseg-docs-")
    (pathlib.Path(_executed_dir) / "notebooks").mkdir()
    cache = _execution_cache()
    for name in names:
        target = pathlib.Path(_executed_dir) / "notebooks" / name
        if given:
            shutil.copyfile(pathlib.Path(given) / name, target)
            continue
        settings = sorted((k, v) for k, v in os.environ.items() if k.startswith(("RWSEG_", "XLA_", "JAX_")))
        key = hashlib.sha256((NOTEBOOKS / name).read_bytes() + repr(settings).encode()).hexdigest()
        if key not in cache:
            cache[key] = nbformat.writes(execute_notebook(NOTEBOOKS / name))
        target.write_text(cache[key], encoding="utf-8")
    return _executed_dir


def public_modules() -> list[str]:
    """The public modules and subpackages of ``rwseg`` (names without ``_``), in page order."""
    import pkgutil

    found = {m.name for m in pkgutil.iter_modules([str(ROOT / "rwseg")]) if not m.name.startswith("_")}
    return [m for m in API_ORDER if m in found] + sorted(found - set(API_ORDER))


def _summary(module: str) -> str:
    """The first line of a module's docstring (read from the source, not imported)."""
    import ast

    path = ROOT / "rwseg" / f"{module}.py"
    if not path.exists():
        path = ROOT / "rwseg" / module / "__init__.py"
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _api_pages() -> dict[str, str]:
    """site path -> Markdown of the API reference pages."""
    escaped = {m: _summary(m).replace("|", "\\|") for m in public_modules()}
    rows = "\n".join(f"| [`rwseg.{m}`]({m}.md) | {line} |" for m, line in escaped.items())
    pages = {"api/index.md": "# API reference\n\nOne page per public module, generated from the docstrings "
             "(Google style: `Args`, `Returns`; shapes are per image, channels last).\n\n"
             f"| module | summary |\n|---|---|\n{rows}\n"}
    for m in public_modules():
        pages[f"api/{m}.md"] = f"# `rwseg.{m}`\n\n::: rwseg.{m}\n"
    return pages


try:
    from mkdocs.plugins import event_priority
except ImportError:  # the notebook tests import execute_notebook without mkdocs
    def event_priority(priority):
        return lambda f: f


def on_config(config):
    """Fills the API reference section of the nav with one page per public module."""
    for item in config.nav or []:
        if isinstance(item, dict) and API_SECTION in item:
            item[API_SECTION] = ["api/index.md"] + [{f"rwseg.{m}": f"api/{m}.md"} for m in public_modules()]
            return config
    raise ValueError(f"mkdocs.yml: the nav has no {API_SECTION!r} section for the API reference")


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps the .ipynb files
def on_files(files, config):
    """Adds the repository's pages and the executed notebooks to the site."""
    from mkdocs.structure.files import File

    for repo_path, site_path in REPO_PAGES.items():
        text = rewrite_links((ROOT / repo_path).read_text(encoding="utf-8"), repo_path, site_path)
        if site_path == "index.md":
            text = link_modules(text, public_modules())
        files.append(File.generated(config, site_path, content=text))
    for site_path, text in _api_pages().items():
        files.append(File.generated(config, site_path, content=text))
    # A File with its own src_dir rather than File.generated: mkdocs-jupyter reads the
    # notebook at abs_src_path, which its wrapper computes from src_dir.
    src_dir = _executed_notebooks()
    for path in sorted(pathlib.Path(src_dir, "notebooks").glob("*.ipynb")):
        files.append(File(f"notebooks/{path.name}", src_dir=src_dir, dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files


def sphinx_roles_to_autorefs(html: str, module: str) -> str:
    """Turns the Sphinx roles of the docstrings (``:func:`name```) into optional cross-references.

    A name is taken as absolute when it starts with ``rwseg.``, else relative to the page's
    ``module``; mkdocs-autorefs links it when the site documents it and shows plain code
    otherwise (``optional``: no warning), so the docstrings keep one convention. Also drops
    the second colon of reST's literal-block marker (``text::`` before a code block), which
    Markdown renders as it is.
    """

    def replace(match: re.Match) -> str:
        tilde, name = match.groups()
        name = name.lstrip(".")
        identifier = name if name.startswith("rwseg.") else f"{module}.{name}"
        shown = name.rsplit(".", 1)[-1] if tilde else name
        return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'

    return _LITERAL_MARKER.sub(r":\1", _ROLE.sub(replace, html))


def on_page_content(html, page, config, files):
    """Cross-references for the Sphinx roles in the API reference pages (see :func:`sphinx_roles_to_autorefs`)."""
    src = page.file.src_uri
    if not src.startswith("api/"):
        return html
    module = "rwseg" if src == "api/index.md" else "rwseg." + src[len("api/"):-len(".md")]
    return sphinx_roles_to_autorefs(html, module)


def on_post_build(config):
    """Removes the notebooks executed by this build."""
    global _executed_dir
    if _executed_dir is not None:
        shutil.rmtree(_executed_dir, ignore_errors=True)
        _executed_dir = None
