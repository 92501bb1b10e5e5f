"""Test helpers: run the training CLI (``python -m rwseg train``) in subprocesses, with
fake CPU devices or several processes: ``run_train(config, workdir, overrides, devices=8)``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

__all__ = ["subprocess_env", "train_command", "run_train", "free_port", "smoke_config"]


def subprocess_env(devices: int = 1, extra: dict | None = None, *, test_compiler: bool = True) -> dict:
    """The environment for a child JAX process with ``devices`` fake CPU devices.

    Removes inherited ``XLA_FLAGS``/``JAX_*`` settings that would change the device set,
    and forces CPU. ``test_compiler``: share the suite's compilation cache (tests/conftest.py);
    ``False`` for a child whose compiler output is what is tested (the TPU plans of
    tests/test_plan.py).
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_PLATFORM")}
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if not test_compiler:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
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
