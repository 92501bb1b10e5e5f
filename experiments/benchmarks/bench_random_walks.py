"""Benchmark of the random walks (issue 3): RAWKS hitting probabilities and RWN's converged walk.

Prints one markdown table, every row measured in this run (medians over ``--repeats``):

(a) ``rwseg.rawks.hitting_probabilities`` forward + backward (``jax.value_and_grad`` of a
    linear loss in P with respect to the boundary B) at 128x96, 21 labels, ~3 % of the
    pixels seeded, B uniform in [0, 3], float32, against
    - scipy SuperLU (``splu``): build ``diag(4 e^B) - adjacency``, factorise once, solve all
      21 labels and the adjoint system (``trans="T"``) with the same factors, then the
      gradient — the seed paper's CPU-solver approach;
    - scipy CG (``scipy.sparse.linalg.cg``, Jacobi-preconditioned, rtol 1e-6): 21 forward
      and 21 adjoint solves.
(b) ``rwseg.rwn.random_walk`` converged (``num_steps=None``, symmetric CG) with the radius-5
    disk (K = 80) at 64x64 and 128x128 with 21 classes, alpha = ``--alpha``, float32,
    against scipy ``splu`` of ``(D - alpha W)`` (build + factorise + solve) and against dense
    CRF inference (``pydensecrf2``, 5 mean-field iterations) on the same scores.

(c) the converged walk alone (weights precomputed), new ``rwn.random_walk`` against the
    previous formulation kept here as :func:`reference_walk` (Jacobi-preconditioned CG on the
    unscaled ``(D - alpha W) y = (1 - alpha) D f``, 21 channels, zero start with its initial
    product; issue 8.4), timed alternately in the same process, with the CG iteration counts
    and the largest difference of the results; then the same for forward + backward (the
    gradient of a linear loss in y with respect to weights and scores). The reference shares
    ``rwseg.linsolve`` (and ``stencil.apply``) with the current code, so improvements there
    speed it up too and the ratio only shows what the converged branch of ``rwn`` adds.
    ``--old-walk`` also runs (b) with the old formulation.

Ratios are peer time / rwseg time (> 1: rwseg faster). A GPU column appears when jax sees
a GPU; otherwise the table says so. Peers that are not installed print "n/a (not
installed)".

Usage: ``python experiments/benchmarks/bench_random_walks.py [--repeats 5] [--sizes 64,128]
[--rawks-size 96x128] [--labels 21] [--alpha 0.9] [--skip a|b|c] [--old-walk]``
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

sys.path.insert(0, os.path.dirname(__file__))
from common import fmt_ms, gpu_device, machine, markdown_table, median_time, median_times  # noqa: E402

from rwseg import linsolve, rawks, rwn, stencil  # noqa: E402

try:
    import pydensecrf.densecrf as dcrf
except ImportError:  # optional peer
    dcrf = None

NOT_INSTALLED = "n/a (not installed)"


def log(msg):
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- (a) RAWKS


def rawks_problem(h, w, labels, seed=0, frac=0.03):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0, 3, (h, w)).astype(np.float32)
    s = np.full((h, w), -1, np.int32)
    idx = rng.choice(h * w, int(frac * h * w), replace=False)
    s.flat[idx] = rng.integers(0, labels, idx.size)
    s.flat[idx[:labels]] = np.arange(labels)
    g = rng.normal(size=(h, w, labels)).astype(np.float32)  # dL/dP of a linear loss
    return b, s, g


def _unlabelled_system(seeds, labels):
    """Index of unlabelled pixels, their adjacency (CSR) and the labelled-neighbour counts."""
    h, w = seeds.shape
    flat = seeds.ravel()
    unl = np.flatnonzero(flat < 0)
    pos = np.full(h * w, -1)
    pos[unl] = np.arange(unl.size)
    ys, xs = np.divmod(unl, w)
    rows, cols, src_r, src_c = [], [], [], []
    for dy, dx in stencil.four_connected():
        yy, xx = ys + dy, xs + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        q = yy[ok] * w + xx[ok]
        i = np.flatnonzero(ok)
        lab = flat[q] >= 0
        rows.append(i[~lab])
        cols.append(pos[q[~lab]])
        src_r.append(i[lab])
        src_c.append(flat[q[lab]])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    adj = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(unl.size, unl.size))
    src = np.zeros((unl.size, labels))
    np.add.at(src, (np.concatenate(src_r), np.concatenate(src_c)), 1.0)
    return unl, adj, src


def scipy_rawks(boundary, seeds, g, labels, method):
    """P and dL/dB (L = sum g * P) with scipy, float64. method: 'splu' or 'cg'."""
    unl, adj, src = _unlabelled_system(seeds, labels)
    d = 4 * np.exp(boundary.ravel()[unl].astype(np.float64))
    a = (sp.diags(d) - adj).tocsc()
    if method == "splu":
        lu = spla.splu(a)
        # A is symmetric; SuperLU's trans="T" solve measured ~4x faster than trans="N" here
        solve = solve_t = lambda r: lu.solve(r, trans="T")
    else:
        m = sp.diags(1 / d)

        def solve(r):
            return np.stack([spla.cg(a, r[:, l], rtol=1e-6, M=m, maxiter=1000)[0] for l in range(r.shape[1])], 1)

        solve_t = solve
    z = solve(src)
    total = z.sum(1, keepdims=True)
    # scipy CG (absolute accuracy) can leave sum_l Z <= 0 far from seeds: uniform P, no gradient there
    bad = ~(total > 0)
    total = np.where(bad, 1.0, total)
    p = np.where(bad, 1.0 / labels, z / total)
    gu = g.reshape(-1, labels)[unl].astype(np.float64)
    dz = np.where(bad, 0.0, (gu - np.sum(gu * p, 1, keepdims=True)) / total)  # d(sum g P)/dZ
    lam = solve_t(dz)
    grad = np.zeros(seeds.size)
    grad[unl] = -np.sum(lam * z, 1) * d  # dA/dB_x = diag(4 e^B_x)
    return p, grad.reshape(seeds.shape)


def bench_rawks(args, devices):
    h, w = args.rawks_size
    b, s, g = rawks_problem(h, w, args.labels)

    def loss(b, s, g):
        return jnp.sum(g * rawks.hitting_probabilities(b, s, args.labels))

    rows = []
    vg = jax.jit(jax.value_and_grad(loss))
    times = {}
    for name, dev in devices:
        bd, sd, gd = (jax.device_put(x, dev) for x in (b, s, g))
        times[name] = median_time(lambda: jax.block_until_ready(vg(bd, sd, gd)), repeats=args.repeats)
    # accuracy against SuperLU (float64)
    _, grad_ref = scipy_rawks(b, s, g, args.labels, "splu")
    _, grad = vg(b, s, g)
    rel = float(np.max(np.abs(np.asarray(grad) - grad_ref)) / np.max(np.abs(grad_ref)))
    log(f"rawks rwseg {times}")
    t_lu = median_time(lambda: scipy_rawks(b, s, g, args.labels, "splu"), repeats=args.repeats, warmup=1)
    log(f"rawks splu {t_lu}")
    t_cg = median_time(lambda: scipy_rawks(b, s, g, args.labels, "cg"), repeats=max(1, args.repeats // 2), warmup=0)
    label = f"(a) hitting_probabilities fwd+bwd {w}x{h}, {args.labels} labels, 3% seeds"
    rows.append(_row(label, times, [("scipy splu", t_lu), ("scipy CG", t_cg)]) + [f"grad rel. err {rel:.1e}"])
    return rows


# --------------------------------------------------------------------------- (b) RWN


def rwn_problem(size, classes, seed=0):
    rng = np.random.default_rng(seed)
    # a piecewise-constant "image" with noise, and noisy class scores
    yy, xx = np.mgrid[:size, :size]
    regions = ((yy // (size // 4)) * 4 + xx // (size // 4)) % classes
    img = (np.stack([regions * 37 % 255, regions * 91 % 255, regions * 53 % 255], -1)
           + rng.normal(0, 8, (size, size, 3))).clip(0, 255).astype(np.float32)
    scores = (np.eye(classes)[regions] * 2 + rng.normal(0, 1.5, (size, size, classes))).astype(np.float32)
    return img, scores


WALK_OFFSETS = stencil.disk_offsets(5)  # RWN's test-time stencil (K = 80)


def walk_weights(img):
    """The benchmark's affinities on :data:`WALK_OFFSETS`: ``exp(-0.05 sum_c |F_i - F_j|)`` of the RGB image."""
    theta = np.full(3, -0.05, np.float32)
    return rwn.affinity(rwn.feature_distances(img, WALK_OFFSETS), theta, WALK_OFFSETS)


