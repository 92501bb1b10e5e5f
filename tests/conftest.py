"""Shared test configuration.

float64 is enabled for the whole suite so that oracles (numpy/scipy, finite differences)
can be compared tightly; float32 behaviour is tested by passing float32 inputs explicitly
(operators must keep the input dtype).

Hypothesis profiles for the property-based tests: ``ci`` (default) and ``dev``, chosen
with the ``HYPOTHESIS_PROFILE`` environment variable.

Compile time, most of the suite's time on a CPU: every test process (and its subprocesses,
which inherit the environment) shares one persistent compilation cache for the session
(``JAX_COMPILATION_CACHE_DIR``, a fresh temporary folder unless set), so a program that several
tests compile (the smoke configs' train and eval steps) is compiled once, with
``_train_cli.TEST_XLA_FLAGS``: XLA's CPU fusion emitters off (15-32 % less compile time, bitwise
the same losses and scores on the smoke runs) and LLVM's optimisation level 0 (about half the
compile time, the same HLO; float32 may round differently in the last bits; an earlier run saw a
converged walk's true residual at 1.0015x its tolerance, none of the current tests does).
tests/test_wheel.py runs the installed package with XLA's defaults; ``RWSEG_TEST_XLA_FLAGS=""``
runs the whole suite with them.
"""

import glob
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import zlib

# The test extra installs libtpu (tests/test_plan.py compiles for TPU topologies). On a machine
# without a TPU, jax would still try to start it as a backend in every test process (stderr noise,
# a lock file shared by all processes): keep the suite and its subprocesses on the CPU there.
if importlib.util.find_spec("libtpu") is not None and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/*"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller's; xdist workers inherit it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE = tempfile.mkdtemp(prefix="rwseg-test-jax-cache-")
else:
    _OWN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

from _train_cli import with_test_xla_flags  # noqa: E402 (no jax import there)

os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))  # xdist workers inherit it

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


def pytest_unconfigure(config):
    """Remove the compilation cache this process made (the controller's, after its workers)."""
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# the repository root: tests import the experiment drivers (``experiments.refine_benchmark``)
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

try:  # property-based tests (tests/test_properties.py); the rest of the suite runs without
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    settings = None
if settings is not None:
    # "ci" (default): a small, reproducible budget (derandomised, no example database);
    # "dev": a longer random search, e.g. HYPOTHESIS_PROFILE=dev pytest tests/test_properties.py
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, database=None,
                              print_blob=True, suppress_health_check=_slow_ok)
    settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=_slow_ok)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
STANFORD_DIR = SHARED_DATA / "stanford_background"


@pytest.fixture(scope="session")
def stanford_dir():
    """The development copy of Stanford Background; skips the test when it is absent."""
    path = pathlib.Path(os.environ.get("RWSEG_STANFORD_DIR", STANFORD_DIR))
    if not (path / "images").is_dir() or not (path / "labels").is_dir():
        pytest.skip(f"Stanford Background not found at {path} (set RWSEG_STANFORD_DIR)")
    return path


def pytest_collection_modifyitems(config, items):
    """Run the ``slow`` tests first (stable order otherwise): under ``pytest -n 3`` the
    longest tests then overlap with the many short ones instead of finishing last alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's own id: its data do not depend on which
    tests ran before it in the same process (pytest-xdist distributes them differently
    from run to run)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
