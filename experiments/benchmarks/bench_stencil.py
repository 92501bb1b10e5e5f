"""Benchmark of the stencil operators (issues 2 and 8): ``apply`` and ``apply_transpose``.

For a 256x256 map with 21 channels (float32) and two stencils — the radius-5 disk
(RWN's test-time stencil, K = 80) and dilated rates {8, 16} (K = 16) — prints the
median time of ``rwseg.stencil.apply`` / ``apply_transpose`` under ``jit`` next to:

- the bytes-moved lower bound: the operator must read the weights (H·W·K) and the
  input (H·W·C) and write the output (H·W·C) once; divided by the memory bandwidth
  measured in the same run (a large numpy copy), this is the fastest it could run;
- scipy.sparse CSR sparse-times-dense (``M @ X`` and ``M.T @ X``) on the same operator,
  the usual CPU peer.

A second table (issue 8) times forward and forward + backward at 64x64x21 for the
144-offset GCRF window (``gcrf.bipartite_offsets(11)``) and the radius-5 disk, for
rwseg's operators (hand-written transposes) next to the previous implementation kept
below as :func:`autodiff_apply` / :func:`autodiff_apply_transpose` (a Python sum of K
shifted windows differentiated by plain autodiff). "fwd+bwd" is the output and the
pullback of a fixed output cotangent (``jax.vjp``), gradients w.r.t. weights and x;
"grad of sum" is ``jax.value_and_grad`` of ``sum(op(w, x) * cot)``. Forward and
backward are measured interleaved, so their ratio survives the drift of a shared machine.

A third table (issue 29) times the reverse mode of the operators for three loss shapes,
each as a ratio to the forward, measured interleaved: ``jax.vjp`` with a fixed output
cotangent (weights and x), a training-like loss (``value_and_grad`` of a log-softmax
cross-entropy after the operator, weights and x), and ``jax.grad`` of ``sum(op(w, x)**2)``
with respect to the weights alone and to x alone — once with rwseg's operators and once
with the operand materialisation of the weight correlation switched off (the lowering
before issue 29, in which XLA CPU fused the forward into the K products of the weight
gradient).

Usage: ``python experiments/benchmarks/bench_stencil.py [--size 256] [--channels 21] [--repeats 10]
[--grad-size 64] [--tables operators,grad,losses]``
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(__file__))
from common import fmt_ms, machine, markdown_table, median_time, median_times  # noqa: E402

from rwseg import gcrf  # noqa: E402
from rwseg import stencil as S  # noqa: E402


# --------------------------------------------------------------------------- the previous implementation


def autodiff_apply(weights, x, offsets):
    """rwseg.stencil.apply before issue 8: a sum of K shifted windows, plain autodiff.

    Its reverse mode pads a full map per offset and writes each weight cotangent into a
    zero (H, W, K) array; kept here as the baseline of the fwd/bwd table.
    """
    halo = S._halo(offsets)
    xp = S._pad(x, halo)
    y = jnp.zeros(x.shape, jnp.result_type(weights, x))
    for k, o in enumerate(offsets):
        y = y + weights[:, :, k, None] * S._window(xp, halo, x.shape[:2], o)
    return y


def autodiff_apply_transpose(weights, x, offsets):
    """rwseg.stencil.apply_transpose before issue 8 (plain autodiff)."""
    halo = S._halo(offsets)
    xp, wp = S._pad(x, halo), S._pad(weights, halo)
    y = jnp.zeros(x.shape, jnp.result_type(weights, x))
    for k, (dy, dx) in enumerate(offsets):
        src = (-dy, -dx)
        y = y + S._window(wp, halo, x.shape[:2], src)[:, :, k, None] * S._window(xp, halo, x.shape[:2], src)
    return y


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second of a large numpy copy (read + write counted)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    t = median_time(lambda: np.copyto(dst, src), repeats=repeats, warmup=1)
    return 2 * nbytes / t


def csr_matrix(weights: np.ndarray, offsets) -> sp.csr_matrix:
    h, w, _ = weights.shape
    ys, xs, ks = np.nonzero(S.valid_mask(h, w, offsets))
    dy = np.array([o[0] for o in offsets])[ks]
    dx = np.array([o[1] for o in offsets])[ks]
    return sp.csr_matrix((weights[ys, xs, ks], (ys * w + xs, (ys + dy) * w + xs + dx)), shape=(h * w, h * w))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--channels", type=int, default=21)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--grad-size", type=int, default=64, help="map size of the fwd/bwd tables (issues 8, 29)")
    p.add_argument("--tables", default="operators,grad,losses",
                   help="comma-separated tables to print: operators (vs scipy), grad (issue 8), losses (issue 29)")
    args = p.parse_args(argv)
    tables = set(args.tables.split(","))
    print(f"machine: {machine()}")
    if "operators" in tables:
        operator_table(args)
    if "grad" in tables:
        print(f"\n# forward vs forward + backward, {args.grad_size}x{args.grad_size}x{args.channels} float32, "
              f"median of {args.repeats}\n")
        print(markdown_table(GRAD_HEADERS, grad_rows(args.grad_size, args.channels, args.repeats)))
    if "losses" in tables:
        print(f"\n# reverse mode / forward for three loss shapes, {args.grad_size}x{args.grad_size}x{args.channels} "
              f"float32, median of {args.repeats}\n")
        print(markdown_table(LOSS_HEADERS, loss_rows(args.grad_size, args.channels, args.repeats)))


def operator_table(args):
    h = w = args.size
    c = args.channels
    bandwidth = copy_bandwidth()
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(h, w, c)).astype(np.float32)
    x = jnp.asarray(x_np)
    rows = []
    for name, offsets in [("disk r=5", S.disk_offsets(5)), ("dilated {8,16}", S.dilated_offsets([8, 16]))]:
        k = len(offsets)
        w_np = rng.uniform(size=(h, w, k)).astype(np.float32)
        weights = jnp.asarray(w_np)
        bound = 4 * (h * w * k + 2 * h * w * c) / bandwidth
        m = csr_matrix(w_np, offsets)
        mt = m.T.tocsr()
        x_flat = x_np.reshape(h * w, c)
        for op, fn, peer in [
            ("apply", jax.jit(lambda a, b, o=offsets: S.apply(a, b, o)), lambda: m @ x_flat),
            ("apply_transpose", jax.jit(lambda a, b, o=offsets: S.apply_transpose(a, b, o)), lambda: mt @ x_flat),
        ]:
            t = median_time(lambda: fn(weights, x).block_until_ready(), repeats=args.repeats)
            t_sp = median_time(peer, repeats=args.repeats, warmup=1)
            rows.append([name, k, op, fmt_ms(t), fmt_ms(bound), f"{bound / t:.0%}", fmt_ms(t_sp), f"{t_sp / t:.1f}x"])
    print(f"# stencil operators, {h}x{w}x{c} float32, median of {args.repeats}")
    print(f"machine: {machine()}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print(
        markdown_table(
            ["stencil", "K", "op", "rwseg ms", "bytes bound ms", "of bound", "scipy CSR ms", "scipy / rwseg"], rows
        )
    )


GRAD_HEADERS = ["stencil", "K", "op", "implementation", "fwd ms", "fwd+bwd ms", "ratio", "grad of sum ms", "ratio"]


def grad_rows(size, channels, repeats):
    """The issue-8 table: forward and forward + backward, new and previous implementation."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(size, size, channels)).astype(np.float32))
    cot = jnp.asarray(rng.normal(size=(size, size, channels)).astype(np.float32))
    rows = []
    for name, offsets in [("GCRF 23x23 window", gcrf.bipartite_offsets(11)), ("disk r=5", S.disk_offsets(5))]:
        k = len(offsets)
        weights = jnp.asarray(rng.uniform(size=(size, size, k)).astype(np.float32))
        for op, new, old in [
            ("apply", S.apply, autodiff_apply),
            ("apply_transpose", S.apply_transpose, autodiff_apply_transpose),
        ]:
            for impl, fn in [("rwseg (hand-written transposes)", new), ("previous (plain autodiff)", old)]:
                op_fn = lambda w, v, fn=fn, o=offsets: fn(w, v, o)
                fwd = jax.jit(op_fn)

                def fwd_bwd(w, v, g, op_fn=op_fn):
                    y, pullback = jax.vjp(op_fn, w, v)
                    return y, pullback(g)

                fb = jax.jit(fwd_bwd)
                gs = jax.jit(jax.value_and_grad(lambda w, v, op_fn=op_fn: jnp.sum(op_fn(w, v) * cot), argnums=(0, 1)))
                t_f, t_fb, t_gs = median_times(
                    [
                        lambda: fwd(weights, x).block_until_ready(),
                        lambda: jax.block_until_ready(fb(weights, x, cot)),
                        lambda: jax.block_until_ready(gs(weights, x)),
                    ],
                    repeats=repeats,
                )
                rows.append(
                    [name, k, op, impl, fmt_ms(t_f), fmt_ms(t_fb), f"{t_fb / t_f:.1f}x", fmt_ms(t_gs), f"{t_gs / t_f:.1f}x"]
                )
                print(f"done {name} {op} {impl}", file=sys.stderr, flush=True)
    return rows