def scipy_walk(weights, f, offsets, alpha):
    """(1 - alpha) (D - alpha W)^-1 D f by splu (build + factorise + solve), float64."""
    h, w, _ = weights.shape
    ys, xs, ks = np.nonzero(stencil.valid_mask(h, w, offsets))
    dy = np.array([o[0] for o in offsets])[ks]
    dx = np.array([o[1] for o in offsets])[ks]
    wm = sp.csr_matrix((weights[ys, xs, ks].astype(np.float64), (ys * w + xs, (ys + dy) * w + xs + dx)),
                       shape=(h * w, h * w))
    d = np.asarray(wm.sum(1)).ravel()
    lu = spla.splu((sp.diags(d) - alpha * wm).tocsc())
    return ((1 - alpha) * lu.solve(d[:, None] * f.reshape(h * w, -1).astype(np.float64))).reshape(f.shape)


def dense_crf(img, scores, iterations=5):
    h, w, c = scores.shape
    logp = scores - scores.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    unary = np.ascontiguousarray((-logp).reshape(h * w, c).T.astype(np.float32))
    rgb = np.ascontiguousarray(img.astype(np.uint8))

    def run():
        d = dcrf.DenseCRF2D(w, h, c)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
        return np.array(d.inference(iterations))

    return run


def reference_walk(weights, f, offsets, alpha, tol, max_iters=1000):
    """The converged walk as rwn.random_walk(symmetric=True) computed it before issue 8.4.

    Jacobi-preconditioned CG on ``(D - alpha W) y = (1 - alpha) D f`` in the channels of f,
    started from zero with the product ``A 0`` (``x0=zeros``); returns ``(y, info)``.
    """
    d = stencil.degree(weights, offsets)[..., None]
    d1 = jnp.where(d > 0, d, 1)

    def matvec(y):
        return d1 * y - alpha * stencil.apply(weights, y, offsets)

    return linsolve.cg(matvec, (1 - alpha) * d1 * f, tol=tol, max_iters=max_iters,
                       preconditioner=linsolve.jacobi(d1), x0=jnp.zeros_like(f))


