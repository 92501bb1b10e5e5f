"""Tests of rwseg.dilated against numpy loops, dense matrices and the paper's properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

from rwseg import dilated as D
from rwseg import stencil as S

IGN = 255
RATES = (1, (1, 2), 2)  # small rates so that 6x7 maps have valid pixels at every rate


def rate_pairs(rates):
    return [(r, r) if isinstance(r, int) else tuple(r) for r in rates]


def neighbours(r1, r2):
    return [(sy * r1, sx * r2) for sy in (-1, 0, 1) for sx in (-1, 0, 1) if (sy, sx) != (0, 0)]


def random_labels(rng, shape, n=3, p_ignore=0.1):
    small = rng.integers(0, n, size=(shape[0] // 2 + 1, shape[1] // 2 + 1))
    lab = np.kron(small, np.ones((2, 2), int))[: shape[0], : shape[1]].copy()
    lab[rng.random(shape) < p_ignore] = IGN
    return lab.astype(np.int32)


def ref_counts(labels, rates, ignore=IGN):
    """Numpy loop: (counts, valid) with the documented validity rule."""
    h, w = labels.shape
    pairs = rate_pairs(rates)
    counts = np.zeros((h, w, len(pairs)), int)
    valid = np.zeros((h, w, len(pairs)), bool)
    ok = lambda y, x: 0 <= y < h and 0 <= x < w and labels[y, x] >= 0 and labels[y, x] != ignore
    for y in range(h):
        for x in range(w):
            for r, (r1, r2) in enumerate(pairs):
                nbrs = [(y + dy, x + dx) for dy, dx in neighbours(r1, r2)]
                valid[y, x, r] = ok(y, x) and all(ok(*q) for q in nbrs)
                counts[y, x, r] = sum(ok(*q) and labels[q] == labels[y, x] for q in nbrs) if ok(y, x) else 0
    return counts, valid


# --------------------------------------------------------------------------- neighbour statistics


def test_neighbor_counts_against_loop_jit_vmap():
    rng = np.random.default_rng(0)
    labels = np.stack([random_labels(rng, (6, 7)) for _ in range(2)])
    labels[0, 2, 3] = -1
    fn = jax.jit(lambda l: D.neighbor_counts(l, RATES))
    for i in range(2):
        rc, rv = ref_counts(labels[i], RATES)
        c, v = fn(labels[i])
        assert c.dtype == jnp.int32 and v.dtype == jnp.bool_
        np.testing.assert_array_equal(v, rv)
        np.testing.assert_array_equal(c, rc)
    cb, vb = jax.vmap(fn)(labels)
    np.testing.assert_array_equal(vb[1], ref_counts(labels[1], RATES)[1])


def test_category_frequencies_streams_and_matches_loop():
    rng = np.random.default_rng(1)
    maps = [random_labels(rng, (6, 7)), random_labels(rng, (7, 5)), random_labels(rng, (6, 7), p_ignore=0.0)]
    expected = np.zeros((3, 9), np.int64)
    for m in maps:
        c, v = ref_counts(m, RATES)
        for r in range(3):
            expected[r] += np.bincount(c[..., r][v[..., r]], minlength=9)
    table = D.category_frequencies((m for m in maps), RATES)  # a generator: consumed once
    assert table.shape == (3, 9) and table.dtype == np.int64
    np.testing.assert_array_equal(table, expected)
    # tables of shards add up
    np.testing.assert_array_equal(D.category_frequencies(maps[:1], RATES) + D.category_frequencies(maps[1:], RATES), table)
    # a constant map: every valid entry is n8
    const = D.category_frequencies([np.zeros((6, 7), np.int32)], [1])
    np.testing.assert_array_equal(const, [[0] * 8 + [4 * 5]])


def test_prior_bias_is_logit_of_positive_fraction():
    rng = np.random.default_rng(2)
    maps = [random_labels(rng, (6, 7)) for _ in range(3)]
    table = D.category_frequencies(maps, RATES)
    bias = D.prior_bias(table)
    assert bias.shape == (3,) and bias.dtype == jnp.float32
    # independent count of the positive pairs among valid (pixel, rate) entries
    pos = np.zeros(3)
    tot = np.zeros(3)
    for m in maps:
        c, v = ref_counts(m, RATES)
        pos += (c * v).sum((0, 1))
        tot += 8 * v.sum((0, 1))
    pi = pos / tot
    np.testing.assert_allclose(bias, -np.log((1 - pi) / pi), rtol=1e-5)
    np.testing.assert_allclose(jax.nn.sigmoid(bias), pi, rtol=1e-5)
    # hand table: half n8, half n0 -> pi = 1/2 -> bias 0; proportions work as well as counts
    hand = np.array([[1.0, 0, 0, 0, 0, 0, 0, 0, 1.0]])
    np.testing.assert_allclose(D.prior_bias(hand), [0.0], atol=1e-12)
    assert D.prior_bias(hand).dtype == jnp.float64
    assert np.isfinite(D.prior_bias(np.array([[0, 0, 0, 0, 0, 0, 0, 0, 5]]))).all()
    with pytest.raises(ValueError, match=r"frequencies: expected every row \(rate\) to have a positive total, rows \[1\]"):
        D.prior_bias(np.array([[1] * 9, [0] * 9]))


# --------------------------------------------------------------------------- loss


def ref_loss(logits, labels, rates, table, gamma):
    counts, valid = ref_counts(labels, rates)
    f = table / table.sum(1, keepdims=True)
    h, w = labels.shape
    total, n = 0.0, 0
    for y in range(h):
        for x in range(w):
            for r, (r1, r2) in enumerate(rate_pairs(rates)):
                if not valid[y, x, r]:
                    continue
                fn, f8 = f[r, counts[y, x, r]], f[r, 8]
                wgt = np.sqrt(f8 / fn) if fn > 0 and f8 > 0 else 1.0  # documented fallback
                for j, (dy, dx) in enumerate(neighbours(r1, r2)):
                    t = labels[y + dy, x + dx] == labels[y, x]
                    p = 1 / (1 + np.exp(-logits[y, x, 8 * r + j]))
                    pt = p if t else 1 - p
                    total += wgt * -((1 - pt) ** gamma) * np.log(pt)
                    n += 1
    return total / max(n, 1)


def _focal_before_optax(logits, targets, gamma):
    """rwseg's own eq. 4 before it used optax.sigmoid_focal_loss: the reference."""
    signed = jnp.where(targets > 0, logits, -logits)
    return -jnp.power(jax.nn.sigmoid(-signed), gamma) * jax.nn.log_sigmoid(signed)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_focal_is_optax_and_matches_the_former_formula(gamma):
    """D._focal (optax.sigmoid_focal_loss) = the former hand-written eq. 4, values and
    gradients, over ordinary and extreme logits (stable: no NaN/inf at |z| = 80)."""
    z = jnp.concatenate([jnp.linspace(-12.0, 12.0, 49), jnp.array([-80.0, -30.0, 30.0, 80.0])])
    for t in (0.0, 1.0):
        targets = jnp.full_like(z, t)
        for dtype, rtol in ((jnp.float64, 1e-12), (jnp.float32, 1e-5)):
            zz = z.astype(dtype)
            new = D._focal(zz, targets, gamma)
            old = _focal_before_optax(zz, targets, gamma)
            assert new.dtype == dtype and bool(jnp.all(jnp.isfinite(new)))
            np.testing.assert_allclose(new, old, rtol=rtol, atol=1e-30)
            g_new = jax.grad(lambda a: D._focal(a, targets, gamma).sum())(zz)
            g_old = jax.grad(lambda a: _focal_before_optax(a, targets, gamma).sum())(zz)
            assert bool(jnp.all(jnp.isfinite(g_new)))
            np.testing.assert_allclose(g_new, g_old, rtol=50 * rtol, atol=1e-30)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_affinity_loss_against_loop(gamma):
    rng = np.random.default_rng(3)
    labels = random_labels(rng, (6, 7))
    logits = rng.normal(size=(6, 7, 24))
    table = np.arange(1, 28).reshape(3, 9).astype(float)
    got = jax.jit(lambda z: D.affinity_loss(z, labels, RATES, table, gamma=gamma))(logits)
    np.testing.assert_allclose(got, ref_loss(logits, labels, RATES, table, gamma), rtol=1e-10)


