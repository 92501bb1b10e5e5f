"""Shared test configuration.

float64 is enabled for the whole suite so that oracles (numpy/scipy, finite differences)
can be compared tightly; float32 behaviour is tested by passing float32 inputs explicitly
(operators must keep the input dtype).
"""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_enable_x64", True)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
STANFORD_DIR = SHARED_DATA / "stanford_background"


@pytest.fixture(scope="session")
def stanford_dir():
    """The development copy of Stanford Background; skips the test when it is absent."""
    path = pathlib.Path(os.environ.get("RWSEG_STANFORD_DIR", STANFORD_DIR))
    if not (path / "images").is_dir() or not (path / "labels").is_dir():
        pytest.skip(f"Stanford Background not found at {path} (set RWSEG_STANFORD_DIR)")
    return path
