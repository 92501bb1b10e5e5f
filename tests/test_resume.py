"""A run killed with SIGKILL mid-training and restarted on its workdir ends with the same
parameters (and optimiser state) as an uninterrupted run; a failed final evaluation keeps
the last checkpoint, a damaged checkpoint is skipped (or, with none intact, the run stops),
and a changed config is refused on resume."""

import json
import os
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from rwseg.train.checkpoint import read_state
from _train_cli import run_train, smoke_config, subprocess_env, train_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "rwseg" / "configs" / "baseline.py") + ":smoke"
STEPS = 60
OVERRIDES = {"num_steps": STEPS, "checkpoint_every": 10, "log_every": 10, "eval_at_end": False}

# orbax leaves a coroutine of a failed array read (a damaged checkpoint) un-awaited; Python reports
# it as "Exception ignored" when it is garbage-collected
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def _finished_steps(workdir):
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()) if root.exists() else []


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "TFDS_DATA_DIR": str(tmp_path / "tfds")}  # private: no race with other xdist workers
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_train(CONFIG, reference, OVERRIDES, env=env, cwd=ROOT)

    proc = subprocess.Popen(train_command(CONFIG, killed, OVERRIDES), env=subprocess_env(1, env), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _finished_steps(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _finished_steps(killed)
    assert at_kill, "no checkpoint was written before the kill"
    assert max(at_kill) < STEPS, f"the run finished before it could be killed (checkpoints {at_kill})"

    out = run_train(CONFIG, killed, OVERRIDES, env=env, cwd=ROOT)
    resumed = [l for l in out.stdout.splitlines() + out.stderr.splitlines() if "resumed from step" in l]
    assert resumed, "the restarted run did not resume"
    k = int(resumed[0].split("resumed from step")[1].split()[0])
    assert 0 < k < STEPS

    step_a, a = read_state(reference)
    step_b, b = read_state(killed)
    assert step_a == step_b == STEPS
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # the metrics log has each logged step once (lines after the restored step were dropped)
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


# --------------------------------------------------------------------------- failures around a resume
# (issue 9, items 3 and 4) in-process on one tiny run: 4 steps, checkpoints at 2 and 4.


def _smoke_config(tfds, **overrides):
    return smoke_config(CONFIG, None, **{"num_steps": 4, "checkpoint_every": 2, "data.data_dir": tfds, **overrides})


def _train(config, workdir):
    """train_and_evaluate with its stdout/stderr captured: (result or raised error, output)."""
    import contextlib
    import io

    from rwseg.train import train_and_evaluate

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            result = train_and_evaluate(config, workdir)
        except Exception as e:  # noqa: BLE001 - returned to the test
            result = e
    return result, out.getvalue()


def _overwrite_32_bytes(step_dir):
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
    path = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 32] = bytes(255 - b for b in raw[middle:middle + 32])
    path.write_bytes(bytes(raw))


def _copy(workdir, target):
    import shutil

    shutil.copytree(workdir, target)
    return target


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """A run whose final evaluation raises (and whose checkpoint wait raises after finishing too)."""
    from rwseg.train import trainer
    from rwseg.train.checkpoint import Checkpoints

    tfds = str(tmp_path_factory.mktemp("tfds"))
    workdir = tmp_path_factory.mktemp("failed") / "run"
    real_wait = Checkpoints.wait

    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation failed on purpose")

    def wait_then_fail(self):
        real_wait(self)
        raise OSError("closing failed on purpose")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "evaluate", failing_evaluate)
        mp.setattr(Checkpoints, "wait", wait_then_fail)
        error, output = _train(_smoke_config(tfds), workdir)
    return {"workdir": workdir, "tfds": tfds, "error": error, "output": output, "state": read_state(workdir)}