def test_affinity_loss_dtype_jit_vmap_grad():
    rng = np.random.default_rng(4)
    labels = np.stack([random_labels(rng, (6, 7)) for _ in range(2)])
    logits = rng.normal(size=(2, 6, 7, 24)).astype(np.float32)
    table = D.category_frequencies(labels, RATES)
    assert (table == 0).any()  # exercises the weight-1 fallback for categories never seen
    fn = jax.jit(lambda z, l: D.affinity_loss(z, l, RATES, table))
    batch = jax.vmap(fn)(logits, labels)
    assert batch.dtype == jnp.float32
    for i in range(2):
        np.testing.assert_allclose(batch[i], ref_loss(logits[i].astype(float), labels[i], RATES, table, 2.0), rtol=1e-5)
    g = jax.grad(fn)(logits[0], labels[0])
    assert g.dtype == jnp.float32 and np.isfinite(g).all()
    # only channels of valid (pixel, rate) entries get a gradient
    _, valid = ref_counts(labels[0], RATES)
    assert np.all(np.asarray(g).reshape(6, 7, 3, 8)[~valid] == 0)
    # the float64 gradient against central differences of the numpy loop, along a random direction
    z0, v = logits[0].astype(float), rng.normal(size=logits[0].shape)
    g64 = jax.jit(jax.grad(lambda z: D.affinity_loss(z, labels[0], RATES, table)))(z0)
    fd = (ref_loss(z0 + 1e-5 * v, labels[0], RATES, table, 2.0) - ref_loss(z0 - 1e-5 * v, labels[0], RATES, table, 2.0)) / 2e-5
    np.testing.assert_allclose(np.sum(np.asarray(g64) * v), fd, rtol=1e-6)


