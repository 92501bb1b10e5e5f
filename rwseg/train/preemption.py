"""Preemption: stop a training run on SIGTERM / SIGINT at a step boundary, with a checkpoint.

A preempted TPU VM (or a cluster scheduler, or Ctrl-C) sends ``SIGTERM`` (``SIGINT``)
and kills the process a little later. :class:`StopSignals` turns the first such signal
into a request: the trainer finishes the step in flight, writes a checkpoint of it
(unless that step was just saved), waits until the checkpoint is complete on disk and
raises :class:`Preempted`; ``rwseg train`` / ``python -m rwseg.train`` then exits with
status :data:`PREEMPTED_EXIT_STATUS` (75, ``EX_TEMPFAIL`` of ``sysexits.h``: "try
again"). Restarting the same command on the same workdir resumes from that checkpoint,
exactly (the data stream and the step are deterministic, :mod:`rwseg.train.trainer`).
A second signal while the checkpoint is being written is handled as without this module
(``SIGINT``: ``KeyboardInterrupt``; ``SIGTERM``: the previous handler, by default the end
of the process); the previous checkpoint is then still intact.

With several processes the request is agreed on at every step (one tiny all-gather of
the flags, :func:`stop_requested`), so every process stops after the same step and takes
part in the same (collective) save, whichever of them received the signal.

:class:`SaveClock` measures what the periodic checkpoints cost the training loop: orbax
saves asynchronously (the arrays are copied to the host and the checksum computed while
training waits; the files are written in a background thread), and the clock adds up the
time the loop is blocked in ``save``.

A lost process (multi-process runs): when a collective with another process fails (the
other process was killed or crashed, e.g. gloo's "Connection reset by peer"),
:func:`exit_lost_process` prints one message (which process, the last complete
checkpoint, "restart every process") and ends this process at once with status
:data:`LOST_PROCESS_EXIT_STATUS` (76), skipping ``jax.distributed``'s shutdown barrier,
which would wait for the dead process until the heartbeat timeout and then abort. Where
no collective notices it (a collective that waits on the lost process without an error,
a host gone silent), the coordination service declares the process dead after the
heartbeat timeout (:func:`rwseg.train.parallel.initialize`) and jax ends every other
process: its distributed client's default ``missed_heartbeat_callback`` (XLA's
``xla/pjrt/distributed/client.h``) logs "Terminating process because the JAX distributed
service detected fatal errors" with ``LOG(FATAL)``, i.e. ``abort()`` (SIGABRT, status
134), from one of the client's own threads, while this process may be blocked in a
collective. :func:`exit_lost_process_on_abort` (``rwseg train`` holds it while a
multi-process run trains and shuts down) turns that abort into the same message and
status 76. No run hangs, and none ends with SIGABRT for a lost process.

jax offers no working way to replace that callback: ``jax.distributed.initialize`` does
not take one, and jaxlib's ``get_distributed_runtime_client(missed_heartbeat_callback=)``
(0.10.2) wraps a Python callable in a ``std::function<void(absl::Status)>`` that cannot
convert its ``absl::Status`` argument (no nanobind binding): ``std::bad_cast``, then
``std::terminate``, i.e. SIGABRT again. ``jax_enable_recoverability`` stops the service
from propagating a dead task's error but leaves collectives waiting on it (gloo waits up
to ``xla_cpu_collective_timeout_seconds``, 30 min), and the loss of the coordinator
(process 0) still aborts. Hence the handler of SIGABRT itself.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

import numpy as np

__all__ = ["PREEMPTED_EXIT_STATUS", "LOST_PROCESS_EXIT_STATUS", "Preempted", "StopSignals", "stop_requested",
           "SaveClock", "RuntimeAbort", "lost_process_message", "exit_lost_process", "exit_lost_process_on_abort"]

PREEMPTED_EXIT_STATUS = 75  # sysexits.h EX_TEMPFAIL: stopped on a signal with a checkpoint; restart to resume
LOST_PROCESS_EXIT_STATUS = 76  # another process of a multi-process run is gone; restart them all to resume


class Preempted(Exception):
    """Training stopped on a signal after ``step`` steps, with a complete checkpoint of that step.

    Args:
        step: the number of finished steps (the checkpoint's step).
        signal_name: e.g. ``"SIGTERM"``.
        where: the checkpoint's path, named in the message.

    Attributes:
        step: the number of finished steps (the checkpoint's step).
        signal_name: e.g. ``"SIGTERM"``.
    """

    def __init__(self, step: int, signal_name: str, where):
        super().__init__(f"stopped on {signal_name} after step {step}; checkpoint {where} is complete: "
                         "run the same command again to resume")
        self.step = int(step)
        self.signal_name = signal_name


class StopSignals:
    """``with StopSignals() as stop:`` — while inside, the first SIGTERM / SIGINT sets
    ``stop.received`` (its name) instead of ending the process; a second one goes to the
    previous handler. Outside the main thread (where Python cannot install signal
    handlers) it does nothing and ``received`` stays ``None``.

    Args:
        signals: the signals to catch (default SIGTERM and SIGINT).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"rwseg.train: {self.received} received: finishing this step, then saving a checkpoint and "
                  f"exiting with status {PREEMPTED_EXIT_STATUS} (send it again to stop at once)", flush=True)
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signum)

    def install(self) -> "StopSignals":
        """Install the handlers (no-op outside the main thread).

        Returns:
            ``self``.
        """
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __enter__(self):
        return self.install()

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc):
        self.restore()
        return False


