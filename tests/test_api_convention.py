"""The operator convention (docs/convention.md) checked on the public API of the operator modules.

- positional parameters are exactly the arrays, the stencil and a required problem size
  (the table ``POSITIONAL`` below; a new public function must be added to it), every
  other parameter is keyword-only;
- no name that means something else elsewhere (``steps``, ``num_layers``, ``max_layers``,
  ``iterations``; ``alpha`` only in rwn, the walk's restart probability);
- ``ignore_index`` is keyword-only with the default ``rwseg.constants.IGNORE_INDEX``;
- ``return_info=True`` returns ``(result, info)`` with a NamedTuple info holding a
  ``SolveInfo`` (every code path, called on tiny inputs);
- docstrings have Google-style ``Args:`` (names = the signature's, in order) and
  ``Returns:`` sections, and name papers rather than seed files or paths outside the repo.
"""

import importlib
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwseg import constants, dilated, gcrf, linsolve, metrics, rawks, rwn, spn, stencil

MODULES = ["rwn", "rawks", "gcrf", "spn", "dilated", "linsolve", "stencil", "metrics"]
BANNED = {"steps", "num_layers", "max_layers", "iterations"}

# The parameters that may be positional: arrays, then the stencil, then a required size.
POSITIONAL = {
    "rwn.feature_distances": ("features", "offsets"),
    "rwn.affinity": ("distances", "theta", "offsets"),
    "rwn.transition": ("weights", "x", "offsets"),
    "rwn.random_walk": ("weights", "f", "offsets"),
    "rwn.affinity_loss": ("weights", "labels", "offsets"),
    "rawks.hitting_probabilities": ("boundary", "seeds", "num_labels"),
    "rawks.step_cost": ("boundary",),
    "rawks.path_costs": ("boundary", "sources", "blocked"),
    "rawks.uncertainty_weights": ("P",),
    "rawks.rawks_loss": ("P", "logits"),
    "gcrf.bipartite_offsets": ("radius",),  # a stencil constructor: its size
    "gcrf.pairwise_similarity": ("z", "filters", "offsets"),
    "gcrf.compatibility": ("r",),
    "gcrf.gmf": ("unary", "similarity", "compat", "offsets"),
    "gcrf.gmf_half_update": ("mu", "unary", "similarity", "compat", "offsets"),
    "gcrf.system_matvec": ("similarity", "compat", "offsets"),
    "gcrf.energy": ("y", "unary", "similarity", "compat", "offsets"),
    "gcrf.margin_loss": ("y", "labels"),
    "gcrf.similarity_pretrain_loss": ("similarity", "labels", "offsets"),
    "spn.direction_offsets": ("direction", "num_gates"),  # a stencil constructor: its definition
    "spn.propagate": ("x", "gates"),
    "spn.spn": ("x", "gates"),
    "spn.stabilize": ("gates",),
    "spn.propagation_matrix": ("gates",),
    "dilated.neighbor_counts": ("labels", "rates"),
    "dilated.category_frequencies": ("label_maps", "rates"),
    "dilated.prior_bias": ("frequencies",),
    "dilated.affinity_loss": ("logits", "labels", "rates", "frequencies"),
    "dilated.propagate": ("probs", "affinity_logits", "rates"),
    "linsolve.cg": ("matvec", "b"),
    "linsolve.bicgstab": ("matvec", "b"),
    "linsolve.jacobi": ("diagonal",),
    "linsolve.implicit_solve": ("matvec", "b", "solve"),
    "stencil.as_offsets": ("offsets",),
    "stencil.disk_offsets": ("radius",),
    "stencil.dilated_offsets": ("rates",),
    "stencil.four_connected": (),
    "stencil.shift": ("x", "offset"),
    "stencil.gather": ("x", "offsets"),
    "stencil.valid_mask": ("height", "width", "offsets"),
    "stencil.apply": ("weights", "x", "offsets"),
    "stencil.apply_transpose": ("weights", "x", "offsets"),
    "stencil.mask_weights": ("weights", "offsets"),
    "stencil.apply_masked": ("weights", "x", "offsets"),
    "stencil.degree": ("weights", "offsets"),
    "stencil.asymmetry": ("weights", "offsets"),
    "stencil.to_dense": ("weights", "offsets"),
    "stencil.label_affinity": ("labels", "offsets"),
    "metrics.confusion_matrix": ("pred", "labels", "num_classes"),
    "metrics.summarize": ("cm",),
    "metrics.boundary_mask": ("labels",),
    "metrics.within_distance": ("mask",),
    "metrics.trimap_counts": ("pred", "labels"),
    "metrics.trimap_error": ("pred", "labels"),
    "metrics.summarize_trimap": ("counts",),
    "metrics.boundary_counts": ("pred", "labels"),
    "metrics.boundary_fscore": ("pred", "labels"),
    "metrics.summarize_boundary": ("counts",),
}


