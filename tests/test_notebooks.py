"""The notebooks in ``notebooks/`` (issue 5, item 5), executed at a small size, and their helpers.

Each notebook runs top to bottom with nbclient in a fresh ``python3`` kernel of *this*
interpreter (jupyter_client replaces a kernel spec's ``python`` by ``sys.executable``; the
first cell prints the kernel's executable and the test checks it), with
``cwd = notebooks/``, ``RWSEG_NOTEBOOK_SIZE=48`` and matplotlib's inline backend (the
figures are kept as PNG outputs for the documentation site). The
notebooks contain their own checks (``assert``: stochastic rows of RWN's ``A``, SPN's
Theorem 1 and rows of ``G`` against ``spn.propagation_matrix``, GMF energy never
increasing, gradients equal to finite differences and to the unrolled walk,
``jax.test_util.check_grads``), so a wrong operator or gradient fails the test through a
``CellExecutionError``.

``operators.ipynb`` runs on the Stanford Background photo when the folder exists
(else on the synthetic image); ``gradients.ipynb`` runs with ``RWSEG_STANFORD_DIR``
pointing at an empty folder, so the synthetic fallback is exercised end to end too.

The executed copies are shared with tests/test_docs.py (the documentation site shows
them with their outputs): tests/_notebooks.py executes each notebook once per pytest
run, whichever test asks first. The arrays are tiny, so XLA compilation dominates the
run time: the kernels get the suite's XLA flags (``_train_cli.TEST_XLA_FLAGS``: optimisation
level 0 among them, about half the compile time). Each notebook takes about 30 s of CPU time.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _notebooks import NAMES, NOTEBOOKS, executed_notebooks  # noqa: F401 (executed_notebooks: fixture)

from notebooks import viz
from rwseg import rwn, spn, stencil

# --------------------------------------------------------------------------- executing the notebooks


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "".join(parts)


def _execute(name: str, executed_notebooks) -> str:
    """The text output of the executed notebook, after checking its kernel and that no cell failed."""
    import nbformat

    nb = nbformat.read(executed_notebooks(name), as_version=4)
    text = _outputs_text(nb)
    lines = [line for line in text.splitlines() if line.startswith("kernel python: ")]
    assert lines, "the first cell did not print the kernel's executable:\n" + text[:500]
    kernel_python = lines[0][len("kernel python: "):].strip()
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable), (kernel_python, sys.executable)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    return text


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 5, f"{name}: expected a real notebook, got {len(code)} code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name} is stored with outputs"
    assert "RWSEG_NOTEBOOK_SIZE" in "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "viz.notebook_size(" in code[0].source


@pytest.mark.slow
def test_operators_notebook(executed_notebooks):
    text = _execute("operators.ipynb", executed_notebooks)
    expected_source = "Stanford Background photo" if viz.stanford_dir(NOTEBOOKS) else "using synthetic image"
    assert expected_source in text
    for needle in ("rows of G from the scan match spn.propagation_matrix", "converged after", "ground truth  affinities"):
        assert needle in text, needle
    assert "t =  64" in text  # the walk ran step by step


@pytest.mark.slow
def test_gradients_notebook_on_synthetic_fallback(executed_notebooks):
    """Also the fallback: without Stanford Background the notebook uses a synthetic image and says so."""
    text = _execute("gradients.ipynb", executed_notebooks)
    assert "Stanford Background not found" in text and "using synthetic image" in text
    for needle in ("implicit, unrolled and finite differences agree", "check_grads passed", "finite differences agree"):
        assert needle in text, needle


# --------------------------------------------------------------------------- notebooks/viz.py (fast)


def test_notebook_size_reads_the_environment(monkeypatch):
    monkeypatch.delenv(viz.SIZE_ENV, raising=False)
    assert viz.notebook_size(default=160) == 160
    monkeypatch.setenv(viz.SIZE_ENV, "48")
    assert viz.notebook_size() == 48
    monkeypatch.setenv(viz.SIZE_ENV, "big")
    with pytest.raises(ValueError, match="RWSEG_NOTEBOOK_SIZE.*'big'"):
        viz.notebook_size()
    monkeypatch.setenv(viz.SIZE_ENV, "4")
    with pytest.raises(ValueError, match="at least 16"):
        viz.notebook_size()


def test_load_example_falls_back_to_synthetic(monkeypatch, tmp_path):
    monkeypatch.setenv(viz.STANFORD_ENV, str(tmp_path))  # exists, but has no images/ labels/
    assert viz.stanford_dir(NOTEBOOKS) is None
    ex = viz.load_example(24, root=None)
    assert ex["image"].shape == (24, 32, 3) and ex["image"].dtype == np.float32
    assert 0 <= ex["image"].min() and ex["image"].max() <= 1
    assert ex["labels"].shape == (24, 32) and ex["labels"].dtype == np.int32
    assert "synthetic" in ex["source"] and ex["num_classes"] == len(ex["class_names"])


def test_load_example_reads_stanford(stanford_dir):
    ex = viz.load_example(30, root=stanford_dir, example_id="0000047")
    h, w = ex["labels"].shape
    assert min(h, w) == 30 and ex["image"].shape == (h, w, 3)
    values = set(np.unique(ex["labels"]).tolist())
    assert values <= set(range(ex["num_classes"])) | {255}
    assert "0000047" in ex["source"]


def test_coarse_scores_are_blocky_probabilities():
    labels = np.zeros((16, 24), np.int32)
    labels[:, 12:] = 2
    labels[0, 0] = 255
    p = viz.coarse_scores(labels, 3, factor=4, smoothing=0.0)
    assert p.shape == (16, 24, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-6)
    assert (np.argmax(p[:, :10], -1) == 0).all() and (np.argmax(p[:, 14:], -1) == 2).all()
    assert p[:, :8, 0].min() > 0.99  # far from the edge: the right class, confidently


def test_linear_rows_match_dense_matrices():
    """Rows by vjp equal rows of the dense operators (stencil.to_dense, spn.propagation_matrix)."""
    key1, key2 = jax.random.split(jax.random.key(0))
    h, w = 6, 7
    offsets = stencil.disk_offsets(1) + ((2, 2), (-2, -2))  # symmetric, with a long link
    weights = jax.random.uniform(key1, (h, w, len(offsets)), jnp.float64)
    pixels = [(0, 0), (3, 4), (5, 6)]
    rows = viz.linear_rows(lambda x, wt: stencil.apply(wt, x, offsets), jnp.zeros((h, w, 2)), pixels, weights)
    dense = np.asarray(stencil.to_dense(weights, offsets))
    np.testing.assert_allclose(rows.reshape(3, -1), dense[[y * w + x for y, x in pixels]], rtol=1e-12)

    # channel=None: one operator per channel (two SPN directions side by side).
    gates = spn.stabilize(jax.random.uniform(key2, (2, h, w, 1, 3), jnp.float64, -0.6, 0.6))
    dirs = ("left_to_right", "bottom_to_top")

    def two(x, g):
        return jnp.concatenate([spn.propagate(x[..., i:i + 1], g[i], direction=d) for i, d in enumerate(dirs)], -1)

    rows = viz.linear_rows(two, jnp.zeros((h, w, 2)), pixels, gates, channel=None)
    assert rows.shape == (3, h, w, 2)
    for i, d in enumerate(dirs):
        G = np.asarray(spn.propagation_matrix(gates[i], direction=d))
        np.testing.assert_allclose(rows[..., i].reshape(3, -1), G[[y * w + x for y, x in pixels]], atol=1e-12)
    one = viz.linear_rows(two, jnp.zeros((h, w, 2)), pixels, gates, channel=1)
    np.testing.assert_allclose(one, rows[..., 1])

    # The converged walk: a row of (1 - alpha)(I - alpha A)^-1 against a dense solve.
    dist = rwn.feature_distances(jax.random.uniform(key1, (h, w, 3), jnp.float64), offsets)
    wsym = rwn.affinity(dist, jnp.array([-2.0, -1.0, -3.0]), offsets)
    row = viz.linear_rows(lambda x, wt: rwn.random_walk(wt, x, offsets, alpha=0.8, tol=1e-12), jnp.zeros((h, w, 1)),
                          [(2, 3)], wsym)[0]
    dense = np.asarray(stencil.to_dense(wsym, offsets))
    a = dense / dense.sum(1, keepdims=True)
    expected = 0.2 * np.linalg.inv(np.eye(h * w) - 0.8 * a)[2 * w + 3]
    np.testing.assert_allclose(row.reshape(-1), expected, atol=1e-9)


def test_boundary_pixels_lie_on_boundaries():
    labels = np.zeros((10, 12), np.int32)
    labels[:, 6:] = 1
    px = viz.boundary_pixels(labels, [(0.0, 0.0), (1.0, 1.0)])
    assert all(x in (5, 6) for _, x in px)
    assert viz.boundary_pixels(np.zeros((4, 4), np.int32), [(0.5, 0.5)]) == [(2, 2)]


def test_color_labels_and_panels():
    import matplotlib

    matplotlib.use("Agg")
    labels = np.array([[0, 1], [255, -1]], np.int32)
    rgb = viz.color_labels(labels)
    assert rgb.shape == (2, 2, 3) and (rgb[1] == 0).all() and not np.allclose(rgb[0, 0], rgb[0, 1])
    fig = viz.show_panels([rgb, np.ones((2, 2))], ["a", "b"], symmetric=[False, True])
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="titles"):
        viz.show_panels([rgb], ["a", "b"])
    fig = viz.show_rows(np.zeros((2, 2, 3)), [np.eye(2)], [(0, 0)], ["row"], log=True)
    assert len(fig.axes) == 1