def test_failed_final_evaluation_keeps_the_last_checkpoint(failed_run, tmp_path):
    error, workdir = failed_run["error"], failed_run["workdir"]
    # the original error propagates (a failure while finishing the checkpoints is only reported)
    assert isinstance(error, RuntimeError) and str(error) == "evaluation failed on purpose"
    assert "closing failed on purpose" in failed_run["output"]
    # the final checkpoint is complete and verified
    assert not [p for p in workdir.rglob("*") if "tmp" in p.name], "an unfinished orbax save remains"
    assert (workdir / "checkpoints" / "4" / "checksum" / "metadata").is_file()
    assert failed_run["state"][0] == 4
    # a restart resumes from it (no step retrained), recording the restart and its (allowed)
    # config changes in the history; config.json keeps the first start's config
    restart = _copy(workdir, tmp_path / "restart")
    first_config = (workdir / "config.json").read_text()
    result, output = _train(_smoke_config(failed_run["tfds"], eval_at_end=False, allow_config_change=True,
                                          **{"optimizer.learning_rate": 0.01}), restart)
    assert result == {}, output
    assert f"resumed from step 4 in {restart / 'checkpoints'}" in output
    steps = [json.loads(l)["step"] for l in (restart / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (restart / "config.json").read_text() == first_config  # never rewritten
    history = [json.loads(l) for l in (restart / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 4]
    assert history[1]["changes"] == {"eval_at_end": [True, False], "allow_config_change": [False, True],
                                     "optimizer.learning_rate": [0.003, 0.01]}
    assert history[1]["config"]["optimizer"]["learning_rate"] == 0.01


def test_damaged_latest_checkpoint_trainer_falls_back(failed_run, tmp_path):
    """32 bytes overwritten in the step-4 data file: reported by path, the trainer resumes from
    step 2 (num_steps=2 here: no step to retrain; that resuming reproduces an uninterrupted run
    is shown by the SIGKILL test above)."""
    run = _copy(failed_run["workdir"], tmp_path / "run")
    _overwrite_32_bytes(run / "checkpoints" / "4")
    result, output = _train(_smoke_config(failed_run["tfds"], eval_at_end=False, num_steps=2), run)
    assert result == {}, output
    assert f"checkpoint {run / 'checkpoints' / '4'} is damaged" in output
    assert f"falling back to the newest intact checkpoint, {run / 'checkpoints' / '2'}" in output
    assert "resumed from step 2" in output
    assert (run / "damaged" / "checkpoints-4").is_dir() and not (run / "checkpoints" / "4").exists()
    assert read_state(run)[0] == 2
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the log follows the state back to step 2


def test_no_intact_checkpoint_stops_naming_the_workdir(failed_run, tmp_path):
    from rwseg.train.checkpoint import NoIntactCheckpointError

    run = _copy(failed_run["workdir"], tmp_path / "run")
    for step in (2, 4):
        _overwrite_32_bytes(run / "checkpoints" / str(step))
    metrics = (run / "metrics.jsonl").read_text()
    error, output = _train(_smoke_config(failed_run["tfds"]), run)
    assert isinstance(error, NoIntactCheckpointError), output
    assert f"workdir {run}: no intact checkpoint" in str(error)
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing trained from step 0
    assert len((run / "config_history.jsonl").read_text().splitlines()) == 1


def test_changed_config_refused_unless_allowed(failed_run, tmp_path):
    from rwseg.train.checkpoint import CheckpointMismatchError
    from rwseg.train.config_check import ConfigError

    run = _copy(failed_run["workdir"], tmp_path / "run")
    tfds = failed_run["tfds"]
    error, _ = _train(_smoke_config(tfds, **{"model.width": 16, "optimizer.learning_rate": 0.01}), run)
    assert isinstance(error, ConfigError)
    assert "config.model.width: 8 -> 16" in str(error) and "config.optimizer.learning_rate: 0.003 -> 0.01" in str(error)
    assert "allow_config_change" in str(error) and "num_steps" not in str(error)
    assert len((run / "config_history.jsonl").read_text().splitlines()) == 1
    # (an allowed change is recorded: see test_failed_final_evaluation_keeps_the_last_checkpoint)
    # a changed model cannot be restored even when allowed: a clear error, not "damage"
    error, output = _train(_smoke_config(tfds, allow_config_change=True, **{"model.width": 16}), run)
    assert isinstance(error, CheckpointMismatchError), output
    assert f"checkpoint {run / 'checkpoints' / '4'} does not fit the model" in str(error)
    assert "is damaged" not in output