def test_affinity_loss_properties():
    # a constant map: every pair is positive and n8 (weight 1): the loss is the plain focal loss
    labels = np.zeros((6, 7), np.int32)
    logits = np.full((6, 7, 8), 0.3)
    p = 1 / (1 + np.exp(-0.3))
    loss = jax.jit(lambda z, l: D.affinity_loss(z, l, [2], np.ones((1, 9))))
    np.testing.assert_allclose(loss(logits, labels), -((1 - p) ** 2) * np.log(p))
    # nothing valid -> 0
    assert float(loss(logits, np.full((6, 7), IGN, np.int32))) == 0.0
    # confident correct logits give a near-zero loss
    rng = np.random.default_rng(5)
    lab = random_labels(rng, (6, 7), p_ignore=0)
    targets, _ = S.label_affinity(lab, S.dilated_offsets(RATES))
    good = 20.0 * (2 * np.asarray(targets) - 1)
    assert float(jax.jit(lambda z: D.affinity_loss(z, lab, RATES, np.ones((3, 9))))(good)) < 1e-20


# --------------------------------------------------------------------------- propagation


def ref_propagate(probs, logits, rates, lam, mu, iterations):
    """Numpy loop over pixels and neighbours."""
    h, w, _ = probs.shape
    offs = [o for r1, r2 in rate_pairs(rates) for o in neighbours(r1, r2)]
    gates = 1 / (1 + np.exp(-mu * logits))
    p = probs.copy()
    for _ in range(iterations):
        q = lam * p * p.max(-1, keepdims=True)
        for y in range(h):
            for x in range(w):
                for c, (dy, dx) in enumerate(offs):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        q[y, x] += gates[y, x, c] * p[y + dy, x + dx]
        p = q / q.sum(-1, keepdims=True)
    return p


