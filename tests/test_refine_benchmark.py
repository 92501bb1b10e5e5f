"""The refinement benchmark driver (experiments.refine_benchmark) end to end on the smoke configs:
control + one method from one base checkpoint, one seed (seed pairing: tests/test_bootstrap.py), table, panels, resumability, and
per-image counts that add up to the evaluation's totals."""

import json
import pathlib

import numpy as np
import pytest

from rwseg import data
from experiments.refine_benchmark import base_of, parse_base, run, run_config
from rwseg.train import parallel
from rwseg.train.evaluate import evaluate, load_run
from rwseg.train.state import source_kwargs
from rwseg.train.trainer import train_and_evaluate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
REFINE = CONFIGS / "stanford_refine.py"


@pytest.mark.slow
def test_refine_benchmark_smoke(tmp_path):
    from rwseg.train.config_files import load_config_file

    base = tmp_path / "base"
    c = load_config_file("baseline", "smoke")
    c.num_steps, c.eval_at_end = 3, False
    train_and_evaluate(c, base)

    out = tmp_path / "refine"
    summary = run(base, steps=2, out=out, seeds=(1,), methods=("dilated",), config=REFINE, smoke=True,
                  num_panels=2,
                  num_samples=100)
    assert set(summary["methods"]) == {"baseline", "dilated"} and summary["seeds"] == 1
    row = summary["methods"]["dilated"]
    assert len(row["mean_iou"]["per_seed"]) == 1
    d = row["mean_iou"]["diff"]
    assert d["low"] <= d["diff"] <= d["high"]
    table = (out / "results.md").read_text()
    assert "control (baseline)" in table and "| dilated |" in table and "Δ mIoU" in table
    assert (out / "panels.png").exists() and json.loads((out / "results.json").read_text())["steps"] == 2

    # the configs are the protocol's: same seed -> same data stream, init_from = base
    cfg = run_config(CONFIGS / "stanford_refine.py", "dilated", base=base, steps=2, seed=1, smoke=True)
    assert (cfg.init_from, cfg.num_steps, cfg.seed) == (str(base), 2, 1)

    # per-image counts add up to what the trainer's evaluation sums
    per_image = np.load(out / "seed1" / "dilated" / "eval" / "per_image.npz")
    mesh = parallel.make_mesh()
    config, setup, state, step = load_run(out / "seed1" / "dilated", mesh, checkpoint="latest")
    assert step == 2 == int(per_image["step"])
    config.eval_batches = 0
    source = data.load_source(config.data.name, config.data.eval_split, **source_kwargs(config))
    result, _ = evaluate(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes)
    seed1 = row["mean_iou"]["per_seed"][0]
    assert seed1 == pytest.approx(result["mean_iou"], abs=1e-6)
    assert row["boundary_fscore"]["per_seed"][0] == pytest.approx(result["boundary_fscore"], abs=1e-6)
    assert per_image["confusion"].shape[0] == len(source)

    # a second call trains nothing and reuses the cached evaluations
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/metrics.jsonl")}
    cached = {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/eval/per_image.npz")}
    again = run(base, steps=2, out=out, seeds=(1,), methods=("dilated",), config=REFINE, smoke=True,
                num_panels=2,
                num_samples=100)
    assert again["methods"]["dilated"]["mean_iou"]["mean"] == row["mean_iou"]["mean"]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps} and len(stamps) == 2
    assert cached == {p: p.stat().st_mtime_ns for p in cached} and len(cached) == 2

    _check_densecrf_rows(base, out, setup.num_classes)


def _check_densecrf_rows(base, out, num_classes):
    """--densecrf dev on the same runs: parameters chosen on the dev split, a densecrf row (the
    control post-processed) and a dilated+densecrf row, each compared with the control and with
    DenseCRF; the first image's post-processed counts equal DenseCRF run on that image alone."""
    pytest.importorskip("pydensecrf.densecrf")
    from experiments import densecrf
    from rwseg import metrics
    from experiments.refine_benchmark import scores_to_probs

    summary = run(base, steps=2, out=out, seeds=(1,), methods=("dilated",), config=REFINE, smoke=True, num_panels=2,
                  num_samples=100, train=False, densecrf="dev")
    assert list(summary["methods"]) == ["baseline", "densecrf", "dilated", "dilated+densecrf"]
    tuned = json.loads((out / "densecrf_dev.json").read_text())
    assert len(tuned["grid"]) == len(densecrf.GRID) and tuned["split"] == "validation"
    best = max(range(len(tuned["grid"])), key=lambda i: tuned["grid"][i]["mean_iou"])
    assert tuned["chosen"] == best and summary["densecrf"]["params"] == tuned["grid"][best]["params"]
    rows = summary["methods"]
    assert "diff_reference" in rows["dilated"]["mean_iou"] and "diff" in rows["densecrf"]["mean_iou"]
    assert rows["densecrf"]["seconds_per_image"] > rows["baseline"]["seconds_per_image"] > 0
    table = (out / "results.md").read_text()
    assert "| densecrf |" in table and "| dilated+densecrf |" in table and "Difference to densecrf" in table

    # the control's first validation image, alone and unpadded: softmax -> DenseCRF -> counts
    mesh = parallel.make_mesh()
    config, setup, state, _ = load_run(out / "seed1" / "baseline", mesh, checkpoint="latest")
    ex = data.load_source(config.data.name, "validation", **source_kwargs(config))[0]
    from rwseg.train.state import merge

    scores = merge(setup.graphdef, state).predict(data.normalize(ex["image"])[None])
    probs = np.asarray(scores_to_probs(scores, "baseline"))[0]
    pred = densecrf.densecrf(ex["image"], probs, densecrf.DenseCRFParams(**tuned["grid"][best]["params"])).argmax(-1)
    per_image = np.load(out / "seed1" / "baseline" / "eval" / "per_image.npz")
    np.testing.assert_array_equal(per_image["crf_confusion"][0],
                                  np.asarray(metrics.confusion_matrix(pred, ex["label"], num_classes)))
    with pytest.raises(ValueError, match="split: expected one of"):
        run(base, steps=2, out=out, seeds=(1,), methods=(), config=REFINE, smoke=True, num_panels=0, train=False,
            split="test")