def _public():
    """[(qualified name, object)] for every name in the operator modules' ``__all__``."""
    out = []
    for m in MODULES:
        mod = importlib.import_module(f"rwseg.{m}")
        assert hasattr(mod, "__all__"), m
        out += [(f"{m}.{n}", getattr(mod, n)) for n in mod.__all__]
    return out


FUNCTIONS = [(q, f) for q, f in _public() if inspect.isfunction(f)]
CLASSES = [(q, c) for q, c in _public() if inspect.isclass(c)]


def test_every_public_function_is_in_the_table():
    assert sorted(q for q, _ in FUNCTIONS) == sorted(POSITIONAL)


@pytest.mark.parametrize("name,fn", FUNCTIONS, ids=[q for q, _ in FUNCTIONS])
def test_signature_follows_the_convention(name, fn):
    params = inspect.signature(fn).parameters.values()
    positional = tuple(p.name for p in params if p.kind is not p.KEYWORD_ONLY)
    assert positional == POSITIONAL[name], f"{name}: positional {positional}"
    assert not any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in params)
    names = {p.name for p in params}
    assert not names & BANNED, f"{name}: banned parameter names {names & BANNED}"
    if not name.startswith("rwn."):
        assert "alpha" not in names, f"{name}: alpha means only the RWN restart probability"
    for p in params:
        if p.name == "ignore_index":
            assert p.kind is p.KEYWORD_ONLY and p.default == constants.IGNORE_INDEX, name


