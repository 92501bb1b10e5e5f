"""The main job: train the baseline and one or more methods on the built-in synthetic
dataset, evaluate them on its validation split, print a comparison table and write
picture panels.

    python -m rwseg.compare [--methods spn,dilated] [--workdir runs/main] [--steps N]

Each method trains with its config from ``experiments/configs/<method>.py`` (``--steps``
overrides ``num_steps``; ``--smoke`` uses the few-second configs) in
``WORKDIR/<method>`` through :func:`rwseg.train.train_and_evaluate` — so a second call
on the same workdir resumes or reuses finished runs. Outputs in WORKDIR:
``results.md`` / ``results.json`` (the table) and ``panels_<method>.png`` (image |
ground truth | baseline | method, the same validation images for every method).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

__all__ = ["DEFAULT_METHODS", "run", "main"]

DEFAULT_METHODS = ("spn",)
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _config(config_dir: pathlib.Path, method: str, steps: int | None, smoke: bool):
    from rwseg.train.config_files import load_config_file

    path = config_dir / f"{method}.py"
    if not path.exists():
        raise FileNotFoundError(f"--methods: no config {path} for method {method!r}")
    config = load_config_file(str(path), "smoke" if smoke else None)
    if steps is not None:
        config.num_steps = int(steps)
        config.checkpoint_every = max(1, min(int(config.checkpoint_every), int(steps)))
    return config


def run(methods=DEFAULT_METHODS, *, workdir="runs/main", steps: int | None = None, smoke: bool = False,
        config_dir=CONFIG_DIR, progress: bool = True) -> dict:
    """Train + evaluate ``baseline`` and ``methods``; returns {method: metrics}."""
    from rwseg.train.evaluate import markdown_table
    from rwseg.train.panels import save_panels
    from rwseg.train.trainer import train_and_evaluate

    workdir = pathlib.Path(workdir)
    names = ["baseline"] + [m for m in methods if m != "baseline"]
    results, panels, widths, num_classes = {}, {}, None, None
    for name in names:
        config = _config(pathlib.Path(config_dir), name, steps, smoke)
        config.progress = progress and config.progress
        widths = config.trimap_widths
        t0 = time.perf_counter()
        print(f"== {name}: {config.num_steps} steps -> {workdir / name}", flush=True)
        result = train_and_evaluate(config, workdir / name)
        result["seconds"] = time.perf_counter() - t0
        results[name] = result
        npz = workdir / name / "eval" / "panels.npz"
        if npz.exists():
            panels[name] = dict(np.load(npz))
        from rwseg import data

        num_classes = data.dataset_info(config.data.name).num_classes
    table = markdown_table(list(results.items()), widths)
    (workdir / "results.md").write_text(table)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    written = []
    if "baseline" in panels:
        base = panels["baseline"]
        for name in names[1:]:
            if name in panels:
                cols = {"ground truth": base["labels"], "baseline": base["pred"], name: panels[name]["pred"]}
                written.append(save_panels(workdir / f"panels_{name}.png", base["images"], cols, num_classes))
    print("\n" + table)
    for name, r in results.items():
        print(f"{name}: trained + evaluated in {r['seconds']:.0f} s (step {r.get('step')})")
    print(f"table: {workdir / 'results.md'}")
    for path in written:
        print(f"panels (image | ground truth | baseline | method): {path}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwseg.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods among rwn, rawks, spn, gcrf, dilated (default: %(default)s)")
    parser.add_argument("--workdir", default="runs/main")
    parser.add_argument("--steps", type=int, default=None, help="training steps per method (default: each config's)")
    parser.add_argument("--smoke", action="store_true", help="few-second configs (tiny model, 32x32 images)")
    parser.add_argument("--config_dir", default=str(CONFIG_DIR))
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    run(methods, workdir=args.workdir, steps=args.steps, smoke=args.smoke, config_dir=args.config_dir,
        progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
