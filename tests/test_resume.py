"""A run killed with SIGKILL mid-training and restarted on its workdir ends with the same
parameters (and optimiser state) as an uninterrupted run."""

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
from rwseg.train.testing import run_train, subprocess_env, train_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "configs" / "baseline.py") + ":smoke"
STEPS = 200
OVERRIDES = {"num_steps": STEPS, "checkpoint_every": 10, "log_every": 10, "eval_at_end": False}

pytestmark = pytest.mark.slow


def _finished_steps(workdir):
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()) if root.exists() else []


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
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