@pytest.mark.slow
def test_from_scratch_against_another_control_reports_rawks_propagation(tmp_path):
    """RAWKS against the scribble-only baseline: no base run (both from scratch), the
    control named ``scribble_baseline``, and RAWKS's P / abstention in the table."""
    scribbles = CONFIGS / "stanford_scribbles.py"
    cfg = run_config(scribbles, "scribble_baseline", base=None, steps=2, seed=0, smoke=True)
    assert (cfg.init_from, cfg.data.train_labels, cfg.num_steps) == ("", "scribbles", 2)
    out = tmp_path / "scribbles"
    summary = run(None, steps=2, out=out, seeds=(0,), methods=("rawks",), config=scribbles,
                  control="scribble_baseline", smoke=True, num_panels=0, num_samples=50)
    assert summary["control"] == "scribble_baseline" and summary["base"] is None
    assert set(summary["methods"]) == {"scribble_baseline", "rawks"}
    assert "diff" in summary["methods"]["rawks"]["mean_iou"]
    assert "diff" not in summary["methods"]["scribble_baseline"]["mean_iou"]
    assert list(summary["propagation"]) == ["rawks"]  # the control has no propagated labels
    prop = summary["propagation"]["rawks"]
    for key in ("train_P_mean_iou", "train_P_pixel_accuracy", "train_P_abstain", "train_P_nonconverged_fraction"):
        assert 0.0 <= prop[key]["mean"] <= 1.0, (key, prop[key])
    # the cached P is the trainer's own evaluation of the same checkpoint
    cached = json.loads((out / "seed0" / "rawks" / "eval" / "propagation.json").read_text())
    mesh = parallel.make_mesh()
    config, setup, state, step = load_run(out / "seed0" / "rawks", mesh, checkpoint="latest")
    config.eval_batches = 0
    source = data.load_source(config.data.name, config.data.eval_split, **source_kwargs(config))
    result, _ = evaluate(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes)
    assert cached["step"] == step == 2
    assert cached["train_P_mean_iou"] == pytest.approx(result["train_P_mean_iou"], abs=1e-6)
    assert cached["train_P_abstain"] == pytest.approx(result["train_P_abstain"], abs=1e-6)
    table = (out / "results.md").read_text()
    assert "control (scribble_baseline)" in table and "| rawks |" in table
    assert "Propagated labels P on the training images" in table and "abstention" in table
    train = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
    assert cached["images"] == len(train)

    # --propagation_images: P on the first images only (a whole evaluation batch), recomputed
    # rather than read from the cache of another count, and named in the table
    from rwseg.train.evaluate import evaluate_propagation

    subset = run(None, steps=2, out=out, seeds=(0,), methods=("rawks",), config=scribbles, control="scribble_baseline",
                 smoke=True, num_panels=0, num_samples=50, train=False, propagation_images=3)
    batch = int(config.eval_batch_size)
    assert subset["propagation_images"] == {"rawks": -(-3 // batch) * batch}
    config.eval_batches = 1
    first = evaluate_propagation(config, setup.graphdef, state, mesh, train, num_classes=setup.num_classes)
    assert subset["propagation"]["rawks"]["train_P_mean_iou"]["mean"] == pytest.approx(first["train_P_mean_iou"],
                                                                                      abs=1e-6)
    assert f"P on the first {batch} (rawks) training images" in (out / "results.md").read_text()

    # --densecrf: DenseCRF propagation of the same scribbles beside P, its parameters chosen on the
    # dev split's scribbles (the grid's best mIoU), scored on the same training images
    pytest.importorskip("pydensecrf.densecrf")
    from experiments import densecrf
    from experiments.refine_benchmark import DENSECRF_PROPAGATION

    crf = run(None, steps=2, out=out, seeds=(0,), methods=("rawks",), config=scribbles, control="scribble_baseline",
              smoke=True, num_panels=0, num_samples=50, train=False, propagation_images=3, densecrf="deeplab")
    row = crf["propagation"][DENSECRF_PROPAGATION]
    assert 0.0 <= row["train_P_mean_iou"]["mean"] <= 1.0 and 0.0 <= row["train_P_pixel_accuracy"]["mean"] <= 1.0
    tuned = json.loads((out / "densecrf_propagation_dev_seed0.json").read_text())
    assert tuned["split"] == "validation" and len(tuned["grid"]) == len(densecrf.GRID)
    assert max(r["train_P_mean_iou"] for r in tuned["grid"]) == tuned["grid"][tuned["chosen"]]["train_P_mean_iou"]
    assert "| densecrf propagation |" in (out / "results.md").read_text()

    # a second stage from each seed's runs (per-method --base with {seed}): RAWKS's "train P, Q, then Q"
    # starts from the finished rawks run (every parameter, the boundary network fixed), the control from
    # the scribble-only run trained on for as long. The configs only: that such a config keeps the
    # boundary network fixed while Q trains is tests/test_init_from.py's second-stage test.
    base = parse_base(f"scribble_baseline={out}/seed{{seed}}/scribble_baseline, rawks_then_q={out}/seed{{seed}}/rawks")
    stage2 = run_config(scribbles, "rawks_then_q", base=base_of(base, "rawks_then_q", 0), steps=2, seed=0, smoke=True)
    assert (stage2.init_from, stage2.init_params, stage2.freeze_method) == (str(out / "seed0" / "rawks"), "all", True)
    control = run_config(scribbles, "scribble_baseline", base=base_of(base, "scribble_baseline", 0), steps=2, seed=0,
                         smoke=True)
    assert (control.init_from, control.init_params) == (str(out / "seed0" / "scribble_baseline"), "backbone")


def test_per_method_base():
    assert parse_base(None) is None and parse_base("") is None and parse_base("RUN") == "RUN"
    base = parse_base("a=R/seed{seed}/x, b=S")
    assert base == {"a": "R/seed{seed}/x", "b": "S"}
    assert base_of(base, "a", 3) == "R/seed3/x" and base_of(base, "b", 3) == "S"
    assert base_of("R/seed{seed}", "any", 1) == "R/seed1" and base_of(None, "any", 1) is None
    with pytest.raises(ValueError, match=r"no METHOD=RUN entry for 'c' \(entries for \['a', 'b'\]\)"):
        base_of(base, "c", 0)
    for bad in ("a=R,a=S", "a=", "=R", "a=R,S"):
        with pytest.raises(ValueError, match="--base: expected RUN or comma-separated METHOD=RUN entries"):
            parse_base(bad)


def test_command_line_rejects_a_missing_control_run(tmp_path):
    from experiments.refine_benchmark import main

    with pytest.raises(RuntimeError, match="control 'scribble_baseline' has not finished"):
        main(["--config", str(CONFIGS / "stanford_scribbles.py"), "--control", "scribble_baseline",
              "--methods", "rawks", "--steps", "2", "--smoke", "--no_train", "--out", str(tmp_path)])


def _at(config, dotted_key):
    """config["a"]["b"] for "a.b"; config["a"] for "a"."""
    for part in dotted_key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("config_name", ["stanford_refine.py", "stanford_scribbles.py"])
def test_refine_config_variants(config_name):
    """CONFIG:VARIANT is its method's config plus the variant's overrides; unknown names
    are refused with the list of what exists."""
    from rwseg.train.config_files import load_config_file

    import importlib.util

    path = CONFIGS / config_name
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert module.VARIANTS
    for name, (method, overrides) in module.VARIANTS.items():
        c = load_config_file(str(path), name)
        plain = load_config_file(str(path), method)
        smoke = load_config_file(str(path), name + ",smoke")
        assert c.method == smoke.method == plain.method  # the config named ``method`` (scribble_baseline: "baseline")
        for key, value in overrides.items():  # "section.field" or a top-level "field"
            assert _at(c, key) == value != _at(plain, key), key
            assert _at(smoke, key) == value, key
        plain.update_from_flattened_dict(overrides)  # and nothing else differs
        assert c.to_dict() == plain.to_dict(), name
    with pytest.raises(ValueError, match=next(iter(module.VARIANTS))):
        load_config_file(str(path), "no_such_variant")


def test_parse_method_variant():
    """NAME[,smoke] -> (method, overrides, smoke); an empty argument is the default; unknown
    names and suffixes are refused with what exists."""
    from rwseg.train.config_files import parse_method_variant

    variants = {"spn_half": ("spn", {"spn.layer.downsample": 2})}
    assert parse_method_variant("spn", ("spn", "rwn"), variants) == ("spn", {}, False)
    assert parse_method_variant("spn_half,smoke", ("spn", "rwn"), variants) == ("spn", {"spn.layer.downsample": 2}, True)
    assert parse_method_variant(None, ("spn", "rwn"), variants, default="rwn") == ("rwn", {}, False)
    for bad in ("gcrf", "spn,tiny", "spn,smoke,smoke", ""):
        with pytest.raises(ValueError, match=r"\('spn', 'rwn'\).*\('spn_half',\)"):
            parse_method_variant(bad, ("spn", "rwn"), variants)