def bench_walk_old_new(args, devices):
    """(c) the converged walk alone: old formulation vs rwn.random_walk, alternating runs."""
    offsets = WALK_OFFSETS
    rows = []
    for size in args.sizes:
        img, scores = rwn_problem(size, args.labels)
        wts = np.asarray(jax.jit(walk_weights)(img))
        new = jax.jit(lambda w, f: rwn.random_walk(w, f, offsets, alpha=args.alpha, symmetric=True, tol=1e-5,
                                                   return_info=True))
        old = jax.jit(lambda w, f: reference_walk(w, f, offsets, args.alpha, 1e-5))
        for name, dev in devices:
            w_d, s_d = jax.device_put(wts, dev), jax.device_put(scores, dev)
            (y_new, i_new), (y_old, i_old) = jax.block_until_ready((new(w_d, s_d), old(w_d, s_d)))  # compile
            # alternating runs, so that load drift hits both alike
            t_old, t_new = median_times([lambda: jax.block_until_ready(old(w_d, s_d)),
                                         lambda: jax.block_until_ready(new(w_d, s_d))],
                                        repeats=2 * args.repeats + 1, warmup=0)
            diff = float(jnp.max(jnp.abs(y_new - y_old)) / jnp.max(jnp.abs(y_old)))
            log(f"walk-only {size} {name}: old {t_old} new {t_new}")
            rows.append([f"(c) converged walk only, {size}x{size}, {args.labels} classes, alpha={args.alpha} [{name}]",
                         fmt_ms(t_new), fmt_ms(t_old), f"{t_old / t_new:.2f}x",
                         f"CG iterations old {int(i_old.iterations)} / new {int(i_new.iterations)}; "
                         f"rel. diff {diff:.1e}; converged {bool(jnp.all(i_new.converged))}"])
            # forward + backward: gradient of a linear loss in y with respect to weights and scores
            g = jax.device_put(np.random.default_rng(1).normal(size=scores.shape).astype(np.float32), dev)
            grad_new = jax.jit(jax.grad(lambda w, f, g: jnp.sum(g * new(w, f)[0]), argnums=(0, 1)))
            grad_old = jax.jit(jax.grad(lambda w, f, g: jnp.sum(g * old(w, f)[0]), argnums=(0, 1)))
            (gw_new, _), (gw_old, _) = jax.block_until_ready((grad_new(w_d, s_d, g), grad_old(w_d, s_d, g)))
            t_old, t_new = median_times([lambda: jax.block_until_ready(grad_old(w_d, s_d, g)),
                                         lambda: jax.block_until_ready(grad_new(w_d, s_d, g))],
                                        repeats=2 * args.repeats + 1, warmup=0)
            gdiff = float(jnp.max(jnp.abs(gw_new - gw_old)) / jnp.max(jnp.abs(gw_old)))
            log(f"walk-only fwd+bwd {size} {name}: old {t_old} new {t_new}")
            rows.append([f"(c) converged walk fwd+bwd (grad in weights and scores), {size}x{size} [{name}]",
                         fmt_ms(t_new), fmt_ms(t_old), f"{t_old / t_new:.2f}x",
                         f"weight-gradient rel. diff {gdiff:.1e}"])
    return rows


