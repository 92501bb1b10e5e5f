"""A lost process and a change of process count (issue 29), in one run of the CLI:

1. four training processes on localhost (jax.distributed, gloo), one killed mid-run: each
   of the others stops at its next collective with exit status 76
   (rwseg.train.preemption.LOST_PROCESS_EXIT_STATUS) and a message saying what to do, well
   within the heartbeat timeout (never a hang);
2. the run restarted with two processes resumes from the last checkpoint written by the
   four, reads the same global batches (global batch 8: 2 examples per process, then 4)
   and logs the losses of an uninterrupted one-process run, step by step.

(The data-level property behind 2 is also tested cheaply in tests/test_data_pipeline.py.)

3. (fast, deterministic) a process left waiting in a collective on a silent one (stopped
   with SIGSTOP: its sockets stay open, so no collective fails) is ended by the
   coordination service's abort after the heartbeat timeout, which
   rwseg.train.preemption.exit_lost_process_on_abort turns into status 76 and the message.
"""

import json
import pathlib
import signal
import subprocess
import sys
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
HEARTBEAT = 40  # --heartbeat_timeout_seconds: the documented bound when no collective notices the loss

pytestmark = pytest.mark.slow


def _start(workdir, env, n):
    address = f"localhost:{free_port()}"
    return [subprocess.Popen(train_command(CONFIG, workdir, OVERRIDES, process=(address, n, i))
                             + ["--heartbeat_timeout_seconds", str(HEARTBEAT)],
                             env=subprocess_env(1, env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(n)]


def _losses(workdir):
    lines = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {l["step"]: l["loss"] for l in lines if l["split"] == "train"}


def test_killed_process_stops_the_others_cleanly_and_a_restart_with_fewer_resumes_exactly(tmp_path):
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_train(CONFIG, reference, OVERRIDES, env=env, cwd=ROOT)  # builds the dataset before two processes race

    procs = _start(killed, env, 4)
    first = killed / "checkpoints" / str(OVERRIDES["checkpoint_every"])
    deadline = time.monotonic() + 500
    while not first.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), "a process ended before the kill"
    procs[2].kill()
    t = time.monotonic()
    for i in (0, 1, 3):
        try:
            out, _ = procs[i].communicate(timeout=max(HEARTBEAT + 60 - (time.monotonic() - t), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"process {i} still ran {HEARTBEAT + 60} s after process 2 was killed")
        stopped_after = time.monotonic() - t
        assert procs[i].returncode == LOST_PROCESS_EXIT_STATUS, \
            f"process {i}: rc {procs[i].returncode} after {stopped_after:.1f} s:\n{out[-3000:]}"
        assert "another process of this run has stopped. Restart every process with the same command" in out
    assert stopped_after < HEARTBEAT + 30
    procs[2].communicate()

    for p in _start(killed, env, 2):  # two processes resume what four checkpointed
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
        assert "resumed from step" in out
    want, got = _losses(reference), _losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    # several processes reduce in another order than one: float32 rounding only
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-4)
    (step_a, a), (step_b, b) = read_state(reference), read_state(killed)
    assert step_a == step_b == STEPS
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


_WAITER = """
import sys
import numpy as np
from jax.experimental import multihost_utils
from rwseg.train.parallel import initialize
from rwseg.train.preemption import exit_lost_process_on_abort

address, n, i, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
initialize(address, n, i, heartbeat_timeout_seconds=int(sys.argv[5]))
with exit_lost_process_on_abort(workdir, "waiter") as installed:
    assert installed
    multihost_utils.process_allgather(np.zeros(1, np.int32))
    print("ready", flush=True)
    while True:
        multihost_utils.process_allgather(np.zeros(1, np.int32))
"""


def test_a_collective_left_waiting_on_a_silent_process_ends_with_76_not_sigabrt(tmp_path):
    heartbeat, address = 4, f"localhost:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _WAITER, address, "2", str(i), str(tmp_path), str(heartbeat)],
                              env=subprocess_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        for p in procs:  # both in the loop of all-gathers (logs may come first)
            lines = []
            while not lines or lines[-1].strip() != "ready":
                lines.append(p.stdout.readline())
                assert lines[-1], "".join(lines)[-3000:]  # ended before the loop
        procs[1].send_signal(signal.SIGSTOP)  # silent: no heartbeat, no closed connection
        t = time.monotonic()
        out, _ = procs[0].communicate(timeout=heartbeat + 60)
        stopped_after = time.monotonic() - t
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == LOST_PROCESS_EXIT_STATUS, f"rc {procs[0].returncode}:\n{out[-3000:]}"
    assert "JAX distributed service detected fatal errors" in out  # jax's abort, turned into status 76
    assert ("waiter: error: process 0 of 2: the jax.distributed coordination service ended this process" in out
            and "another process of this run has stopped. Restart every process with the same command" in out)
    assert stopped_after < heartbeat + 30