LOSS_HEADERS = ["stencil", "K", "op", "lowering", "fwd ms", "vjp", "log-softmax loss", "grad sum(op**2) w",
                "grad sum(op**2) x"]


def loss_rows(size, channels, repeats):
    """The issue-29 table: reverse mode / forward for three loss shapes, with and without the
    materialised operands of the weight correlation (``rwseg.stencil._materialized``)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(size, size, channels)).astype(np.float32))
    cot = jnp.asarray(rng.normal(size=(size, size, channels)).astype(np.float32))
    labels = jax.nn.one_hot(rng.integers(0, channels, (size, size)), channels, dtype=jnp.float32)
    materialized = S._materialized
    rows = []
    for name, offsets in [("GCRF 23x23 window", gcrf.bipartite_offsets(11)), ("disk r=5", S.disk_offsets(5))]:
        k = len(offsets)
        weights = jnp.asarray(rng.uniform(size=(size, size, k)).astype(np.float32) / k)
        for op_name, op in [("apply", S.apply), ("apply_transpose", S.apply_transpose)]:
            for lowering, mat in [("rwseg", materialized), ("without materialisation", lambda *xs: xs)]:
                S._materialized = mat  # read when the kernel is traced: set before each jit's first call
                try:
                    f = lambda w, v, op=op, o=offsets: op(w, v, o)

                    def vjp(w, v, g, f=f):
                        y, pullback = jax.vjp(f, w, v)
                        return y, pullback(g)

                    fns = [jax.jit(f), jax.jit(vjp),
                           jax.jit(jax.value_and_grad(
                               lambda w, v, f=f: -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(f(w, v), -1), -1)),
                               argnums=(0, 1))),
                           jax.jit(jax.grad(lambda w, v, f=f: jnp.sum(f(w, v) ** 2), argnums=0)),
                           jax.jit(jax.grad(lambda w, v, f=f: jnp.sum(f(w, v) ** 2), argnums=1))]
                    args = [(weights, x), (weights, x, cot), (weights, x), (weights, x), (weights, x)]
                    for fn, a in zip(fns, args):
                        jax.block_until_ready(fn(*a))  # compile with this lowering
                finally:
                    S._materialized = materialized
                times = median_times([lambda fn=fn, a=a: jax.block_until_ready(fn(*a)) for fn, a in zip(fns, args)],
                                     repeats=repeats)
                rows.append([name, k, op_name, lowering, fmt_ms(times[0])] + [f"{t / times[0]:.1f}x" for t in times[1:]])
                print(f"done {name} {op_name} {lowering}", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
