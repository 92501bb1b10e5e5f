"""The architecture's rules (docs/architecture.md), checked on the source.

- imports run one way, operators < layers < models < data/train < cli, without cycles
  between sibling modules: import-linter's contracts of pyproject.toml (``lint-imports``);
- only the CLI parses command-line arguments;
- a method's config section ``config.<method>.layer`` holds exactly its layer's
  keyword arguments (less the ones the model derives from the backbone), under the
  same names;
- every public function of ``rwseg.models`` and ``rwseg.train`` documents its arguments.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_imports_follow_the_layers_contract():
    pytest.importorskip("importlinter")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_a_broken_contract_is_reported(tmp_path):
    """The check can fail: an upward import (a layer importing a model) breaks the contract."""
    pytest.importorskip("importlinter")
    package = tmp_path / "pkg"
    for name in ("models", "layers"):
        (package / name).mkdir(parents=True)
        (package / name / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "layers" / "x.py").write_text("from pkg.models import y\n")
    (package / "models" / "y.py").write_text("")
    (tmp_path / "setup.cfg").write_text("[importlinter]\nroot_package = pkg\n\n[importlinter:contract:1]\n"
                                        "name = layers\ntype = layers\nlayers =\n    pkg.models\n    pkg.layers\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "pkg.layers.x -> pkg.models.y" in proc.stdout, proc.stdout[-2000:]


def _imported_modules(path: pathlib.Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
    return names


def _undocumented(path: pathlib.Path):
    """Public functions and methods of ``path`` with arguments but no ``Args:`` section; an
    override may refer to the documented signature instead ("arguments and returns: ...").
    Constructors are documented by their class's docstring."""
    found = []

    def visit(node, prefix=""):
        for n in node.body:
            if isinstance(n, ast.ClassDef) and not n.name.startswith("_"):
                visit(n, f"{n.name}.")
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_"):
                args = [a.arg for a in n.args.posonlyargs + n.args.args + n.args.kwonlyargs if a.arg not in ("self", "cls")]
                doc = ast.get_docstring(n) or ""
                if args and "Args:" not in doc and "arguments and returns" not in doc:
                    found.append(f"{path.relative_to(ROOT)}:{n.lineno} {prefix}{n.name}")

    visit(ast.parse(path.read_text()))
    return found


def test_public_functions_of_models_and_train_document_their_arguments():
    files = [p for d in ("models", "train") for p in sorted((ROOT / "rwseg" / d).rglob("*.py"))
             if not p.name.startswith("_") or p.name == "__init__.py"]
    assert len(files) > 10
    missing = [entry for p in files for entry in _undocumented(p)]
    assert not missing, "no Args: section:\n" + "\n".join(missing)


def test_only_the_cli_parses_command_line_arguments():
    parsers = {"argparse", "optparse", "absl.flags", "absl.app", "click", "ml_collections.config_flags"}
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "rwseg").rglob("*.py")
             if _imported_modules(p) & parsers or "sys.argv" in p.read_text()}
    assert found == {"rwseg/cli.py"}


def test_experiments_and_notebook_helpers_live_outside_the_library():
    for name in ("refine_benchmark", "bootstrap", "viz", "bench", "_deprecation"):
        assert not list((ROOT / "rwseg").rglob(f"{name}.py")), name


@pytest.mark.parametrize("method", ["rwn", "rawks", "spn", "gcrf", "dilated"])
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_layer_section_keys_equal_the_layer_keyword_arguments(method, arg):
    """config.<method>.layer holds exactly the layer's arguments (inspect.signature), under its
    names, less the ones the model supplies; the model passes it whole."""
    import inspect

    from rwseg import configs
    from rwseg.models import model_class

    config = configs.get_config(method, arg)
    cls = model_class(method)
    params = inspect.signature(cls.LAYER.__init__).parameters
    keyword = {n for n, p in params.items() if n not in ("self", "num_classes", "rngs")
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    supplied = set(cls.SUPPLIED) | cls.STATISTICS  # from config.model and the dataset statistics
    assert supplied <= keyword
    assert set(config[method].layer.keys()) == keyword - supplied
    assert set(cls.supplied_arguments(config)) == set(cls.SUPPLIED)
    # every name means one thing: no layer argument is spelt as an operator's deprecated name
    assert not keyword & {"steps", "num_layers", "max_layers", "iterations", "crf_downsample", "walk_downsample"}
