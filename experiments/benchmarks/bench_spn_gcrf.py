"""Benchmark of SPN propagation and GMF inference (issue 4), rwseg against its peers.

Prints one markdown table measured in one run (medians over repeats, float32):

- SPN, three-way gates, four directions merged by max (``rwseg.spn.spn`` under ``jit``),
  forward and forward + backward (gradients w.r.t. x and all gates), at 64x64x32 (the
  paper's hidden layer: seed 002 reports 1.3 ms on its GPU) and 256x256x16; peers: the
  implementation before issue 8 (:func:`reference_spn`, kept in this script: per-direction
  scans differentiated by plain autodiff; a second table prints old vs new and the
  fwd+bwd / fwd ratios), the same recurrence in PyTorch on CPU (eager loop over columns,
  the four directions batched like rwseg does), and optionally ``torch.compile`` of it
  (``--torch-compile``; ~140 s of compilation per shape, so off by default).
- GMF, 5 layers on the paper's 23x23 bipartite window (144 offsets), 64x64x21 (1/8 of
  a 505x505 image), forward and forward + backward (w.r.t. unary, similarity, compat:
  the output and the pullback of a fixed cotangent, ``jax.vjp``), measured interleaved;
  the ratio column is fwd+bwd / fwd. Next to it, the previous GMF (before issue 8: the
  pull computed on the whole map and masked to one parity, through a plain-autodiff
  stencil), kept below as :func:`previous_gmf`. Peer: ``pydensecrf2`` (DenseCRF2D,
  Gaussian + bilateral kernels, 5 iterations) on the same scores — a different CRF
  (dense, permutohedral filtering), compared as the usual CRF post-processing cost at
  the same size.

When jax sees a GPU, a GPU column is added for rwseg, and an SPN GPU section times the
scan against the Pallas kernel at 64x64x32 and 1024x1024x8, batch 16 (the published CUDA
line-scan kernel GSPN-1: 71.4 ms on an A100), with the forward's fraction of peak memory
bandwidth (bytes counted per direction: x, 3 gates, output). Missing peers print
"n/a (not installed)".

Usage: ``python experiments/benchmarks/bench_spn_gcrf.py [--repeats 10] [--torch-compile]``
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_stencil import autodiff_apply  # noqa: E402
from common import block, fmt_ms, gpu_device, machine, markdown_table, median_time, median_times  # noqa: E402

from rwseg import gcrf, spn, stencil  # noqa: E402

try:
    import torch
except ImportError:  # optional peer
    torch = None
try:
    import pydensecrf.densecrf as dcrf
except ImportError:  # optional peer
    dcrf = None

NA = "n/a (not installed)"


# --------------------------------------------------------------------------- SPN inputs


def spn_inputs(shape, batch=None, seed=0):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    x = rng.normal(size=lead + shape).astype(np.float32)
    gates = rng.normal(scale=0.5, size=lead + (4,) + shape + (3,)).astype(np.float32)
    gates = np.asarray(spn.stabilize(gates))
    cot = rng.normal(size=x.shape).astype(np.float32)
    return x, gates, cot


def reference_spn(x, gates):
    """rwseg.spn.spn as it was before issue 8 (2026-11-21), kept here as the "old" figure.

    Per direction: flip/transpose to left-to-right, one ``lax.scan`` over columns whose
    body masks the gates, stacks the three neighbours and sums; the directions with the
    same canonical shape vmapped together; differentiated by plain autodiff (the scan
    stores its per-step intermediates). x (H, W, C), gates (4, H, W, C, 3) -> (H, W, C).
    """

    def canonical(a, d):
        if d in ("top_to_bottom", "bottom_to_top"):
            a = jnp.swapaxes(a, 0, 1)
        return jnp.flip(a, axis=1) if d in ("right_to_left", "bottom_to_top") else a

    def from_canonical(a, d):
        a = jnp.flip(a, axis=1) if d in ("right_to_left", "bottom_to_top") else a
        return jnp.swapaxes(a, 0, 1) if d in ("top_to_bottom", "bottom_to_top") else a

    def scan(x, p):
        rows = x.shape[0]
        valid = np.ones((rows, 1, 3), bool)
        valid[0, :, 0] = valid[-1, :, 2] = False

        def neighbours(h):
            z = jnp.zeros_like(h[:1])
            return jnp.stack([jnp.concatenate([z, h[:-1]]), h, jnp.concatenate([h[1:], z])], axis=-1)

        def step(h_prev, column):
            x_t, p_t = column
            p_t = jnp.where(valid, p_t, 0)
            h_t = (1 - jnp.sum(p_t, axis=-1)) * x_t + jnp.sum(p_t * neighbours(h_prev), axis=-1)
            return h_t, h_t

        _, hs = jax.lax.scan(step, x[:, 0], (jnp.swapaxes(x[:, 1:], 0, 1), jnp.swapaxes(p[:, 1:], 0, 1)))
        return jnp.concatenate([x[:, :1], jnp.swapaxes(hs, 0, 1)], axis=1)

    canon = [(canonical(x, d), canonical(gates[i], d)) for i, d in enumerate(spn.DIRECTIONS)]
    groups = {}
    for i, (xc, _) in enumerate(canon):
        groups.setdefault(xc.shape, []).append(i)
    outs = [None] * 4
    for idx in groups.values():
        hs = jax.vmap(scan)(jnp.stack([canon[i][0] for i in idx]), jnp.stack([canon[i][1] for i in idx]))
        for j, i in enumerate(idx):
            outs[i] = from_canonical(hs[j], spn.DIRECTIONS[i])
    return jnp.max(jnp.stack(outs), axis=0)


SPN_VARIANTS = {
    "old": reference_spn,  # before issue 8: plain autodiff through per-direction scans
    "scan": functools.partial(spn.spn, implementation="scan"),
    "pallas": functools.partial(spn.spn, implementation="pallas"),
}


def jax_spn_fns(batch, variant="scan"):
    layer = SPN_VARIANTS[variant]
    layer = layer if batch is None else jax.vmap(layer)
    fwd = jax.jit(layer)

    def loss(x, g, cot):
        return jnp.sum(layer(x, g) * cot)

    bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return fwd, bwd


def time_jax_spn(shape, device, repeats, batch=None, variant="scan"):
    """Median (forward, forward + backward) seconds of one SPN variant on ``device``."""
    x, g, cot = (jax.device_put(a, device) for a in spn_inputs(shape, batch))
    fwd, bwd = jax_spn_fns(batch, variant)
    t_f = median_time(lambda: block(fwd(x, g)), repeats=repeats)
    t_b = median_time(lambda: block(bwd(x, g, cot)), repeats=repeats)
    return t_f, t_b


def check_spn_variants(shape=(9, 7, 3)):
    """The old reference and the new scan agree (values and gradients) before timing."""
    x, g, cot = spn_inputs(shape)
    outs = {v: jax_spn_fns(None, v)[1](x, g, cot) for v in ("old", "scan")}
    for a, b in zip(jax.tree.leaves(outs["old"]), jax.tree.leaves(outs["scan"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def spn_bytes(shape, batch=1):
    """Bytes that must move per SPN layer, counted per direction: x, 3 gates, output (float32)."""
    h, w, c = shape
    return 4 * batch * h * w * c * (1 + 3 + 1) * 4


PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM figures


def peak_bandwidth(device):
    for name, bw in PEAK_BANDWIDTH.items():
        if name in device.device_kind:
            return name, bw
    return "H100 (assumed)", PEAK_BANDWIDTH["H100"]


def spn_gpu_section(gpu, repeats):
    """Scan vs Pallas on the GPU: markdown lines (the Pallas path may not lower there)."""
    name, bw = peak_bandwidth(gpu)
    lines = [f"SPN on GPU ({gpu.device_kind}; peak bandwidth {name} {bw / 1e12:.2f} TB/s; "
             "published CUDA line scan GSPN-1 at 1024x1024x8 batch 16: 71.4 ms on an A100)", "",
             "| case | implementation | fwd ms | fwd+bwd ms | fwd+bwd / fwd | fwd fraction of peak bandwidth |",
             "|---|---|---|---|---|---|"]
    for shape, batch in [((64, 64, 32), None), ((1024, 1024, 8), 16)]:
        case = f"{shape[0]}x{shape[1]}x{shape[2]}" + ("" if batch is None else f", batch {batch}")
        for variant in ("scan", "pallas"):
            try:
                t_f, t_b = time_jax_spn(shape, gpu, repeats, batch, variant)
            except Exception as e:  # noqa: BLE001 - report why a variant cannot run here
                lines.append(f"| {case} | {variant} | n/a ({type(e).__name__}: {str(e)[:80]}) | | | |")
                continue
            frac = spn_bytes(shape, batch or 1) / t_f / bw
            lines.append(f"| {case} | {variant} | {fmt_ms(t_f)} | {fmt_ms(t_b)} | {t_b / t_f:.2f}x | {frac:.2%} |")
    return lines


# --------------------------------------------------------------------------- SPN in PyTorch


def torch_spn(x, gates):
    """Same recurrence as rwseg.spn.spn, PyTorch, x (H, W, C), gates (4, H, W, C, 3).

    Each direction is mapped to left-to-right (flip / transpose), the directions with
    the same canonical shape run in one loop over columns, outputs are mapped back and
    merged by max. Gates pointing outside the image are zeroed first.
    """
    canon = []
    for d, name in enumerate(spn.DIRECTIONS):
        xd, gd = x, gates[d]
        if name in ("top_to_bottom", "bottom_to_top"):
            xd, gd = xd.transpose(0, 1), gd.transpose(0, 1)
        if name in ("right_to_left", "bottom_to_top"):
            xd, gd = xd.flip(1), gd.flip(1)
        canon.append((xd, gd))
    outs = [None] * 4
    groups = {}
    for i, (xd, _) in enumerate(canon):
        groups.setdefault(tuple(xd.shape), []).append(i)
    for idx in groups.values():
        xs = torch.stack([canon[i][0] for i in idx])  # (B, H, W, C)
        gs = torch.stack([canon[i][1] for i in idx])  # (B, H, W, C, 3)
        mask = torch.ones_like(gs[0, :, 0, 0, :])  # (H, 3): row above / below exist
        mask[0, 0] = 0
        mask[-1, 2] = 0
        gs = gs * mask[None, :, None, None, :]
        h_prev = xs[:, :, 0]
        cols = [h_prev]
        zero = torch.zeros_like(h_prev[:, :1])
        for t in range(1, xs.shape[2]):
            p = gs[:, :, t]  # (B, H, C, 3)
            up = torch.cat([zero, h_prev[:, :-1]], dim=1)
            down = torch.cat([h_prev[:, 1:], zero], dim=1)
            h_prev = (1 - p.sum(-1)) * xs[:, :, t] + p[..., 0] * up + p[..., 1] * h_prev + p[..., 2] * down
            cols.append(h_prev)
        hs = torch.stack(cols, dim=2)
        for j, i in enumerate(idx):
            name, hd = spn.DIRECTIONS[i], hs[j]
            if name in ("right_to_left", "bottom_to_top"):
                hd = hd.flip(1)
            if name in ("top_to_bottom", "bottom_to_top"):
                hd = hd.transpose(0, 1)
            outs[i] = hd
    return torch.stack(outs).amax(0)


def time_torch_spn(shape, repeats, compiled=False):
    x, g, cot = (torch.from_numpy(a.copy()) for a in spn_inputs(shape))
    fn = torch.compile(torch_spn) if compiled else torch_spn
    # correctness against rwseg before timing
    ref = np.asarray(jax.jit(spn.spn)(x.numpy(), g.numpy()))
    np.testing.assert_allclose(fn(x, g).numpy(), ref, rtol=1e-4, atol=1e-4)

    def fwd():
        with torch.no_grad():
            fn(x, g)

    xg, gg = x.clone().requires_grad_(), g.clone().requires_grad_()

    def bwd():
        xg.grad = gg.grad = None
        (fn(xg, gg) * cot).sum().backward()

    # the eager peer is slow: fewer repeats, one warm-up (no compilation to absorb)
    reps, warm = (repeats, 2) if compiled else (max(1, min(repeats, 3)), 1)
    return median_time(fwd, repeats=reps, warmup=warm), median_time(bwd, repeats=reps, warmup=warm)


# --------------------------------------------------------------------------- GMF


def gmf_inputs(shape=(64, 64, 21), radius=11, seed=0):
    rng = np.random.default_rng(seed)
    h, w, k = shape
    offsets = gcrf.bipartite_offsets(radius)
    logits = rng.normal(scale=2.0, size=shape).astype(np.float32)
    scores = np.asarray(jax.nn.softmax(logits, axis=-1))
    z = rng.normal(size=(h, w, 8)).astype(np.float32)
    filters = rng.normal(scale=0.3, size=(8, k)).astype(np.float32)
    sim = np.asarray(gcrf.pairwise_similarity(z, filters, offsets))
    compat = np.asarray(gcrf.compatibility(np.eye(k, dtype=np.float32) * 0.3))
    return scores, sim, compat, offsets


def previous_gmf(unary, similarity, compat, offsets, num_layers):
    """rwseg.gcrf.gmf(num_layers=n) before issue 8, the baseline of the GMF rows.

    Each half-update computes the pull ``C sum_j s_ij mu_j`` on the whole map and keeps
    the columns of one parity; the stencil product is differentiated by plain autodiff
    (bench_stencil.autodiff_apply).
    """
    deg = stencil.degree(similarity, offsets)
    inverse = jnp.linalg.inv(jnp.eye(compat.shape[0], dtype=compat.dtype) + deg[..., None, None] * compat)
    parity = [(np.arange(unary.shape[1]) % 2 == p)[None, :, None] for p in (0, 1)]

    def layer(mu, _):
        for columns in parity:
            pull = autodiff_apply(similarity, mu, offsets) @ compat.T
            mu = jnp.where(columns, jnp.einsum("hwkl,hwl->hwk", inverse, unary + pull), mu)
        return mu, None

    return jax.lax.scan(layer, unary, None, length=num_layers)[0]


GMF_IMPLS = {
    "rwseg": lambda u, s, c, o, n: gcrf.gmf(u, s, c, o, num_steps=n),
    "previous": previous_gmf,
}


def time_jax_gmf(device, repeats, layers=5, impl="rwseg"):
    """Forward and forward + backward (output and pullback of a fixed cotangent), interleaved."""
    scores, sim, compat, offsets = gmf_inputs()
    u, s, c = (jax.device_put(a, device) for a in (scores, sim, compat))
    run = GMF_IMPLS[impl]
    fwd = jax.jit(lambda u, s, c: run(u, s, c, offsets, layers))
    cot = jax.device_put(np.random.default_rng(1).normal(size=scores.shape).astype(np.float32), device)

    def fwd_bwd(u, s, c, cot):
        y, pullback = jax.vjp(lambda u, s, c: run(u, s, c, offsets, layers), u, s, c)
        return y, pullback(cot)

    bwd = jax.jit(fwd_bwd)
    return tuple(median_times([lambda: block(fwd(u, s, c)), lambda: block(bwd(u, s, c, cot))], repeats=repeats))


def time_densecrf(repeats, iterations=5):
    scores, _, _, _ = gmf_inputs()
    h, w, k = scores.shape
    unary = np.ascontiguousarray(-np.log(np.clip(scores, 1e-8, 1)).transpose(2, 0, 1).reshape(k, -1))
    image = np.ascontiguousarray(np.random.default_rng(2).integers(0, 255, size=(h, w, 3)).astype(np.uint8))

    def run():
        d = dcrf.DenseCRF2D(w, h, k)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
        d.inference(iterations)

    return median_time(run, repeats=repeats)


# --------------------------------------------------------------------------- main


def ratio(peer, ours):
    return "n/a" if peer is None or ours is None else f"{peer / ours:.2f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--torch-compile", action="store_true",
                   help="also time torch.compile of the PyTorch SPN (~140 s compilation per shape)")
    args = p.parse_args(argv)
    cpu = jax.devices("cpu")[0]
    gpu = gpu_device()
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)

    headers = ["case", "pass", "rwseg CPU ms", "peer", "peer ms", "peer / rwseg"]
    if gpu is not None:
        headers.insert(3, "rwseg GPU ms")
    rows = []

    def add(case, kind, ours, peer_name, peer_t, ours_gpu=None):
        row = [case, kind, fmt_ms(ours), peer_name, fmt_ms(peer_t) if peer_t is not None else "n/a", ratio(peer_t, ours)]
        if gpu is not None:
            row.insert(3, fmt_ms(ours_gpu))
        rows.append(row)

    check_spn_variants()
    spn_lines = ["SPN before and after issue 8 (CPU, measured side by side in this run; old = plain-autodiff "
                 "per-direction scans, new = rwseg.spn.spn, stacked scan + adjoint recurrence)", "",
                 "| case | old fwd ms | new fwd ms | fwd speed-up | old fwd+bwd ms | new fwd+bwd ms | "
                 "old fwd+bwd / fwd | new fwd+bwd / fwd |", "|---|---|---|---|---|---|---|---|"]
    for shape in [(64, 64, 32), (256, 256, 16)]:
        case = f"SPN 3-way x4 dirs {shape[0]}x{shape[1]}x{shape[2]}"
        f_old, b_old = time_jax_spn(shape, cpu, args.repeats, variant="old")
        f_cpu, b_cpu = time_jax_spn(shape, cpu, args.repeats)
        spn_lines.append(f"| {case} | {fmt_ms(f_old)} | {fmt_ms(f_cpu)} | {f_old / f_cpu:.2f}x | {fmt_ms(b_old)} | "
                         f"{fmt_ms(b_cpu)} | {b_old / f_old:.2f}x | {b_cpu / f_cpu:.2f}x |")
        f_gpu = b_gpu = None
        if gpu is not None:
            f_gpu, b_gpu = time_jax_spn(shape, gpu, args.repeats)
        add(case, "fwd", f_cpu, "rwseg before issue 8 (CPU)", f_old, f_gpu)
        add(case, "fwd+bwd", b_cpu, "rwseg before issue 8 (CPU)", b_old, b_gpu)
        peers = [("torch eager", False)] + ([("torch.compile", True)] if args.torch_compile else [])
        for name, compiled in peers:
            if torch is None:
                add(case, "fwd", f_cpu, name + " " + NA, None, f_gpu)
                add(case, "fwd+bwd", b_cpu, name + " " + NA, None, b_gpu)
                continue
            tf, tb = time_torch_spn(shape, args.repeats, compiled)
            add(case, "fwd", f_cpu, name + " (CPU)", tf, f_gpu)
            add(case, "fwd+bwd", b_cpu, name + " (CPU)", tb, b_gpu)
        print(f"done {case}", file=sys.stderr, flush=True)
    if gpu is not None:
        spn_lines += [""] + spn_gpu_section(gpu, args.repeats)

    case = "GMF 5 layers, 23x23 window (144 offsets), 64x64x21"
    times = {}
    for impl in GMF_IMPLS:
        times[impl] = time_jax_gmf(cpu, args.repeats, impl=impl)
        if gpu is not None:
            times[impl] += time_jax_gmf(gpu, args.repeats, impl=impl)
        print(f"done GMF {impl}", file=sys.stderr, flush=True)
    t_crf = time_densecrf(args.repeats) if dcrf is not None else None
    peer = "pydensecrf2 DenseCRF2D, 5 it. (CPU)" if dcrf is not None else "pydensecrf2 " + NA
    f_cpu, b_cpu, *gpu_t = times["rwseg"] + (None, None)
    f_old, b_old = times["previous"][:2]
    previous = "previous rwseg GMF (CPU)"
    add(case, "fwd", f_cpu, peer, t_crf, gpu_t[0])
    add(case, "fwd", f_cpu, previous, f_old, gpu_t[0])
    add(case, "fwd+bwd", b_cpu, previous, b_old, gpu_t[1])
    gmf_ratios = (
        f"GMF fwd+bwd / fwd: rwseg {b_cpu / f_cpu:.1f}x, previous {b_old / f_old:.1f}x (CPU, "
        f"measured interleaved); fwd rwseg / previous {f_cpu / f_old:.2f}"
    )

    print(f"Machine: {machine()}")
    print(f"torch: {torch.__version__ if torch else NA}; torch threads: {torch.get_num_threads() if torch else '-'}; "
          f"pydensecrf2: {'installed' if dcrf else NA}; repeats: {args.repeats}; float32")
    if gpu is None:
        print("No GPU visible to jax: GPU columns and the SPN GPU section (scan vs Pallas, 1024x1024x8 batch 16) "
              "are skipped.")
    if not args.torch_compile:
        print("torch.compile peer skipped (pass --torch-compile; ~140 s compilation per shape).")
    print(gmf_ratios)
    print()
    print(markdown_table(headers, rows))
    print()
    print("\n".join(spn_lines))


if __name__ == "__main__":
    main()
