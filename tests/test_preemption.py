"""Preemption (issue 29): SIGTERM mid-run -> the step in flight is finished and checkpointed,
the run exits with status 75 (rwseg.train.preemption.PREEMPTED_EXIT_STATUS), and a restart
resumes exactly: the same losses, step by step, and the same final parameters as an
uninterrupted run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rwseg.train.checkpoint import read_state
from rwseg.train.preemption import LOST_PROCESS_EXIT_STATUS, PREEMPTED_EXIT_STATUS, SaveClock, StopSignals
from _train_cli import run_train, subprocess_env, train_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "rwseg" / "configs" / "baseline.py") + ":smoke"
STEPS = 40
OVERRIDES = {"num_steps": STEPS, "checkpoint_every": 15, "log_every": 1, "eval_at_end": False}


def _losses(workdir):
    lines = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {l["step"]: l["loss"] for l in lines if l["split"] == "train"}


def _checkpoints(workdir):
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()) if root.exists() else []


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(tmp_path):
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    run_train(CONFIG, reference, OVERRIDES, env=env, cwd=ROOT)

    proc = subprocess.Popen(train_command(CONFIG, stopped, OVERRIDES), env=subprocess_env(1, env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # signal once training runs (step >= 2)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_STATUS, f"rc {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    stopped_at = max(_checkpoints(stopped))
    assert 2 <= stopped_at < STEPS, f"checkpoints {_checkpoints(stopped)}"
    assert f"stopped on SIGTERM after step {stopped_at}" in err
    # the on-demand checkpoint holds the step that was in flight: the last logged step
    assert max(_losses(stopped)) == stopped_at

    out = run_train(CONFIG, stopped, OVERRIDES, env=env, cwd=ROOT)
    assert f"resumed from step {stopped_at}" in out.stdout + out.stderr
    want, got = _losses(reference), _losses(stopped)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)
    step_a, a = read_state(reference)
    step_b, b = read_state(stopped)
    assert step_a == step_b == STEPS
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # the trainer reports what the asynchronous periodic checkpoints cost the loop
    assert "asynchronous checkpoint saves blocked training for" in out.stdout
    assert all("checkpoint_blocked_sec" in json.loads(l) for l in metrics.read_text().splitlines()
               if json.loads(l)["split"] == "train")


def test_stop_signals_first_requests_a_stop_second_goes_to_the_previous_handler():
    # the previous handlers are set here: a worker process may inherit others (e.g. SIGINT ignored)
    seen = []
    previous = {signal.SIGINT: lambda n, f: seen.append(n), signal.SIGTERM: signal.default_int_handler}
    saved = {s: signal.signal(s, h) for s, h in previous.items()}
    try:
        with StopSignals() as stop:
            assert stop.received is None
            signal.raise_signal(signal.SIGINT)
            assert stop.received == "SIGINT" and seen == []
            signal.raise_signal(signal.SIGINT)  # the second one: the previous (recording) handler
            assert seen == [signal.SIGINT]
            assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]  # restored at once
        with StopSignals() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.received == "SIGTERM"
            with pytest.raises(KeyboardInterrupt):  # the previous SIGTERM handler: default_int_handler
                signal.raise_signal(signal.SIGTERM)
        assert {s: signal.getsignal(s) for s in saved} == previous
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


_ABORTER = """
import ctypes, os, sys
from rwseg.train.preemption import exit_lost_process_on_abort

libc = ctypes.CDLL(None)
with exit_lost_process_on_abort(sys.argv[1], "aborter") as installed:
    assert installed
    if sys.argv[2] == "runtime":  # abort() in a thread Python did not start, as jax's coordination service does
        thread = ctypes.c_ulong()
        assert libc.pthread_create(ctypes.byref(thread), None, ctypes.cast(libc.abort, ctypes.c_void_p), None) == 0
        libc.pthread_join(thread, None)
    else:  # this process's own crash
        os.abort()
"""


@pytest.mark.parametrize("where", ["runtime", "main"])
def test_an_abort_in_a_runtime_thread_exits_76_with_the_message_others_still_abort(where, tmp_path):
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _ABORTER, str(tmp_path), where],
                          env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=120)
    if where == "runtime":
        assert proc.returncode == LOST_PROCESS_EXIT_STATUS, proc.stderr[-3000:]
        assert proc.stderr.startswith(
            "aborter: error: process 0 of 1: the jax.distributed coordination service ended this process "
            "(RuntimeAbort: SIGABRT from a thread of the JAX runtime"), proc.stderr[-3000:]
        assert ("another process of this run has stopped. Restart every process with the same command: the run "
                f"resumes from its last checkpoint, step 5 ({tmp_path / 'checkpoints' / '5'})") in proc.stderr
    else:  # the previous handler (faulthandler's traceback), then the abort
        assert proc.returncode == -signal.SIGABRT, proc.stderr[-3000:]
        assert "Fatal Python error: Aborted" in proc.stderr and "aborter: error" not in proc.stderr


def test_save_clock_adds_up_the_blocking_time():
    class Slow:
        def save(self, step, state):
            time.sleep(0.02)

    clock = SaveClock()
    clock.save(Slow(), 1, None)
    clock.save(Slow(), 2, None)
    assert clock.saves == 2 and clock.last_step == 2 and 0.04 <= clock.seconds < 1
    assert 0.04 <= clock.take() < 1 and clock.take() == 0.0
    assert "2 asynchronous checkpoint saves blocked training for" in clock.summary(10.0)


@pytest.mark.slow
def test_stop_on_a_periodic_checkpoint_step_saves_once_and_skips_the_evaluation(tmp_path, monkeypatch):
    """In-process: a stop agreed after step 2, which is also a periodic checkpoint step: that
    checkpoint is not saved twice, Preempted names step 2, and the final evaluation is skipped."""
    from rwseg.train import trainer
    from rwseg.train.preemption import Preempted
    from _train_cli import smoke_config

    calls = []

    def stop_after_two(stop):
        calls.append(1)
        if len(calls) == 2:
            stop.received = "SIGTERM"
            return True
        return False

    monkeypatch.setattr(trainer, "stop_requested", stop_after_two)
    config = smoke_config(CONFIG, None, **{"num_steps": 6, "checkpoint_every": 2, "eval_at_end": True,
                                           "data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(Preempted, match=r"stopped on SIGTERM after step 2") as caught:
        trainer.train_and_evaluate(config, tmp_path / "run")
    assert caught.value.step == 2 and _checkpoints(tmp_path / "run") == [2]
    assert not (tmp_path / "run" / "eval").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
