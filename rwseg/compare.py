"""The main job: train the baseline and one or more methods on the built-in synthetic
dataset, evaluate them on its validation split, print a comparison table and write
picture panels.

    rwseg compare [--methods spn,dilated] [--workdir runs/main] [--steps N] [--smoke]
    python -m rwseg compare ...   (the same)

Each method trains with its shipped config :mod:`rwseg.configs` ``.<method>`` (or
``<config_dir>/<method>.py``; ``--steps`` overrides ``num_steps``; ``--smoke`` uses the
few-second configs) in
``WORKDIR/<method>`` through :func:`rwseg.train.train_and_evaluate` — so a second call
on the same workdir resumes or reuses finished runs. Outputs in WORKDIR:
``results.md`` / ``results.json`` (the table) and ``panels_<method>.png`` (image |
ground truth | baseline | method, the same validation images for every method).
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

__all__ = ["DEFAULT_METHODS", "check_methods", "run"]

DEFAULT_METHODS = ("spn",)


def check_methods(methods, config_dir=None) -> None:
    """Raise ``ValueError`` naming ``--methods`` unless every method has a config
    (shipped, or ``<config_dir>/<method>.py``)."""
    from rwseg import configs

    if config_dir is None:
        bad = [m for m in methods if m not in configs.NAMES]
        if bad:
            raise ValueError(f"--methods: expected names among {', '.join(configs.NAMES[1:])}, got {bad}")
        return
    missing = [str(pathlib.Path(config_dir) / f"{m}.py") for m in ["baseline", *methods]
               if not (pathlib.Path(config_dir) / f"{m}.py").is_file()]
    if missing:
        raise ValueError(f"--methods/--config_dir: no config file {', '.join(missing)}")


def _config(config_dir, method: str, steps: int | None, smoke: bool):
    from rwseg.train.config_files import load_config_file

    check_methods([method], config_dir)
    spec = method if config_dir is None else str(pathlib.Path(config_dir) / f"{method}.py")
    config = load_config_file(spec, "smoke" if smoke else None)
    if steps is not None:
        config.num_steps = int(steps)
        config.checkpoint_every = max(1, min(int(config.checkpoint_every), int(steps)))
    return config


def run(methods=DEFAULT_METHODS, *, workdir="runs/main", steps: int | None = None, smoke: bool = False,
        config_dir=None, progress: bool = True) -> dict:
    """Train + evaluate ``baseline`` and ``methods``; returns {method: metrics}.

    ``config_dir``: a folder of ``<method>.py`` config files (default: the shipped
    :mod:`rwseg.configs`)."""
    from rwseg.train.evaluate import markdown_table
    from rwseg.train.panels import save_panels
    from rwseg.train.trainer import train_and_evaluate

    workdir = pathlib.Path(workdir)
    names = ["baseline"] + [m for m in methods if m != "baseline"]
    results, panels, widths, num_classes = {}, {}, None, None
    for name in names:
        config = _config(config_dir, name, steps, smoke)
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
