"""Training infrastructure: schedule, metrics log, tables, panels, checkpoints, and the
``rwseg train`` / ``rwseg evaluate`` CLIs end to end on the built-in data."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from rwseg.train.checkpoint import Checkpoints, read_state
from rwseg.train.evaluate import markdown_table
from rwseg.train.optim import make_optimizer, make_schedule
from rwseg.train.panels import colorize, palette, save_panels
from _train_cli import run_train, subprocess_env
from rwseg.train.workdir import MetricsWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "rwseg" / "configs" / "baseline.py") + ":smoke"


def _opt(**kw):
    base = dict(name="adamw", learning_rate=1.0, warmup_steps=4, end_factor=0.1, weight_decay=0.0,
                momentum=0.9, grad_clip_norm=0.0, max_nonfinite_skips=0, schedule="cosine", power=0.9)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_schedule_warmup_then_cosine():
    sched = make_schedule(_opt(), 14)
    values = np.array([float(sched(s)) for s in range(15)])
    np.testing.assert_allclose(values[:5], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    # cosine from 1 to 0.1 over the remaining 10 steps
    t = np.arange(11) / 10
    np.testing.assert_allclose(values[4:], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)), atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizers_minimise_a_quadratic(name):
    tx, _ = make_optimizer(_opt(name=name, learning_rate=0.1, warmup_steps=0, end_factor=1.0, grad_clip_norm=1.0), 100)
    x = {"a": jnp.array([3.0, -2.0])}
    state = tx.init(x)
    for _ in range(100):
        g = jax.grad(lambda p: jnp.sum(p["a"] ** 2))(x)
        u, state = tx.update(g, state, x)
        x = jax.tree.map(lambda p, d: p + d, x, u)
    assert float(jnp.abs(x["a"]).max()) < 0.3
    with pytest.raises(ValueError, match="optimizer.name"):
        make_optimizer(_opt(name="lamb"), 10)


def test_metrics_writer_drops_lines_after_resume_step(tmp_path):
    w = MetricsWriter(tmp_path)
    for s in (1, 2, 3, 4):
        w.write(s, "train", {"loss": 1.0 / s, "vector": np.zeros(3)})
    MetricsWriter(tmp_path, resume_step=2).write(3, "train", {"loss": 0.5})
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert lines[-1]["loss"] == 0.5 and "vector" not in lines[0]


def test_markdown_table_rows():
    m = {"mean_iou": 0.5, "fw_iou": 0.6, "pixel_accuracy": 0.7, "trimap_error@2": 0.25, "boundary_fscore": 0.125}
    table = markdown_table([("baseline", m), ("spn", dict(m, mean_iou=0.55))], [2])
    rows = table.splitlines()
    assert rows[0].startswith("| method | mIoU | fw-IoU | pixel acc | trimap err @2 | boundary F")
    assert rows[2] == "| baseline | 50.0 | 60.0 | 70.0 | 25.0 | 12.5 |"
    assert rows[3].startswith("| spn | 55.0 |")


def test_panels(tmp_path):
    labels = np.array([[0, 1], [255, 2]])
    rgb = colorize(labels, 3)
    assert (rgb[1, 0] == 0).all() and (rgb[0, 0] == palette(3)[0]).all()
    assert len({tuple(c) for c in palette(25)}) == 25
    images = np.zeros((2, 4, 5, 3), np.uint8)
    path = save_panels(tmp_path / "p.png", images, {"gt": np.zeros((2, 4, 5), int), "pred": np.ones((2, 4, 5), int)}, 3,
                       scale=2)
    w, h = Image.open(path).size
    assert w == 3 * (10 + 4) + 4 and h == 14 + 2 * (8 + 4) + 4


def test_checkpoints_periodic_best_and_restore(tmp_path):
    state = {"params": {"w": jnp.arange(3.0, dtype=jnp.float32)}, "opt_state": (jnp.zeros(2, jnp.float32),)}
    ck = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(step, jax.tree.map(lambda x: x + step, state))
    for step, miou in ((1, 0.2), (2, 0.4), (3, 0.3)):
        ck.save_best(step, jax.tree.map(lambda x: x + step, state), miou)
    ck.wait()
    assert ck.latest_step() == 3
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    step, restored = ck.restore(state)
    assert step == 3 and np.allclose(restored["params"]["w"], [3, 4, 5])
    step, best = ck.restore(state, which="best")
    assert step == 2 and np.allclose(best["params"]["w"], [2, 3, 4])
    ck.close()
    assert read_state(tmp_path)[0] == 3
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        read_state(tmp_path / "nothing")


@pytest.mark.slow
def test_cli_train_then_evaluate(tmp_path):
    """`python -m rwseg train` (smoke) writes config, metrics, checkpoints, table and panels;
    `python -m rwseg evaluate` on the workdir reproduces the metrics."""
    workdir = tmp_path / "run"
    env = {"TFDS_DATA_DIR": str(tmp_path / "tfds")}  # private dataset build (pytest-xdist)
    out = run_train(CONFIG, workdir, {"num_steps": 4, "checkpoint_every": 2}, env=env, cwd=ROOT)
    assert "| baseline |" in out.stdout
    # quiet by default: no INFO log line (orbax logs each save at INFO, absl's app would show them),
    # and what a run prints ends with the metrics table and where the results are
    assert not re.search(r"^I\d{4} ", out.stdout + out.stderr, re.M), (out.stdout + out.stderr)[-3000:]
    assert "orbax" not in out.stdout + out.stderr
    tail = [l for l in out.stdout.strip().splitlines() if l.strip()][-5:]
    assert tail[0].startswith("| method | mIoU |") and tail[2].startswith("| baseline |"), tail
    assert tail[3] == "(all in %)" and tail[4] == f"results and panels: {workdir / 'eval'}", tail
    config = json.loads((workdir / "config.json").read_text())
    assert config["num_steps"] == 4 and config["method"] == "baseline"
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    assert [l["step"] for l in train] == [1, 2, 3, 4]
    assert all(np.isfinite(l["loss"]) and l["steps_per_sec"] > 0 for l in train)
    assert [l["split"] for l in lines].count("eval") == 1
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    for key in ("mean_iou", "fw_iou", "pixel_accuracy", "trimap_error@2", "trimap_error@4", "boundary_fscore"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (workdir / "eval" / "panels.png").exists() and (workdir / "eval" / "metrics.md").exists()
    assert (workdir / "best" / "4").is_dir()

    first = dict(metrics)
    proc = subprocess.run([sys.executable, "-m", "rwseg", "evaluate", "--workdir", str(workdir),
                           "--baseline_workdir", str(workdir)],
                          env=subprocess_env(1, env), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not re.search(r"^[IW]\d{4} ", proc.stdout + proc.stderr, re.M), proc.stderr[-3000:]  # quiet too
    again = json.loads((workdir / "eval" / "metrics.json").read_text())
    for key in ("mean_iou", "fw_iou", "pixel_accuracy", "boundary_fscore"):
        assert again[key] == pytest.approx(first[key], abs=1e-6), key
    w, _ = Image.open(workdir / "eval" / "panels.png").size  # image | gt | baseline | method
    assert w == 4 * (64 * 3 + 4) + 4 or w == 4 * (32 * 3 + 4) + 4


def test_cli_rejects_unknown_method(tmp_path):
    with pytest.raises(RuntimeError, match="config.method"):
        run_train(CONFIG, tmp_path, {"method": "crf"}, cwd=ROOT)


def test_evaluate_needs_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rwseg", "evaluate", "--workdir", str(tmp_path)],
                          env=subprocess_env(1), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "config.json" in proc.stderr


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A private TFDS data dir (no race with other pytest-xdist workers building the dataset)."""
    return str(tmp_path_factory.mktemp("tfds"))


