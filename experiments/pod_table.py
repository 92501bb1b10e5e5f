"""The README's pod table: every method's train step at the papers' scale, compiled for TPU pods.

    PYTHONPATH=. python experiments/pod_table.py            # the full grid (resumes from --out)
    PYTHONPATH=. python experiments/pod_table.py --methods baseline --topologies v5e:2x2 --crop 64

For every method x topology x compute dtype it compiles the real train step of
``rwseg.configs.<method>`` (default sections, ``--crop`` crops, ``--batch`` global batch)
for the topology's compile-only devices with :func:`rwseg.train.plan.plan_config` (libtpu:
``pip install 'rwseg[tpu]'``) and records: fits or not, peak and temporary memory per chip,
FLOPs per step (per chip x chips; loop bodies counted once), collective bytes per step
(per chip) and whether a collective sits in a loop. A row that does not fit gets the first
setting that does (:func:`rwseg.train.plan.suggest_fit`, ``--max_tries`` more compiles).

Each finished row is appended to ``--out`` (JSON lines) at once, so an interrupted run
resumes where it stopped; the markdown table is printed at the end from every row there
(``--table_only`` prints it without compiling). Compiles take about 1-2 minutes each on
a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the local backend only traces
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from rwseg import configs  # noqa: E402
from rwseg.train import plan as P  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "pod_table.jsonl"


def _key(row) -> tuple:
    return (row["method"], row["topology"], row["compute_dtype"], row["crop"], row["batch"])


def run_row(method: str, topology: str, dtype: str, *, crop: int, batch: int, mesh, max_tries: int) -> dict:
    config = configs.get_config(method)
    config.compute_dtype = dtype
    chips = int(mesh.devices.size)
    if batch % chips:
        raise SystemExit(f"--batch: expected a multiple of the {chips} chips of {topology}, got {batch}")
    start = time.perf_counter()
    plan = P.plan_config(config, topology, batch_per_chip=batch // chips, crop=crop, steps=("train",), mesh=mesh)
    step = plan.step("train")
    row = {"method": method, "topology": topology, "chips": chips, "compute_dtype": dtype, "crop": crop,
           "batch": batch, "fits": step.fits, "peak_gib": step.peak_bytes / P.GIB, "temp_gib": step.temp_bytes / P.GIB,
           "hbm_gib": step.hbm_bytes / P.GIB, "gflop_per_step": step.flops * chips / 1e9,
           "collective_mib": step.collective_bytes / (1 << 20), "collectives": step.collective_count,
           "collectives_in_loops": len(step.collectives_in_loops), "while_loops": step.while_loops,
           "kernel": step.kernel, "error": step.error, "compile_s": step.compile_seconds, "fix": ""}
    if not step.fits and max_tries:
        flags, fitting, tried = P.suggest_fit(config, topology, batch_per_chip=batch // chips, crop=crop,
                                              max_tries=max_tries, mesh=mesh)
        row["fix"] = flags if fitting is not None else "none of: " + "; ".join(tried)
        if fitting is not None:
            row["fix_peak_gib"] = fitting.step("train").peak_bytes / P.GIB
    row["seconds"] = time.perf_counter() - start
    return row


def markdown(rows) -> str:
    lines = ["| method | topology | dtype | fits | peak / chip | temp / chip | TFLOP / step | collectives / step "
             "(per chip) | in loops | fits with |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (configs.NAMES.index(r["method"]), r["topology"], r["compute_dtype"])):
        peak = f"{r['peak_gib']:.2f} GiB" if not r["error"] else f"> {r['hbm_gib']:.0f} GiB"
        temp = f"{r['temp_gib']:.2f} GiB" + (" (compiler)" if r["error"] else "")
        flop = f"{r['gflop_per_step'] / 1e3:.1f}" if not r["error"] else "-"
        coll = f"{r['collectives']} ({r['collective_mib']:.1f} MiB)" if not r["error"] else "-"
        loops = str(r["collectives_in_loops"]) if not r["error"] else "-"
        fix = r.get("fix", "") or ("-" if r["fits"] else "not searched")
        if r.get("fix_peak_gib"):
            fix += f" ({r['fix_peak_gib']:.2f} GiB)"
        lines.append(f"| {r['method']} | {r['topology']} ({r['chips']}) | {r['compute_dtype']} | "
                     f"{'yes' if r['fits'] else '**no**'} | {peak} | {temp} | {flop} | {coll} | {loops} | {fix} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(configs.NAMES))
    parser.add_argument("--topologies", default="v5e:16x16,v4:4x4x8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--max_tries", type=int, default=3, help="settings compiled for a row that does not fit")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--table_only", action="store_true")
    args = parser.parse_args(argv)
    done = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[_key(row)] = row
    if not args.table_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for topology in args.topologies.split(","):
            mesh = P.topology_mesh(topology)
            for method in args.methods.split(","):
                for dtype in args.dtypes.split(","):
                    if (method, topology, dtype, args.crop, args.batch) in done:
                        continue
                    row = run_row(method, topology, dtype, crop=args.crop, batch=args.batch, mesh=mesh,
                                  max_tries=args.max_tries)
                    done[_key(row)] = row
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{method} {topology} {dtype}: fits={row['fits']} peak={row['peak_gib']:.2f} GiB "
                          f"({row['seconds']:.0f} s)", flush=True)
    rows = [r for r in done.values() if r["crop"] == args.crop and r["batch"] == args.batch]
    print(f"\ncrop {args.crop}, global batch {args.batch}, train step, default configs:\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
