"""A lost process (issue 29): two training processes on localhost (jax.distributed, gloo),
one killed mid-run. The other stops at its next collective with exit status 76
(rwseg.train.preemption.LOST_PROCESS_EXIT_STATUS) and a message saying what to do, well
within the heartbeat timeout (never a hang); restarting both processes resumes from the
last checkpoint with the losses of an uninterrupted run. (That a run checkpointed with 4
processes reads the same global batches when resumed with 2 is tested on the data
pipeline, tests/test_data_pipeline.py, without 4 training processes on a 2-core machine.)"""

import json
import pathlib
import subprocess
import time

import jax
import numpy as np
import pytest

from rwseg.train.checkpoint import read_state
from rwseg.train.preemption import LOST_PROCESS_EXIT_STATUS
from _train_cli import free_port, run_train, subprocess_env, train_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "rwseg" / "configs" / "baseline.py") + ":smoke"
STEPS = 20
OVERRIDES = {"num_steps": STEPS, "batch_size": 8, "eval_at_end": False, "checkpoint_every": 5, "log_every": 1}
HEARTBEAT = 20  # --heartbeat_timeout_seconds: the documented bound when no collective notices the loss

pytestmark = pytest.mark.slow


def _start(workdir, env):
    address = f"localhost:{free_port()}"
    return [subprocess.Popen(train_command(CONFIG, workdir, OVERRIDES, process=(address, 2, i))
                             + ["--heartbeat_timeout_seconds", str(HEARTBEAT)],
                             env=subprocess_env(1, env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(2)]


def _losses(workdir):
    lines = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {l["step"]: l["loss"] for l in lines if l["split"] == "train"}


def test_killed_process_stops_the_other_cleanly_and_a_restart_resumes_exactly(tmp_path):
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_train(CONFIG, reference, OVERRIDES, env=env, cwd=ROOT)  # builds the dataset before two processes race

    procs = _start(killed, env)
    first = killed / "checkpoints" / str(OVERRIDES["checkpoint_every"])
    deadline = time.monotonic() + 400
    while not first.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), "a process ended before the kill"
    procs[1].kill()
    t = time.monotonic()
    try:
        out, _ = procs[0].communicate(timeout=HEARTBEAT + 60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        raise AssertionError(f"process 0 still ran {HEARTBEAT + 60} s after process 1 was killed")
    stopped_after = time.monotonic() - t
    procs[1].communicate()
    assert procs[0].returncode == LOST_PROCESS_EXIT_STATUS, f"rc {procs[0].returncode} after {stopped_after:.1f} s:\n{out[-3000:]}"
    assert "another process of this run has stopped. Restart every process with the same command" in out
    assert stopped_after < HEARTBEAT + 30

    for p in _start(killed, env):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
        assert "resumed from step" in out
    want, got = _losses(reference), _losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    # two processes reduce in another order than one: float32 rounding only
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-4)
    (step_a, a), (step_b, b) = read_state(reference), read_state(killed)
    assert step_a == step_b == STEPS
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