def _smoke_setup(method, tfds_dir):
    from rwseg import data
    from rwseg.train import parallel
    from rwseg.train.config_files import load_config_file
    from rwseg.train.state import compute_statistics, create, source_kwargs

    config = load_config_file(str(ROOT / "rwseg" / "configs" / f"{method}.py"), "smoke")
    config.data.data_dir = tfds_dir
    kw = source_kwargs(config)
    setup = create(config, data.dataset_info("synthetic").num_classes,
                   compute_statistics(config, data.load_source("synthetic", "train", **kw)))
    mesh = parallel.make_mesh()
    return config, setup, mesh, parallel.replicate(setup.state, mesh), data.load_source("synthetic", "validation", **kw)


@pytest.mark.slow
def test_evaluate_matches_numpy_confusion(tfds_dir):
    """The jitted, sharded evaluation equals a numpy confusion matrix of the returned
    predictions (all images of the evaluated batch are kept as panels)."""
    from rwseg.train.evaluate import evaluate

    config, setup, mesh, state, source = _smoke_setup("baseline", tfds_dir)
    result, panels = evaluate(config, setup.graphdef, state, mesh, source, num_classes=setup.num_classes,
                              num_panels=config.eval_batch_size)
    pred, labels = panels["pred"], panels["labels"]
    assert pred.shape == labels.shape == (config.eval_batch_size,) + labels.shape[1:]
    k = setup.num_classes
    ok = labels != 255
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (labels[ok], pred[ok]), 1)
    tp, gt, pr = np.diag(cm), cm.sum(1), cm.sum(0)
    present = gt + pr - tp > 0
    np.testing.assert_allclose(result["mean_iou"], np.mean(tp[present] / (gt + pr - tp)[present]), rtol=1e-6)
    np.testing.assert_allclose(result["pixel_accuracy"], tp.sum() / cm.sum(), rtol=1e-6)
    assert panels["images"].dtype == np.uint8