def random_probs(rng, shape):
    z = rng.normal(size=shape)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_propagate_against_loop_and_dense():
    rng = np.random.default_rng(6)
    probs = random_probs(rng, (6, 7, 4))
    logits = rng.normal(size=(6, 7, 24)) * 0.3
    got = D.propagate(probs, logits, RATES, lam=6.0, mu=7.0, num_steps=3)
    np.testing.assert_allclose(got, ref_propagate(probs, logits, RATES, 6.0, 7.0, 3), rtol=1e-10)
    # one step through the dense matrix of the gates
    offsets = S.dilated_offsets(RATES)
    dense = np.asarray(S.to_dense(jax.nn.sigmoid(2.0 * logits), offsets))
    p = probs.reshape(42, 4)
    q = 1.5 * p * p.max(-1, keepdims=True) + dense @ p
    one = D.propagate(probs, logits, RATES, lam=1.5, mu=2.0, num_steps=1)
    np.testing.assert_allclose(one.reshape(42, 4), q / q.sum(-1, keepdims=True), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-12)


def test_propagate_properties():
    rng = np.random.default_rng(7)
    probs = random_probs(rng, (6, 7, 3))
    # no affinity: lam p max(p) normalises back to p, for any number of iterations
    closed = D.propagate(probs, np.full((6, 7, 8), -50.0), [1], num_steps=5)
    np.testing.assert_allclose(closed, probs, rtol=1e-12)
    np.testing.assert_array_equal(D.propagate(probs, np.zeros((6, 7, 8)), [1], num_steps=0), probs)
    # a spatially constant prediction is a fixed point (its neighbours agree with it)
    const = np.broadcast_to(np.array([0.2, 0.5, 0.3]), (6, 7, 3))
    out = D.propagate(const, rng.normal(size=(6, 7, 16)), [1, 2], num_steps=4)
    np.testing.assert_allclose(out, const, rtol=1e-12)
    # strong affinities pull a pixel towards its neighbours
    p = np.tile(np.array([0.9, 0.1]), (5, 5, 1))
    p[2, 2] = [0.3, 0.7]
    out = D.propagate(p, np.full((5, 5, 8), 5.0), [1], num_steps=2)
    assert float(out[2, 2, 0]) > 0.5


def test_propagate_with_ground_truth_affinity_repairs_noise():
    """The paper's upper bound (Tables 3-4): propagation with ground-truth affinities
    (``label_affinity`` targets as +-large logits, channel c = offset c) repairs noisy
    predictions, a 1-px line included, with the paper's lam, mu and 10 iterations. Any
    mismatch between the channel order of ``label_affinity`` and ``propagate`` (mirrored
    or transposed offsets, rates in another order) lets classes leak across boundaries."""
    rates = (1, (1, 2), 2)
    labels = np.zeros((12, 14), np.int32)
    labels[2:8, 6:14] = 1
    labels[:, 2] = 2  # thin structure
    rng = np.random.default_rng(0)
    probs = 0.25 * rng.random((12, 14, 3)) + 0.5 * np.eye(3)[labels]
    flip = rng.random(labels.shape) < 0.2
    wrong = (labels + rng.integers(1, 3, size=labels.shape)) % 3
    probs[flip] = 0.2 + 0.6 * np.eye(3)[wrong[flip]]
    probs /= probs.sum(-1, keepdims=True)
    assert (probs.argmax(-1) != labels).mean() > 0.15
    offsets = S.dilated_offsets(rates)
    targets, _ = S.label_affinity(labels, offsets)
    logits = np.where(np.asarray(targets) > 0.5, 20.0, -20.0)
    out = np.asarray(D.propagate(probs, logits, rates, lam=6.0, mu=7.0, num_steps=10))
    np.testing.assert_array_equal(out.argmax(-1), labels)
    mirrored = [offsets.index((-dy, -dx)) for dy, dx in offsets]
    transposed = [offsets.index((dx, dy)) if (dx, dy) in offsets else c for c, (dy, dx) in enumerate(offsets)]
    rate_swapped = list(range(16, 24)) + list(range(8, 16)) + list(range(8))
    for perm in (mirrored, transposed, rate_swapped):
        bad = np.asarray(D.propagate(probs, logits[..., perm], rates, lam=6.0, mu=7.0, num_steps=10))
        assert (bad.argmax(-1) != labels).mean() > 0.05


