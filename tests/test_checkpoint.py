"""Checkpoint integrity (issue 9, item 4): every saved state carries a sha256 checksum that
is verified on restore; a damaged checkpoint (bytes overwritten, files deleted or
garbled) is reported by path and the newest intact one is used instead; with none
intact the restore stops with an error naming the workdir (never a silent restart
from step 0)."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwseg.train.checkpoint import (Checkpoints, DamagedCheckpointError, NoIntactCheckpointError, read_state,
                                    state_digest, verify_digest)

# orbax leaves a coroutine of a failed array read un-awaited when a damaged checkpoint is read;
# Python reports it as "Exception ignored" at garbage collection, whichever test runs then
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(step: int):
    """A small train-state-like tree (dict, tuple, namedtuple, int leaf) with incompressible values."""
    import optax

    rng = np.random.default_rng(step)
    params = {"w": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32), "b": jnp.asarray(rng.normal(size=7), jnp.float32)}
    opt_state = optax.adam(1e-3).init(params)
    return {"params": params, "opt_state": opt_state}


@pytest.fixture
def saved(tmp_path):
    """A workdir with periodic checkpoints at steps 1, 2, 3 (keep 3) and a best one at 2."""
    ck = Checkpoints(tmp_path, keep=3, log=lambda m: None)
    for step in (1, 2, 3):
        ck.save(step, _state(step))
    ck.save_best(2, _state(2), 0.5)
    ck.wait()
    ck.close()
    return tmp_path


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array data file of a checkpoint (OCDBT layout)."""
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def overwrite_32_bytes(step_dir: pathlib.Path) -> pathlib.Path:
    path = _data_file(step_dir)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 32] = bytes(255 - b for b in raw[middle:middle + 32])  # every byte changes
    path.write_bytes(bytes(raw))
    return path


DAMAGE = {
    "32 bytes overwritten in the data file": overwrite_32_bytes,
    "data file deleted": lambda d: _data_file(d).unlink(),
    "array metadata deleted": lambda d: (d / "default" / "_METADATA").unlink(),
    "array metadata garbled": lambda d: (d / "default" / "_METADATA").write_text('{"tree_metadata": [1, 2'),
    "OCDBT manifest garbled": lambda d: (d / "default" / "manifest.ocdbt").write_bytes(b"\0" * 64),
    "checksum deleted": lambda d: shutil.rmtree(d / "checksum"),
    "checksum garbled": lambda d: (d / "checksum" / "metadata").write_text("{not json"),
    "checksum of other values": lambda d: (d / "checksum" / "metadata").write_text(
        json.dumps(state_digest(_state(99)))),
}


def test_digest_names_the_changed_array():
    state = _state(0)
    digest = state_digest(state)
    assert set(digest["leaves"]) >= {"params/w", "params/b", "opt_state/0/mu/w", "opt_state/0/count"}
    verify_digest(jax.tree.map(np.asarray, state), digest, "here")  # host copies: same bytes
    flipped = dict(state, params=dict(state["params"], b=state["params"]["b"].at[3].add(1e-7)))
    with pytest.raises(DamagedCheckpointError, match=r"here: sha256 of 1 array\(s\) differs .*params/b"):
        verify_digest(flipped, digest, "here")
    recast = dict(state, params=dict(state["params"], b=state["params"]["b"].astype(jnp.float64)))
    with pytest.raises(DamagedCheckpointError, match="params/b"):
        verify_digest(recast, digest, "here")


def test_checksum_saved_and_verified(saved):
    for step in (1, 2, 3):
        recorded = json.loads((saved / "checkpoints" / str(step) / "checksum" / "metadata").read_text())
        assert recorded == state_digest(_state(step))
    messages = []
    ck = Checkpoints(saved, log=messages.append)
    step, state = ck.restore(_state(0))
    assert step == 3 and messages == []
    np.testing.assert_array_equal(state["params"]["w"], _state(3)["params"]["w"])
    assert ck.restore(_state(0), which="best")[0] == 2
    ck.close()
    assert read_state(saved)[0] == 3  # the test helper verifies too


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_to_newest_intact(saved, damage):
    latest = saved / "checkpoints" / "3"
    DAMAGE[damage](latest)
    messages = []
    ck = Checkpoints(saved, keep=3, log=messages.append)
    step, state = ck.restore(_state(0))
    text = "\n".join(messages)
    assert step == 2, text
    np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
    assert f"checkpoint {latest} is damaged" in text
    assert f"falling back to the newest intact checkpoint, {saved / 'checkpoints' / '2'}" in text
    # moved out of the way: the run can save step 3 again
    assert not latest.exists() and (saved / "damaged" / "checkpoints-3").is_dir()
    ck.save(3, _state(3))
    ck.wait()
    assert ck.restore(_state(0))[0] == 3
    ck.close()


@pytest.mark.parametrize("damage", ["32 bytes overwritten in the data file", "data file deleted"])
def test_read_state_names_the_damaged_checkpoint(saved, damage):
    DAMAGE[damage](saved / "checkpoints" / "3")
    with pytest.raises(DamagedCheckpointError, match=f"{saved / 'checkpoints' / '3'}: "):
        read_state(saved)
    assert read_state(saved, step=2)[0] == 2


def test_no_intact_checkpoint_names_the_workdir(saved):
    for step in (1, 2, 3):
        overwrite_32_bytes(saved / "checkpoints" / str(step))
    messages = []
    ck = Checkpoints(saved, keep=3, log=messages.append)
    with pytest.raises(NoIntactCheckpointError, match=f"workdir {saved}: no intact checkpoint") as info:
        ck.restore(_state(0))
    for step in (1, 2, 3):
        assert str(saved / "checkpoints" / str(step)) in str(info.value)
    assert all((saved / "checkpoints" / str(s)).is_dir() for s in (1, 2, 3))  # nothing moved or deleted
    ck.close()


def test_read_only_best_falls_back_to_latest_without_moving(saved):
    overwrite_32_bytes(saved / "best" / "2")
    messages = []
    ck = Checkpoints(saved, read_only=True, log=messages.append)
    step, _ = ck.restore(_state(0), which="best")
    assert step == 3 and (saved / "best" / "2").is_dir()
    assert f"checkpoint {saved / 'best' / '2'} is damaged" in "\n".join(messages)
    ck.close()


def test_checkpoint_without_checksum_restores_with_a_warning(tmp_path):
    """Checkpoints saved before checksums existed (a plain StandardSave) stay readable."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    manager.save(5, args=ocp.args.StandardSave(_state(5)))
    manager.wait_until_finished()
    manager.close()
    messages = []
    ck = Checkpoints(tmp_path, log=messages.append)
    step, state = ck.restore(_state(0))
    assert step == 5 and "has no checksum" in "\n".join(messages)
    np.testing.assert_array_equal(state["params"]["b"], _state(5)["params"]["b"])
    ck.close()
