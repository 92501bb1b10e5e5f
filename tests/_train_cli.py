"""Test helpers: run the training CLI (``python -m rwseg train``) in subprocesses, with
fake CPU devices or several processes: ``run_train(config, workdir, overrides, devices=8)``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

__all__ = ["TEST_XLA_FLAGS", "with_test_xla_flags", "subprocess_env", "train_command", "run_train", "free_port",
           "smoke_config"]

# XLA flags of every test process and of the subprocesses that share its compiler
# (tests/conftest.py); RWSEG_TEST_XLA_FLAGS replaces them (e.g. "" for XLA's defaults throughout).
# - XLA's CPU fusion emitters off: the smoke train and eval steps compile 15-32 % faster (GCRF
#   14.8 -> 10.1 s, RWN 11.4 -> 7.9 s, SPN 10.5 -> 8.9 s of XLA compilation, 2026-12, jax 0.10.2,
#   2 cores), with bitwise the same losses, scores and solver results as XLA's default.
# - LLVM's optimisation level 0 for the CPU code: the same HLO programs, compiled about twice as
#   fast and run somewhat slower; float32 results can round differently in the last bits. The
#   suite's CPU time with both: 21 min against 40 min with the first alone (2026-12-06, 2 cores).
#   tests/test_wheel.py runs the installed package end to end with XLA's defaults, the numerics
#   users get.
TEST_XLA_FLAGS = os.environ.get("RWSEG_TEST_XLA_FLAGS",
                                "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0")


def with_test_xla_flags(flags: str = "") -> str:
    """``flags`` (an ``XLA_FLAGS`` value) followed by each flag of :data:`TEST_XLA_FLAGS` it does
    not hold yet (unchanged when it holds them all)."""
    have = flags.split()
    return " ".join(have + [f for f in TEST_XLA_FLAGS.split() if f not in have])


def subprocess_env(devices: int = 1, extra: dict | None = None, *, test_compiler: bool = True) -> dict:
    """The environment for a child JAX process with ``devices`` fake CPU devices.

    Removes inherited ``XLA_FLAGS``/``JAX_*`` settings that would change the device set,
    and forces CPU. ``test_compiler``: share the suite's compilation cache and XLA flags
    (tests/conftest.py, :data:`TEST_XLA_FLAGS`); ``False`` for a child whose compiler output
    is what is tested (the TPU plans of tests/test_plan.py).
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_PLATFORM")}
    env["JAX_PLATFORMS"] = "cpu"
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    if test_compiler:
        flags = with_test_xla_flags(flags)
    else:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if flags:
        env["XLA_FLAGS"] = flags
    env.update(extra or {})
    return env


def train_command(config_path: str, workdir, overrides=(), *, process: tuple[str, int, int] | None = None) -> list:
    """argv of ``python -m rwseg train``; ``process = (coordinator, num_processes, process_id)``."""
    cmd = [sys.executable, "-m", "rwseg", "train", "--config", str(config_path), "--workdir", str(workdir)]
    cmd += [f"--config.{k}={v}" for k, v in dict(overrides).items()]
    if process is not None:
        address, n, i = process
        cmd += ["--coordinator_address", address, "--num_processes", str(n), "--process_id", str(i)]
    return cmd


def run_train(config_path: str, workdir, overrides=(), *, devices: int = 1, env: dict | None = None,
              timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run the CLI to completion; raises ``RuntimeError`` with its output when it fails."""
    proc = subprocess.run(train_command(config_path, workdir, overrides), env=subprocess_env(devices, env),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"rwseg.train failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    """A currently free TCP port on localhost (for a coordinator address)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def smoke_config(name: str, arg: str | None = "smoke", **overrides):
    """``load_config_file(name, arg)`` with dotted overrides (``**{"model.width": 16}``), for
    in-process training tests. Unknown keys raise ``KeyError`` (a misspelt override fails)."""
    from rwseg.train.config_files import load_config_file

    config = load_config_file(name, arg)
    config.update_from_flattened_dict(overrides)
    return config