def test_propagate_dtype_jit_vmap():
    rng = np.random.default_rng(8)
    probs = random_probs(rng, (2, 6, 7, 3)).astype(np.float32)
    logits = rng.normal(size=(2, 6, 7, 24)).astype(np.float32)
    fn = jax.jit(jax.vmap(lambda p, z: D.propagate(p, z, RATES, num_steps=4)))
    out = fn(probs, logits)
    assert out.dtype == jnp.float32
    for i in range(2):
        ref = ref_propagate(probs[i].astype(float), logits[i].astype(float), RATES, 6.0, 7.0, 4)
        np.testing.assert_allclose(out[i], ref, rtol=1e-4, atol=1e-6)


def test_propagate_grads():
    rng = np.random.default_rng(9)
    probs = random_probs(rng, (5, 6, 3))
    logits = rng.normal(size=(5, 6, 16)) * 0.3
    f = jax.jit(lambda p, z, lam: D.propagate(p, z, (1, (1, 2)), lam=lam, mu=2.0, num_steps=3))
    check_grads(f, (probs, logits, 1.5), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_input_messages():
    lab = np.zeros((6, 7), np.int32)
    probs = np.full((6, 7, 3), 1 / 3)
    with pytest.raises(TypeError, match="labels: expected an integer label array, got dtype float"):
        D.neighbor_counts(lab.astype(float), RATES)
    with pytest.raises(ValueError, match=r"labels: expected a rank-2 array \(H, W\), got shape \(6, 7, 1\)"):
        D.neighbor_counts(lab[..., None], RATES)
    with pytest.raises(ValueError, match="rates: expected every rate > 0, got 0"):
        D.neighbor_counts(lab, (1, 0))
    with pytest.raises(ValueError, match=r"rates: expected every rate > 0, got \(2, -1\)"):
        D.propagate(probs, np.zeros((6, 7, 16)), (1, (2, -1)))
    with pytest.raises(ValueError, match=r"label_maps\[1\]: expected a rank-2 array \(H, W\), got shape \(7,\)"):
        D.category_frequencies([lab, lab[0]], RATES)
    with pytest.raises(ValueError, match=r"frequencies: expected shape \(\|R\|, 9\) with \|R\| = len\(rates\) = 3 = \(3, 9\), got \(2, 9\)"):
        D.affinity_loss(np.zeros((6, 7, 24)), lab, RATES, np.ones((2, 9)))
    with pytest.raises(ValueError, match=r"logits: expected shape .*= \(6, 7, 24\), got \(6, 7, 16\)"):
        D.affinity_loss(np.zeros((6, 7, 16)), lab, RATES, np.ones((3, 9)))
    with pytest.raises(TypeError, match="logits: expected a floating-point array"):
        D.affinity_loss(np.zeros((6, 7, 24), np.int32), lab, RATES, np.ones((3, 9)))
    with pytest.raises(ValueError, match="frequencies: expected finite counts >= 0"):
        D.prior_bias(-np.ones((3, 9)))
    with pytest.raises(ValueError, match=r"affinity_logits: expected shape .*= \(6, 7, 24\), got \(6, 7, 8\)"):
        D.propagate(probs, np.zeros((6, 7, 8)), RATES)
    with pytest.raises(ValueError, match=r"affinity_logits: expected shape .*= \(6, 7, 8\), got \(6, 5, 8\)"):
        D.propagate(probs, np.zeros((6, 5, 8)), [1])
    with pytest.raises(ValueError, match=r"probs: expected a rank-3 array \(H, W, C\), got shape \(6, 7\)"):
        D.propagate(probs[..., 0], np.zeros((6, 7, 8)), [1])
    with pytest.raises(ValueError, match="num_steps: expected an int >= 0, got -1"):
        D.propagate(probs, np.zeros((6, 7, 8)), [1], num_steps=-1)
    with pytest.raises(TypeError, match="num_steps: expected a Python int, got float"):
        D.propagate(probs, np.zeros((6, 7, 8)), [1], num_steps=2.0)
    with pytest.raises(ValueError, match="probs: expected finite probabilities >= 0"):
        D.propagate(np.full((6, 7, 3), np.nan), np.zeros((6, 7, 8)), [1])
    with pytest.raises(ValueError, match="lam: expected a finite number >= 0, got -1.0"):
        D.propagate(probs, np.zeros((6, 7, 8)), [1], lam=-1.0)


def test_value_checks_eager_and_checkify():
    lab = np.zeros((6, 7), np.int32)
    probs = np.full((6, 7, 3), 1 / 3)
    bad = probs.copy()
    bad[1, 2, 0] = -0.1
    with pytest.raises(ValueError, match=r"probs: expected finite probabilities >= 0, got 0 NaN/inf and 1 negative"):
        D.propagate(bad, np.zeros((6, 7, 8)), [1])
    nan_logits = np.zeros((6, 7, 8))
    nan_logits[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="affinity_logits: expected finite logits, got 1 NaN/inf"):
        D.propagate(probs, nan_logits, [1])
    with pytest.raises(ValueError, match="logits: expected finite logits"):
        D.affinity_loss(np.full((6, 7, 8), np.inf), lab, [1], np.ones((1, 9)))
    # under jit: unchecked by default, reported through checkify with checked=True
    prop = checkify.checkify(jax.jit(lambda p, z: D.propagate(p, z, [1], num_steps=2, checked=True)))
    err, _ = prop(bad, np.zeros((6, 7, 8)))
    with pytest.raises(checkify.JaxRuntimeError, match="probs: expected finite probabilities >= 0"):
        err.throw()
    err, out = prop(probs, np.zeros((6, 7, 8)))
    err.throw()
    np.testing.assert_allclose(out, probs)
    loss = checkify.checkify(jax.jit(lambda z, f: D.affinity_loss(z, lab, [1], f, checked=True)))
    err, _ = loss(np.zeros((6, 7, 8)), -np.ones((1, 9)))
    with pytest.raises(checkify.JaxRuntimeError, match="frequencies: expected finite counts >= 0"):
        err.throw()


# --------------------------------------------------------------------------- issue 9.6: zero mass, array lam / mu


def test_propagate_zero_mass_pixel_with_neighbours_is_their_gated_average():
    """An all-zero pixel is well defined by eq. 6 as long as a neighbour has mass."""
    rng = np.random.default_rng(10)
    probs = random_probs(rng, (4, 5, 3))
    probs[1, 2] = 0.0
    logits = rng.normal(size=(4, 5, 8))
    out = np.asarray(D.propagate(probs, logits, [1], lam=6.0, mu=2.0, num_steps=3))
    np.testing.assert_allclose(out, ref_propagate(probs, logits, [1], 6.0, 2.0, 3), rtol=1e-12)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-12)
    one = np.asarray(D.propagate(probs, logits, [1], lam=6.0, mu=2.0, num_steps=1))
    nbrs = [(1 + dy, 2 + dx) for dy, dx in neighbours(1, 1)]
    g = 1 / (1 + np.exp(-2.0 * logits[1, 2]))
    avg = sum(g[c] * probs[q] for c, q in enumerate(nbrs))
    np.testing.assert_allclose(one[1, 2], avg / avg.sum(), rtol=1e-12)