def test_one_ignore_index():
    from rwseg.data import constants as data_constants

    assert constants.IGNORE_INDEX == 255
    assert data_constants.IGNORE_INDEX is constants.IGNORE_INDEX
    root = pathlib.Path(constants.__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(IGNORE_INDEX|IGNORE|IGNORE_LABEL)\s*(:\s*int)?\s*=\s*255\b", re.M)
    defining = {str(p.relative_to(root)) for p in (root / "rwseg").rglob("*.py") if pattern.search(p.read_text())}
    assert defining == {"rwseg/constants.py"}


# --------------------------------------------------------------------------- tiny inputs

H, W = 5, 6
OFFS = stencil.disk_offsets(1)
GOFFS = gcrf.bipartite_offsets(1)
RATES = (1,)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _labels(seed=0, k=3):
    lab = _rng(seed).integers(0, k, (H, W))
    lab[0, 0] = constants.IGNORE_INDEX
    return jnp.asarray(lab, jnp.int32)


def _pred():
    return _labels(1) % 3


def _walk():
    w = jnp.asarray(_rng(1).uniform(0.1, 1.0, (H, W, len(OFFS))))
    w = 0.5 * (w + jnp.stack([stencil.shift(w[..., 3 - k], o) for k, o in enumerate(OFFS)], -1))
    f = jnp.asarray(_rng(2).normal(size=(H, W, 3)))
    return w, f


def _gcrf():
    z = jnp.asarray(_rng(3).normal(size=(H, W, 2)))
    s = gcrf.pairwise_similarity(z, jnp.asarray(_rng(4).normal(size=(2, 2))), GOFFS)
    return jnp.asarray(_rng(5).normal(size=(H, W, 3))), s, gcrf.compatibility(jnp.eye(3) * 0.5)


def _rawks():
    seeds = -np.ones((H, W), np.int32)
    seeds[0, 0], seeds[4, 5] = 0, 1
    b = jnp.asarray(_rng(6).uniform(0, 1, (H, W)))
    return b, jnp.asarray(seeds)


def _probs():
    return jax.nn.softmax(jnp.asarray(_rng(7).normal(size=(H, W, 3))), -1)


# --------------------------------------------------------------------------- return_info

INFO_CALLS = {
    "rwn.random_walk": [
        lambda: rwn.random_walk(*_walk(), OFFS, alpha=0.5, num_steps=3, return_info=True),
        lambda: rwn.random_walk(*_walk(), OFFS, alpha=0.5, return_info=True),
        lambda: rwn.random_walk(*_walk(), OFFS, alpha=0.5, symmetric=True, return_info=True),
    ],
    "rawks.hitting_probabilities": [lambda: rawks.hitting_probabilities(*_rawks(), 2, return_info=True)],
    "gcrf.gmf": [
        lambda: gcrf.gmf(*_gcrf(), GOFFS, num_steps=2, return_info=True),
        lambda: gcrf.gmf(*_gcrf(), GOFFS, return_info=True),
    ],
}


def _solve_info(info):
    if isinstance(info, linsolve.SolveInfo):
        return info
    found = [v for v in info if isinstance(v, linsolve.SolveInfo)]
    assert len(found) == 1, type(info)
    return found[0]


def test_every_return_info_function_is_exercised():
    have = {q for q, f in FUNCTIONS if "return_info" in inspect.signature(f).parameters}
    assert have == set(INFO_CALLS)


@pytest.mark.parametrize("name", sorted(INFO_CALLS))
def test_return_info_always_returns_result_and_a_namedtuple(name):
    for call in INFO_CALLS[name]:
        out = call()
        assert isinstance(out, tuple) and len(out) == 2, name
        result, info = out
        assert isinstance(result, jax.Array)
        assert isinstance(info, tuple) and hasattr(type(info), "_fields"), f"{name}: info is {type(info)}"
        solve = _solve_info(info)
        c = result.shape[-1]
        assert np.shape(solve.residual) == (c,) and np.shape(solve.converged) == (c,)
        assert np.shape(solve.iterations) == () and jnp.issubdtype(solve.iterations.dtype, jnp.integer)
        assert solve.converged.dtype == bool and jnp.issubdtype(solve.residual.dtype, jnp.floating)


def test_exact_step_info_reports_the_steps():
    y, info = rwn.random_walk(*_walk(), OFFS, alpha=0.5, num_steps=4, return_info=True)
    assert int(info.iterations) == 4 and float(jnp.max(info.residual)) == 0
    np.testing.assert_array_equal(y, rwn.random_walk(*_walk(), OFFS, alpha=0.5, num_steps=4))
    # under jit too (the info is a pytree of arrays)
    y2, info2 = jax.jit(lambda w, f: rwn.random_walk(w, f, OFFS, alpha=0.5, num_steps=4, return_info=True))(*_walk())
    np.testing.assert_allclose(y2, y, rtol=1e-12)
    assert int(info2.iterations) == 4


# --------------------------------------------------------------------------- docstrings


def _section(doc, title):
    """Entry names of a Google-style section (``    name: ...`` lines), or None when absent."""
    lines = inspect.cleandoc(doc).splitlines()
    if f"{title}:" not in lines:
        return None
    names = []
    for line in lines[lines.index(f"{title}:") + 1:]:
        if line and not line.startswith(" "):
            break
        if not line.strip() or line.startswith("        "):  # continuation of an entry
            continue
        m = re.match(r"^    (\w+)(?: \([^)]*\))?: ", line)
        assert m or title == "Returns", f"{title}: expected '    name: description', got {line!r}"
        names.append(m.group(1) if m else line.strip())
    return names


def _clean(text, what):
    assert not re.search(r"seed 00\d", text), f"{what}: name the paper, not the seed file"
    assert "../shared" not in text and "shared/docs" not in text, f"{what}: path outside the repository"


@pytest.mark.parametrize("name,fn", FUNCTIONS, ids=[q for q, _ in FUNCTIONS])
def test_docstring_has_args_and_returns(name, fn):
    doc = fn.__doc__
    _clean(doc, name)
    params = [p for p in inspect.signature(fn).parameters]
    args = _section(doc, "Args")
    assert (args or []) == params, f"{name}: Args {args} != signature {params}"
    returns = _section(doc, "Returns")
    assert returns is not None, f"{name}: no Returns section"
    assert len(returns) == 1, f"{name}: one returned value, its continuation lines indented: {returns}"


@pytest.mark.parametrize("name,cls", CLASSES, ids=[q for q, _ in CLASSES])
def test_info_types_document_their_fields(name, cls):
    _clean(cls.__doc__, name)
    assert _section(cls.__doc__, "Attributes") == list(cls._fields)


@pytest.mark.parametrize("module", MODULES)
def test_module_docstrings_name_papers(module):
    _clean(importlib.import_module(f"rwseg.{module}").__doc__, module)
