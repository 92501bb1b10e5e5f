"""experiments/diagnostics: the evaluation-only sweep and the dilated ground-truth-affinity
oracle, on one tiny trained dilated run (synthetic data)."""

import contextlib
import dataclasses
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
    unit = "scale:refinement.affinity_head.bias[0:16]=1"  # a parameter scaling by 1: the run as trained
    sweep = _lines(_script("eval_sweep").main, [str(dilated_run), "", "dilated.layer.num_steps=0", unit])
    assert [r["spec"] for r in sweep] == ["", "dilated.layer.num_steps=0", unit] and all(r["step"] == 2 for r in sweep)
    assert {k: v for k, v in sweep[2].items() if k not in ("spec", "seconds")} == \
        {k: v for k, v in sweep[0].items() if k not in ("spec", "seconds")}
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
    assert _script("eval_sweep").parse_spec("rwn.layer.walk_on='probabilities'", what_if=True) == {
        "rwn.layer.walk_on": "probabilities"}  # --what_if: any option
    with pytest.raises(SystemExit, match="expected key=value"):
        _script("eval_sweep").parse_spec("rwn.layer.alpha")
    assert _script("eval_sweep").parse_spec("rwn.layer.alpha=0.5,rwn.layer.eval_radius=2") == {
        "rwn.layer.alpha": 0.5, "rwn.layer.eval_radius": 2}
    assert _script("eval_sweep").parse_spec("scale:refinement.theta[0:3]=2,rwn.layer.eval_rates=(8, 16)") == {
        ("refinement.theta", 0, 3): 2.0, "rwn.layer.eval_rates": (8, 16)}
    with pytest.raises(SystemExit, match=r"expected scale:PATH\[LO:HI\]=FACTOR"):
        _script("eval_sweep").parse_spec("scale:refinement.theta=2")


def test_sweep_scales_parameters_and_names_a_missing_one():
    import jax.numpy as jnp
    import numpy as np

    script = _script("eval_sweep")
    state = {"params": {"refinement": {"theta": jnp.asarray([-1.0, -2.0, -3.0, 0.5])}}, "opt_state": ()}
    got = script.scale_params(state, {("refinement.theta", 0, 3): 2.0})
    np.testing.assert_array_equal(got["params"]["refinement"]["theta"], [-2.0, -4.0, -6.0, 0.5])
    np.testing.assert_array_equal(state["params"]["refinement"]["theta"], [-1.0, -2.0, -3.0, 0.5])  # unchanged
    with pytest.raises(SystemExit, match=r"no parameter 'thta' \(have \['theta'\]\)"):
        script.scale_params(state, {("refinement.thta", 0, None): 2.0})


def test_boundary_headroom(dilated_run):
    """boundary_headroom.py: at the config's tolerance its F-score is the evaluation's (another code
    path), and precision / recall grow with the tolerance; the coarse oracle is exact on label
    maps made of aligned 8-pixel stripes and at factor 1 (bilinear weights can tip a pixel at a
    corner where three classes meet, so a general block map is not exact)."""
    import jax.numpy as jnp
    import numpy as np

    script = _script("boundary_headroom")
    rows = _lines(script.main, [str(dilated_run), "--tolerances", "2,4,16"])
    assert rows[0]["run"].startswith("oracle") and rows[1]["step"] == 2
    sweep = _lines(_script("eval_sweep").main, [str(dilated_run), ""])
    assert rows[1]["tol2"]["fscore"] == pytest.approx(sweep[0]["boundary_f"], abs=0.06)
    for row in rows:
        for key in ("precision", "recall"):
            assert row["tol2"][key] <= row["tol4"][key] <= row["tol16"][key]

    rng = np.random.default_rng(0)
    stripes = rng.integers(0, 4, size=(2, 1, 5))
    labels = jnp.asarray(np.kron(stripes, np.ones((1, 24, 8), int)), jnp.int32)  # (2, 24, 40), 8-px stripes
    np.testing.assert_array_equal(script.coarse_oracle(labels, 4, 8), labels)
    ragged = jnp.asarray(rng.integers(0, 4, size=(1, 13, 11)), jnp.int32)
    np.testing.assert_array_equal(script.coarse_oracle(ragged, 4, 1), ragged)
    assert script.coarse_oracle(ragged, 4, 8).shape == ragged.shape


