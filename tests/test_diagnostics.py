"""experiments/diagnostics: the evaluation-only sweep and the dilated ground-truth-affinity
oracle, on one tiny trained dilated run (synthetic data)."""

import contextlib
import importlib.util
import io
import json
import pathlib

import pytest

from _train_cli import smoke_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "diagnostics" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(fn, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(argv)
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def dilated_run(tmp_path_factory):
    from rwseg.train.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("dilated")
    train_and_evaluate(smoke_config("dilated", num_steps=2, checkpoint_every=2, eval_at_end=False,
                                    eval_batches=1), workdir)
    return workdir


def test_sweep_and_oracle_agree_on_the_unpropagated_prediction(dilated_run):
    sweep = _lines(_script("eval_sweep").main, [str(dilated_run), "", "dilated.iterations=0"])
    assert [r["spec"] for r in sweep] == ["", "dilated.iterations=0"] and all(r["step"] == 2 for r in sweep)
    oracle = _lines(_script("dilated_oracle").main, [str(dilated_run), "--steps", "1,4"])
    rows = {r["variant"]: r for r in oracle if "variant" in r}
    assert set(rows) == {"base", "pred1", "gt1", "pred4", "gt4"}
    # two code paths (rwseg.train.evaluate vs the oracle's own loop) give the same scores
    for key in ("mean_iou", "pixel_accuracy", "boundary_f"):
        assert rows["base"][key] == pytest.approx(sweep[1][key], abs=0.01)
    gates = oracle[-1]
    assert 0 < gates["cross_boundary_fraction"] < 1
    assert 0 <= gates["mean_gate_cross_boundary_pairs"] <= 1 and 0 <= gates["mean_gate_same_label_pairs"] <= 1
    # ground-truth affinities never open a gate across a boundary: propagation sharpens the edges
    assert rows["gt4"]["boundary_f"] >= rows["base"]["boundary_f"]


def test_sweep_refuses_training_options():
    with pytest.raises(SystemExit, match="'model.width' is not an evaluation-time option"):
        _script("eval_sweep").parse_spec("model.width=8")
    with pytest.raises(SystemExit, match="expected key=value"):
        _script("eval_sweep").parse_spec("rwn.alpha")
    assert _script("eval_sweep").parse_spec("rwn.alpha=0.5,rwn.eval_radius=2") == {"rwn.alpha": 0.5,
                                                                                 "rwn.eval_radius": 2}
