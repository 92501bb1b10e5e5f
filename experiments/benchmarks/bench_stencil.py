"""Benchmark of the stencil operators (issue 2): ``apply`` and ``apply_transpose``.

For a 256x256 map with 21 channels (float32) and two stencils — the radius-5 disk
(RWN's test-time stencil, K = 80) and dilated rates {8, 16} (K = 16) — prints the
median time of ``rwseg.stencil.apply`` / ``apply_transpose`` under ``jit`` next to:

- the bytes-moved lower bound: the operator must read the weights (H·W·K) and the
  input (H·W·C) and write the output (H·W·C) once; divided by the memory bandwidth
  measured in the same run (a large numpy copy), this is the fastest it could run;
- scipy.sparse CSR sparse-times-dense (``M @ X`` and ``M.T @ X``) on the same operator,
  the usual CPU peer.

Usage: ``python experiments/benchmarks/bench_stencil.py [--size 256] [--channels 21] [--repeats 10]``
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
from common import fmt_ms, machine, markdown_table, median_time  # noqa: E402

from rwseg import stencil as S  # noqa: E402


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
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    main()