def test_rawks_solve_cost(tmp_path, dilated_run):
    """rawks_solve_cost.py on a tiny trained RAWKS run: the boundary statistics match the model's
    boundary scores computed directly, the iteration counts match a direct solve per image, and a
    run of another method is refused with its name."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rwseg import data, rawks
    from rwseg.layers.grid import subsample_scribbles
    from rwseg.train import parallel
    from rwseg.train.evaluate import eval_batches, load_run
    from rwseg.train.state import merge, source_kwargs
    from rwseg.train.trainer import train_and_evaluate

    workdir = tmp_path / "rawks"
    train_and_evaluate(smoke_config("rawks", num_steps=2, checkpoint_every=2, eval_at_end=False), workdir)
    script = _script("rawks_solve_cost")
    row, quality = _lines(script.main, [str(workdir), "--images", "3", "--propagation"])
    assert row["step"] == 2 and row["images"] == 3 and row["temperature"] == 1.0
    assert set(quality) == {"run", "step", "learned", "no_boundaries"}

    mesh = parallel.make_mesh()
    config, setup, state, _ = load_run(workdir, mesh, checkpoint="latest")
    config.eval_batches, config.eval_batch_size = 1, 3
    source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
    model = merge(setup.graphdef, state)
    boundaries, iterations = [], []
    solve_iterations = jax.jit(lambda b, s: rawks.hitting_probabilities(  # one image, traced once
        b, s, setup.num_classes, tol=config.rawks.layer.tol, max_iters=config.rawks.layer.max_iters,
        return_info=True)[1].solve.iterations)
    for batch in eval_batches(config, source, mesh, scribbles=True):
        b = np.asarray(model.boundary(jnp.asarray(batch["image"])))
        seeds = np.asarray(subsample_scribbles(jnp.asarray(batch["scribbles"]), config.rawks.layer.downsample))
        for i in np.flatnonzero(batch["valid"]):
            boundaries.append(b[i])
            iterations.append(int(solve_iterations(jnp.asarray(b[i]), jnp.asarray(seeds[i]))))
    b = np.stack(boundaries)
    assert row["boundary_mean"] == pytest.approx(b.mean(), abs=2e-3)
    assert row["boundary_clamped_percent"] == pytest.approx(100 * np.mean(b >= 0.99 * config.rawks.layer.max_boundary), abs=0.01)
    assert row["boundary_open_percent"] == pytest.approx(100 * np.mean(b < 0.1), abs=0.01)
    # the batched solve (device-local map over the batch) and the single solves round differently,
    # which can move a stopping test by an iteration or two
    assert row["cg_iterations_mean"] == pytest.approx(np.mean(iterations), rel=0.1)
    assert abs(row["cg_iterations_max"] - max(iterations)) <= 2 and min(iterations) >= 1
    # --propagation: the learned row is the evaluation's P on these images; "no boundaries" is B ~ 0
    from rwseg.train.evaluate import evaluate_propagation

    learned = evaluate_propagation(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes)
    assert quality["learned"]["mean_iou"] == pytest.approx(100 * learned["train_P_mean_iou"], abs=0.06)
    image = jnp.asarray(next(eval_batches(config, source, mesh))["image"])
    assert float(jnp.max(merge(setup.graphdef, script.without_boundaries(state)).boundary(image))) < 1e-6
    with pytest.raises(ValueError, match="a RAWKS run was expected, got method 'dilated'"):
        script.main([str(dilated_run)])

    # targets_vs_network.py: Q on the same training images (a numpy confusion of the model's own
    # predictions), P as the evaluation gives it; a run of another method has Q only
    (both, other) = _lines(_script("targets_vs_network").main, [str(workdir), str(dilated_run), "--images", "3"])
    assert both["images"] == 3 and both["method"] == "rawks" and "P" in both and "P" not in other
    assert both["P"]["boundary_fscore"] == pytest.approx(100 * learned["train_P_boundary_fscore"], abs=0.06)
    k, cm = setup.num_classes, np.zeros((setup.num_classes, setup.num_classes), np.int64)
    for batch in eval_batches(config, source, mesh):
        pred = np.asarray(jnp.argmax(model.predict(jnp.asarray(batch["image"])), axis=-1))
        for i in np.flatnonzero(batch["valid"]):
            ok = batch["label"][i] < k
            np.add.at(cm, (batch["label"][i][ok], pred[i][ok]), 1)
    assert both["Q"]["pixel_accuracy"] == pytest.approx(100 * np.trace(cm) / cm.sum(), abs=0.06)
    assert 0 <= both["Q"]["boundary_fscore"] <= 100 and set(other["Q"]) == set(both["Q"])

    # --crops: Q and P on the training crops the trainer draws (numpy confusions of the model's own
    # predictions on those batches); negative counts are refused
    from rwseg.layers.grid import pooled_grid, upsample
    from rwseg.train.state import training_batches

    (cropped,) = _lines(_script("targets_vs_network").main, [str(workdir), "--images", "3", "--crops", "2"])
    assert cropped["crops"]["batches"] == 2 and cropped["crops"]["crop_size"] == config.data.crop_size
    cms = {"Q": np.zeros((k, k), np.int64), "P": np.zeros((k, k), np.int64)}
    for batch in training_batches(config, source, mesh, num_steps=2):  # what the trainer draws
        image = jnp.asarray(batch["image"])
        p = model.propagate(image, jnp.asarray(batch["scribbles"]))
        preds = {"Q": np.asarray(jnp.argmax(model.predict(image), axis=-1)),
                 "P": np.asarray(jnp.argmax(upsample(p, image.shape[1:3], pooled_grid(config.rawks.layer.downsample)), -1))}
        ok = batch["label"] < k
        for name, pred in preds.items():
            np.add.at(cms[name], (batch["label"][ok], pred[ok]), 1)
    for name, m in cms.items():
        assert cropped["crops"][name]["pixel_accuracy"] == pytest.approx(100 * np.trace(m) / m.sum(), abs=0.06), name
    with pytest.raises(SystemExit):
        _script("targets_vs_network").main([str(workdir), "--crops", "-1"])


def test_affinity_panels(tmp_path, dilated_run, capsys):
    """affinity_panels.py on the tiny dilated run: the colour kernel is a numpy computation on the
    same image, the dilated map is the propagation's gate sigmoid(mu * logit) of the layer's
    logits, paired by hand (channel order of rwseg.stencil.dilated_offsets), and the JSON's mean
    couplings on same- / different-label pairs are those of that oracle on the label maps; bad
    arguments are refused naming them."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rwseg import data
    from rwseg.train import parallel
    from rwseg.train.evaluate import load_run
    from rwseg.train.state import merge, source_kwargs

    script = _script("affinity_panels")
    out = tmp_path / "panels.png"
    rows = _lines(script.main, [str(dilated_run), "--out", str(out), "--images", "2"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    colour, crf, run = rows
    assert colour["reference"].startswith("colour kernel") and colour["spearman_kernel"] == 1.0
    assert crf["spearman_kernel"] == 1.0  # at distance 1 DenseCRF's weight is a steeper colour kernel
    assert run["method"] == "dilated" and run["step"] == 2 and run["images"] == 2

    config, setup, state, _ = load_run(dilated_run, parallel.make_mesh(), checkpoint="latest")
    model = merge(setup.graphdef, state)
    source = data.load_source(config.data.name, "validation", **source_kwargs(config))
    r, mu, k = model.refinement.rates[0], model.refinement.mu, setup.num_classes
    assert run["offsets"] == [[0, r], [r, 0]]
    fn, offsets, factor, _ = script.run_couplings(config, setup.graphdef, state)
    same, diff = [], []
    for i in range(2):
        image, label = np.asarray(source[i]["image"]), np.asarray(source[i]["label"])
        maps = script.photo_maps(fn, offsets, factor, {"image": image, "label": label}, k)
        x = image.astype(np.float64) / 255.0
        kh = np.exp(-np.sum((x[:, :-1] - x[:, 1:]) ** 2, -1) / (2 * 0.05 ** 2))
        kv = np.exp(-np.sum((x[:-1] - x[1:]) ** 2, -1) / (2 * 0.05 ** 2))
        if r == 1:  # the script's kernel on the run's own pairs (the photo as the layer sees it)
            np.testing.assert_allclose(maps["kernel"][:, :-1, 0], kh, atol=1e-5)
        full = script.colour_kernel(x, ((0, 1), (1, 0)))
        np.testing.assert_allclose(full[:, :-1, 0], kh, atol=1e-5)
        np.testing.assert_allclose(full[:-1, :, 1], kv, atol=1e-5)
        assert np.isnan(full[:, -1, 0]).all() and np.isnan(full[-1, :, 1]).all()

        img = jnp.asarray(data.normalize(image)[None])
        logits = model.refinement.affinity_logits(img, *model._head_inputs(img, model.backbone(img)),
                                                  features_grid=model.backbone.grid(img.shape[1:3]))
        g = np.asarray(jax.nn.sigmoid(mu * logits[0]), np.float64)  # offsets of rate r: channels 0..7, row-major
        ch = 0.5 * (g[:, :-r, 4] + g[:, r:, 3])  # (0, r) at i and (0, -r) at i + (0, r)
        cv = 0.5 * (g[:-r, :, 6] + g[r:, :, 1])  # (r, 0) at i and (-r, 0) at i + (r, 0)
        np.testing.assert_allclose(maps["coupling"][:, :-r, 0], ch, atol=1e-5)
        np.testing.assert_allclose(maps["coupling"][:-r, :, 1], cv, atol=1e-5)
        for c, a, b in ((ch, label[:, :-r], label[:, r:]), (cv, label[:-r], label[r:])):
            ok = (a < k) & (b < k)
            same.append(c[ok & (a == b)])
            diff.append(c[ok & (a != b)])
    assert run["coupling_same"] == pytest.approx(np.concatenate(same).mean(), abs=2e-4)
    assert run["coupling_diff"] == pytest.approx(np.concatenate(diff).mean(), abs=2e-4)
    assert run["pairs"] == sum(map(len, same)) + sum(map(len, diff))
    assert run["diff_over_same"] == pytest.approx(run["coupling_diff"] / run["coupling_same"], abs=1e-3)
    assert 0 <= run["label_auc"] <= 1 and -1 <= run["spearman_kernel"] <= 1

    for argv, name in (([str(dilated_run), "--out", str(out), "--images", "0"], "--images"),
                       ([str(dilated_run), "--out", str(out), "--split", "test"], "--split"),
                       ([str(dilated_run), "--out", str(out), "--sigma", "0"], "--sigma"),
                       ([str(tmp_path), "--out", str(out)], "runs")):
        with pytest.raises(SystemExit):
            script.main(argv)
        assert f"{name}:" in capsys.readouterr().err


def test_densecrf_propagation(tmp_path):
    """densecrf_propagation.py on the synthetic scribble config: one dev line per grid point, the
    chosen point is the dev grid's best mIoU and is the one scored on the training images, the dev
    cache is reused as written, the seed changes the scribbles, and a non-RAWKS method is refused."""
    pytest.importorskip("pydensecrf.densecrf")
    from experiments import densecrf

    script = _script("densecrf_propagation").main
    cache = tmp_path / "tuned.json"
    argv = ["--smoke", "--images", "2", "--out", str(cache)]
    lines = _lines(script, argv)
    dev, train = lines[:-1], lines[-1]
    assert [r["split"] for r in dev] == ["validation"] * len(densecrf.GRID) and train["split"] == "train"
    assert [r["params"] for r in dev] == [dataclasses.asdict(g) for g in densecrf.GRID]
    assert train["params"] == max(dev, key=lambda r: r["train_P_mean_iou"])["params"]
    assert train["images"] >= 2 and all(0.0 <= r[k] <= 1.0 for r in lines
                                        for k in ("train_P_mean_iou", "train_P_pixel_accuracy"))
    assert json.loads(cache.read_text())["grid"] == [{k: v for k, v in r.items() if k != "split"} for r in dev]
    assert _lines(script, argv) == lines  # the cache and the scribbles are reproducible
    other = _lines(script, ["--smoke", "--images", "2", "--seed", "1"])
    assert [r["train_P_mean_iou"] for r in other] != [r["train_P_mean_iou"] for r in lines]
    with pytest.raises(SystemExit):
        script(["--smoke", "--method", "scribble_baseline"])


def test_colour_start(dilated_run):
    """colour_start.py: one line for the run's own predictions, then one per spec; a start whose
    gates are shut (the dilated head's bias far below 0, SPN's gates near 0 at full resolution) leaves every
    prediction as it was; bad specs are refused naming the spec."""
    script = _script("colour_start")
    shut = ["dilated:sigma=0.3,bias=-100,rates=(1, 2),num_steps=3", "spn:sigma=0.3,gate=1e-6,downsample=1"]
    lines = _lines(script.main, [str(dilated_run), *shut])
    assert [r["spec"] for r in lines] == ["", *shut] and all(r["images"] == lines[0]["images"] > 0 for r in lines)
    for r in lines[1:]:
        assert {k: r[k] for k in ("mean_iou", "pixel_accuracy", "boundary_f")} == \
            {k: lines[0][k] for k in ("mean_iou", "pixel_accuracy", "boundary_f")}
    assert script.parse_spec("dilated:sigma=0.33,rates=(2, 4, 8, 16)") == ("dilated", {
        "sigma": 0.33, "bias": 0.5, "rates": (2, 4, 8, 16), "num_steps": 10, "lam": 6.0, "mu": 7.0})
    for bad, match in (("crf:sigma=1", "expected LAYER:key=value"), ("spn:gate=0.5", "expected sigma=WIDTH > 0"),
                       ("spn:sigma=1,rates=(2,)", "keys from"), ("dilated:sigma", "keys from")):
        with pytest.raises(SystemExit, match=match):
            script.parse_spec(bad)