@pytest.mark.parametrize("case", ["all_zero", "zero_block", "lam0_no_neighbour"])
def test_propagate_zero_mass_is_an_error_or_nan_never_a_distribution(case):
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(6, 7, 8))
    lam = 6.0
    if case == "all_zero":
        probs = np.zeros((6, 7, 3))
    elif case == "zero_block":  # the centre of a 3x3 zero block has zero mass at rate 1
        probs = random_probs(rng, (6, 7, 3))
        probs[1:4, 2:5] = 0.0
    else:  # rate 8 on a 1 x 3 image: no neighbour is inside; lam = 0 leaves nothing
        probs, logits, lam = random_probs(rng, (1, 3, 3)), rng.normal(size=(1, 3, 8)), 0.0
    rates = [8] if case == "lam0_no_neighbour" else [1]
    with pytest.raises(ValueError, match=r"probs: eq. 6 divides .* had zero mass"):
        D.propagate(probs, logits, rates, lam=lam, num_steps=2)
    # unchecked under jit: NaN (where undefined), reported by checkify when checked
    fn = jax.jit(lambda p, z, c: D.propagate(p, z, rates, lam=lam, num_steps=2, checked=c), static_argnums=2)
    out = np.asarray(fn(probs, logits, False))
    assert np.isnan(out).any()
    assert np.all(np.isnan(out) | np.isclose(out.sum(-1, keepdims=True), 1.0))
    if case == "zero_block":
        assert np.isnan(out[2, 3]).all() and np.isfinite(out[5, 0]).all()
    err, _ = checkify.checkify(fn, errors=checkify.user_checks)(probs, logits, True)
    with pytest.raises(checkify.JaxRuntimeError, match="had zero mass"):
        err.throw()
    # num_steps=0 never normalises: returned unchanged, no error
    np.testing.assert_array_equal(D.propagate(probs, logits, rates, lam=lam, num_steps=0), probs)