def stop_requested(stop: StopSignals) -> bool:
    """Whether any process received a stop signal (the same answer in every process).

    One process: ``stop.received is not None``. Several: an all-gather of every process's
    flag (a few bytes), so that all of them stop after the same step.

    Args:
        stop: this process's :class:`StopSignals`.

    Returns:
        The decision.
    """
    import jax

    local = stop.received is not None
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
    if np.any(flags) and not local:
        stop.received = "a stop signal of another process"
    return bool(np.any(flags))


class SaveClock:
    """Adds up the time the training loop spends blocked in periodic checkpoint saves."""

    def __init__(self):
        self.saves = 0
        self.seconds = 0.0
        self.last_step: int | None = None  # the step of the latest save through this clock
        self._since_read = 0.0

    def save(self, ckpts, step: int, state) -> None:
        """``ckpts.save(step, state)``, timed (the asynchronous write goes on in the background).

        Args:
            ckpts: the run's checkpoint managers (:mod:`rwseg.train.checkpoint`).
            step: the number of finished steps.
            state: the train state to save.
        """
        t = time.perf_counter()
        ckpts.save(step, state)
        dt = time.perf_counter() - t
        self.last_step = int(step)
        self.saves += 1
        self.seconds += dt
        self._since_read += dt

    def take(self) -> float:
        """Seconds blocked in saves since the previous call (for the train metrics of a log line).

        Returns:
            The seconds.
        """
        out, self._since_read = self._since_read, 0.0
        return out

    def summary(self, train_seconds: float) -> str:
        """One line: saves, seconds blocked, per save and as a share of ``train_seconds``.

        Args:
            train_seconds: the wall time of the training loop.

        Returns:
            The line.
        """
        if not self.saves:
            return "rwseg.train: no periodic checkpoint was saved"
        share = 100 * self.seconds / max(train_seconds, 1e-9)
        return (f"rwseg.train: {self.saves} asynchronous checkpoint saves blocked training for {self.seconds:.2f} s "
                f"({1000 * self.seconds / self.saves:.0f} ms each, {share:.1f}% of {train_seconds:.1f} s of training)")


class RuntimeAbort(RuntimeError):
    """The JAX runtime aborted this process from one of its own threads (SIGABRT), as the
    ``jax.distributed`` coordination service does when another process is lost
    (:func:`exit_lost_process_on_abort`)."""

    def __init__(self):
        super().__init__("SIGABRT from a thread of the JAX runtime, as its coordination service ends every process "
                         "when one stops sending heartbeats or the coordinator is gone (its log line is above)")