@pytest.mark.slow
def test_rawks_propagation_evaluated_on_training_images(tfds_dir):
    from rwseg import data
    from rwseg.train.evaluate import evaluate_propagation

    config, setup, mesh, state, _ = _smoke_setup("rawks", tfds_dir)
    train = data.load_source("synthetic", "train", data_dir=tfds_dir, num_train=32, num_validation=8,
                             image_size=(32, 32))
    out = evaluate_propagation(config, setup.graphdef, state, mesh, train, num_classes=setup.num_classes)
    assert set(out) == {"train_P_mean_iou", "train_P_pixel_accuracy", "train_P_abstain",
                        "train_P_nonconverged_fraction", "train_P_boundary_precision", "train_P_boundary_recall",
                        "train_P_boundary_fscore", "train_P_out_of_range_labels", "train_P_out_of_range_pred"}
    assert out["train_P_out_of_range_labels"] == 0 and out["train_P_out_of_range_pred"] == 0  # counted, none here
    assert out["train_P_nonconverged_fraction"] == 0.0  # default solver settings converge
    assert all(0.0 <= v <= 1.0 for v in out.values())
    # scribbles alone already label part of each image: P is far better than chance
    assert out["train_P_pixel_accuracy"] > 1.0 / setup.num_classes
    # P's boundary F is that of P's argmax on the image grid, image by image (metrics.boundary_counts
    # is checked against scipy in test_metrics), summed over the evaluated images
    import jax.numpy as jnp
    import numpy as np

    from rwseg import metrics
    from rwseg.layers.grid import pooled_grid, upsample
    from rwseg.train.evaluate import eval_batches
    from rwseg.train.state import merge

    model, counts = merge(setup.graphdef, state), np.zeros(4, np.int64)
    for batch in eval_batches(config, train, mesh, scribbles=True):
        images = jnp.asarray(batch["image"])
        p = upsample(model.propagate(images, jnp.asarray(batch["scribbles"])), images.shape[1:3],
                     pooled_grid(int(config.rawks.layer.downsample)))
        pred = np.asarray(jnp.argmax(p, axis=-1))
        for i in np.flatnonzero(batch["valid"]):
            counts += np.asarray(metrics.boundary_counts(pred[i], batch["label"][i],
                                                         tolerance=float(config.boundary_tolerance)))
    assert counts[1] > 0 and counts[3] > 0
    expected = metrics.summarize_boundary(counts)
    for k in ("precision", "recall", "fscore"):
        assert out[f"train_P_boundary_{k}"] == pytest.approx(float(expected[k]), abs=1e-6)


def test_training_batches_resume_and_scribbles():
    """state.training_batches (the trainer's and targets_vs_network's batches): the process's
    share of the global batch at the crop size, scribbles only when configured, and a resumed
    stream (start_step = s) equal to the tail of the stream from step 0."""
    from rwseg import data
    from rwseg.train import parallel
    from rwseg.train.state import source_kwargs, training_batches
    from _train_cli import smoke_config

    mesh = parallel.make_mesh()
    for scribbles in (False, True):
        config = smoke_config(str(ROOT / "rwseg" / "configs" / "baseline.py"), **{"data.scribbles": scribbles})
        source = data.load_source(config.data.name, config.data.train_split, **source_kwargs(config))
        whole = list(training_batches(config, source, mesh, num_steps=3))
        crop = int(config.data.crop_size)
        assert len(whole) == 3
        assert set(whole[0]) >= {"image", "label"} and ("scribbles" in whole[0]) == scribbles
        assert whole[0]["image"].shape == (int(config.batch_size) // jax.process_count(), crop, crop, 3)
        resumed = list(training_batches(config, source, mesh, start_step=1, num_steps=2))
        for a, b in zip(whole[1:], resumed, strict=True):
            assert set(a) == set(b)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(whole[0]["image"], whole[1]["image"])  # the stream moves on
        assert list(training_batches(config, source, mesh, num_steps=-2)) == []