def test_propagate_checks_array_lam_and_mu():
    rng = np.random.default_rng(12)
    probs = random_probs(rng, (5, 6, 3))
    logits = rng.normal(size=(5, 6, 8))
    for name in ("lam", "mu"):
        for bad in (np.float64(-1.0), jnp.asarray(-1.0), np.array(np.nan), jnp.asarray(np.inf), -2):
            with pytest.raises(ValueError, match=f"{name}: expected a finite number >= 0, got"):
                D.propagate(probs, logits, [1], **{name: bad})
        with pytest.raises(ValueError, match=rf"{name}: expected a scalar, got an array of shape \(3,\)"):
            D.propagate(probs, logits, [1], **{name: np.ones(3)})
        with pytest.raises(TypeError, match=f"{name}: expected a number"):
            D.propagate(probs, logits, [1], **{name: "6"})
    # concrete 0-d arrays are the same as Python numbers
    np.testing.assert_allclose(D.propagate(probs, logits, [1], lam=jnp.asarray(1.5), mu=np.float32(2.0), num_steps=2),
                               ref_propagate(probs, logits, [1], 1.5, 2.0, 2), rtol=1e-6)
    # traced lam / mu: NaN when bad (issue 9.6: lam = -1 gave "probabilities" in [-1630, 2020])
    fn = jax.jit(lambda p, z, lam, mu: D.propagate(p, z, [1], lam=lam, mu=mu, num_steps=3))
    good = np.asarray(fn(probs, logits, 6.0, 7.0))
    np.testing.assert_allclose(good, ref_propagate(probs, logits, [1], 6.0, 7.0, 3), rtol=1e-10)
    for lam, mu in ((-1.0, 7.0), (np.nan, 7.0), (np.inf, 7.0), (6.0, -1.0), (6.0, np.inf)):
        assert np.isnan(np.asarray(fn(probs, logits, lam, mu))).all(), (lam, mu)
    checked = checkify.checkify(jax.jit(lambda p, z, lam, mu: D.propagate(p, z, [1], lam=lam, mu=mu, num_steps=3,
                                                                          checked=True)))
    err, _ = checked(probs, logits, -1.0, 7.0)
    with pytest.raises(checkify.JaxRuntimeError, match="lam: expected a finite number >= 0, got -1"):
        err.throw()
    err, _ = checked(probs, logits, 6.0, np.nan)
    with pytest.raises(checkify.JaxRuntimeError, match="mu: expected a finite number >= 0, got nan"):
        err.throw()
    err, out = checked(probs, logits, 6.0, 7.0)
    err.throw()
    np.testing.assert_allclose(out, good, rtol=1e-12)


def test_propagate_traced_negative_probs_give_nan():
    rng = np.random.default_rng(13)
    probs = random_probs(rng, (4, 4, 2))
    probs[0, 0, 0] = -0.5
    out = np.asarray(jax.jit(lambda p: D.propagate(p, np.zeros((4, 4, 8)), [1], num_steps=1))(probs))
    assert np.isnan(out[0, 0]).all()