def lost_process_message(error: BaseException, workdir) -> str:
    """The message of :func:`exit_lost_process`: this process, the error, the checkpoint to resume from.

    Args:
        error: the failed collective's exception, or a :class:`RuntimeAbort`.
        workdir: the run directory (its ``checkpoints/`` name the step to resume from).

    Returns:
        The message.
    """
    import pathlib

    import jax

    root = pathlib.Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()) if root.exists() else []
    resume = f"step {steps[-1]} ({root / str(steps[-1])})" if steps else "step 0 (no checkpoint yet)"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    failed = ("the jax.distributed coordination service ended this process" if isinstance(error, RuntimeAbort)
              else "a collective with the other processes failed")
    return (f"process {jax.process_index()} of {jax.process_count()}: {failed} "
            f"({type(error).__name__}: {first[:300]}): another process of this run has stopped. "
            f"Restart every process with the same command: the run resumes from its last checkpoint, {resume}")


_EXITING = threading.Lock()  # held by the one thread that prints the message and ends the process


def exit_lost_process(error: BaseException, workdir, prog: str) -> None:
    """Print :func:`lost_process_message` on stderr and end the process with status 76 now
    (``os._exit``: without the shutdown barrier that would wait for the lost process).

    Called from several threads at once (a failed collective in the main thread, a
    :class:`RuntimeAbort` in a runtime thread), the first prints and exits, the others wait.

    Args:
        error: the failed collective's exception, or a :class:`RuntimeAbort`.
        workdir: the run directory.
        prog: the program name the message starts with.
    """
    import os

    _EXITING.acquire()  # never released: the holder ends the process
    try:
        print(f"{prog}: error: {lost_process_message(error, workdir)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
    finally:  # status 76 even where the message cannot be written (e.g. stderr's reader is gone)
        os._exit(LOST_PROCESS_EXIT_STATUS)


@contextlib.contextmanager
def exit_lost_process_on_abort(workdir, prog: str):
    """``with exit_lost_process_on_abort(workdir, prog):`` — while inside, a SIGABRT raised
    in a thread that Python did not start (a thread of the JAX runtime: the coordination
    service's ``LOG(FATAL)`` when another process is lost, see the module docstring) ends
    the process with :func:`exit_lost_process` (the message, status 76) instead of the
    abort. An abort in the main thread or in a Python thread (a crash of this process's
    own work) goes to the previous handler as before (e.g. ``faulthandler``'s traceback,
    then the abort). Outside the main thread or off Linux it does nothing.

    The handler is a C-level one (``signal(3)`` through ``ctypes``): Python's own signal
    handlers run in the main thread between bytecodes, never while ``abort()`` waits.
    It runs Python code in the aborting thread, so it needs the GIL, which a main thread
    blocked in a collective has released.

    Args:
        workdir: the run directory (the message names its last checkpoint).
        prog: the program name the message starts with.

    Yields:
        Whether the handler is installed.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        yield False
        return
    import ctypes

    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    raise_signal = getattr(libc, "raise")  # `raise` is a Python keyword

    def handle(signum):
        python_threads = {t.native_id for t in threading.enumerate()}
        if threading.get_native_id() not in python_threads:
            exit_lost_process(RuntimeAbort(), workdir, prog)
        # not the runtime's abort: the previous handler, when this one returns (SIGABRT is
        # blocked while it runs, so the signal raised here waits until then)
        libc.signal(signum, previous)
        raise_signal(signum)

    c_handle = ctypes.CFUNCTYPE(None, ctypes.c_int)(handle)  # referenced until restored below
    previous = libc.signal(signal.SIGABRT, ctypes.cast(c_handle, ctypes.c_void_p))
    if previous == ctypes.c_void_p(-1).value:  # SIG_ERR
        raise OSError(f"signal(SIGABRT) failed: cannot install the handler of {prog}'s lost processes")
    try:
        yield True
    finally:
        libc.signal(signal.SIGABRT, previous)