def bench_rwn(args, devices):
    offsets = WALK_OFFSETS
    rows = []
    for size in args.sizes:
        img, scores = rwn_problem(size, args.labels)

        def walk(img, scores):
            wts = walk_weights(img)
            if args.old_walk:
                return reference_walk(wts, scores, offsets, args.alpha, 1e-5)[0]
            return rwn.random_walk(wts, scores, offsets, alpha=args.alpha, symmetric=True, tol=1e-5)

        fn = jax.jit(walk)
        times = {}
        for name, dev in devices:
            i_d, s_d = jax.device_put(img, dev), jax.device_put(scores, dev)
            times[name] = median_time(lambda: jax.block_until_ready(fn(i_d, s_d)), repeats=args.repeats)
        log(f"walk {size} rwseg {times}")
        wts = np.asarray(jax.jit(walk_weights)(img))
        ref = scipy_walk(wts, scores, offsets, args.alpha)
        rel = float(np.max(np.abs(np.asarray(fn(img, scores)) - ref)) / np.max(np.abs(ref)))
        t_lu = median_time(lambda: scipy_walk(wts, scores, offsets, args.alpha), repeats=max(1, args.repeats // 2),
                           warmup=0)
        log(f"walk {size} splu {t_lu}")
        t_crf = median_time(dense_crf(img, scores), repeats=args.repeats, warmup=1) if dcrf else None
        label = f"(b) random_walk converged, disk r=5, {size}x{size}, {args.labels} classes, alpha={args.alpha}"
        peers = [("scipy splu", t_lu), ("dense CRF 5 it", t_crf if dcrf else NOT_INSTALLED)]
        rows.append(_row(label, times, peers) + [f"rel. err vs splu {rel:.1e}"])
    return rows


# --------------------------------------------------------------------------- table


def _row(label, times, peers):
    cpu = times["cpu"]
    row = [label, fmt_ms(cpu)]
    if "gpu" in times:
        row.append(fmt_ms(times["gpu"]))
    for _, t in peers:
        if isinstance(t, str):
            row += [t, "-"]
        else:
            row += [fmt_ms(t), f"{t / cpu:.2f}x"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[64, 128])
    p.add_argument("--rawks-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(96, 128),
                   help="H x W of the RAWKS problem (default 96x128)")
    p.add_argument("--labels", type=int, default=21)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--skip", choices=["a", "b", "c"], action="append", default=[],
                   help="skip a section (repeatable)")
    p.add_argument("--old-walk", action="store_true",
                   help="run (b) with the pre-issue-8.4 walk (reference_walk) instead of rwn.random_walk")
    args = p.parse_args(argv)

    devices = [("cpu", jax.devices("cpu")[0])]
    gpu = gpu_device()
    if gpu is not None:
        devices.append(("gpu", gpu))
    print(f"machine: {machine()}")
    print("GPU: " + (f"yes ({gpu.device_kind}); rwseg GPU column measured" if gpu else
                     "none seen by jax; no GPU column"))
    rows = []
    if "a" not in args.skip:
        rows += bench_rawks(args, devices)
    if "b" not in args.skip:
        rows += bench_rwn(args, devices)
    headers = ["case", "rwseg CPU ms"] + (["rwseg GPU ms"] if gpu else [])
    headers += ["peer 1 ms", "peer 1 / rwseg CPU", "peer 2 ms", "peer 2 / rwseg CPU", "check"]
    print("peers: (a) peer 1 = scipy SuperLU (factors reused for all labels and the adjoint), "
          "peer 2 = scipy CG; (b) peer 1 = scipy splu, peer 2 = pydensecrf2 DenseCRF2D, 5 iterations")
    print(markdown_table(headers, rows))
    if "c" not in args.skip:
        print("\n(c) new = rwn.random_walk(symmetric=True, tol=1e-5); old = reference_walk (the formulation "
              "before issue 8.4); medians of alternating runs")
        print(markdown_table(["case", "new ms", "old ms", "old / new", "check"], bench_walk_old_new(args, devices)))


if __name__ == "__main__":
    main()
