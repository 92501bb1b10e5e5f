"""Device-local solver loops : rwseg.layers.device_local and the compiled steps.

In-process tests (1 device): :func:`map_examples` is ``vmap`` (with and without a
1-device mesh) and :func:`rwseg.train.parallel.collectives_in_loops` parses HLO text.
The slow test runs ``tests/_device_local_steps.py`` on 8 fake CPU devices and on 1 device:
a bare ``vmap`` of the converged walk has a collective in its while loop (the detector
sees the problem), the device-local one has none, nor has any while loop of the compiled
train / eval steps of one method per kind of loop (RWN evaluation: a CG solve, the kind
RAWKS also runs through the same :func:`map_examples`; GCRF: unrolled layers in training,
converged GMF in evaluation), and the 8-device results equal the 1-device ones. (RAWKS's
train step was a third item until the suite's time budget; its loop is a CG solve like
RWN's, and tests/test_plan.py checks every method's TPU steps for collectives in loops.)
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from rwseg import rwn, stencil
from rwseg.layers.device_local import batch_axis, current_batch_axis, map_examples
from rwseg.train import parallel
from _train_cli import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_device_local_steps.py"
# one method per kind of loop (CG solve; unrolled / converged GMF), and the steps that hold them
ITEMS = ("rwn:eval", "gcrf:train,eval")


def _walk_inputs(b=4, size=6, seed=0):
    offsets = stencil.four_connected()
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(b, size, size, 3))
    w = jax.vmap(lambda x: rwn.affinity(rwn.feature_distances(x, offsets), -np.ones(3), offsets))(feats)
    return offsets, w, rng.normal(size=(b, size, size, 2))


def test_map_examples_is_vmap_with_shared_arguments():
    offsets, w, f = _walk_inputs()
    walk = lambda ww, ff, alpha: rwn.random_walk(ww, ff, offsets, alpha=alpha, symmetric=True, tol=1e-10)
    want = jax.vmap(lambda ww, ff: walk(ww, ff, 0.8))(w, f)
    np.testing.assert_allclose(map_examples(walk, w, f, shared=(0.8,)), want, rtol=1e-12)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    with batch_axis(mesh):
        assert current_batch_axis() == (mesh, "data")
        got = jax.jit(lambda w, f: map_examples(walk, w, f, shared=(jnp.asarray(0.8),)))(w, f)
    assert current_batch_axis() is None
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # gradients through it (implicit solve) equal those of the bare vmap
    loss = lambda a, m: jnp.sum(m(lambda ww, ff: walk(ww, ff, a), w, f) ** 2)
    bare = jax.grad(lambda a: loss(a, lambda fn, *x: jax.vmap(fn)(*x)))(0.7)
    with batch_axis(mesh):
        local = jax.grad(lambda a: loss(a, map_examples))(0.7)
    np.testing.assert_allclose(local, bare, rtol=1e-8)


def test_batch_axis_rejects_unknown_axis():
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="axis: expected one of the mesh axes"):
        with batch_axis(mesh, "batch"):
            pass


HLO = """HloModule m

%cond.1 (p: (s32[], f32[])) -> pred[] {
  %p = (s32[], f32[]) parameter(0)
  %x = f32[] get-tuple-element(%p), index=1
  %all-reduce.3 = f32[] all-reduce(%x), replica_groups={}, to_apply=%add.2
  ROOT %lt = pred[] compare(%all-reduce.3, %x), direction=LT
}

%add.2 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused (q: f32[]) -> f32[] {
  %q = f32[] parameter(0)
  ROOT %cp = f32[] collective-permute(%q), source_target_pairs={{0,1}}
}

%body.4 (p: (s32[], f32[])) -> (s32[], f32[]) {
  %p = (s32[], f32[]) parameter(0)
  %y = f32[] get-tuple-element(%p), index=1
  %f = f32[] fusion(%y), kind=kLoop, calls=%fused
  ROOT %t = (s32[], f32[]) tuple(%i, %f)
}

ENTRY %main.9 (x: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %outside = f32[] all-reduce(%x), replica_groups={}, to_apply=%add.2
  %w = (s32[], f32[]) while(%init), condition=%cond.1, body=%body.4
  ROOT %r = f32[] get-tuple-element(%w), index=1
}
"""


def test_collectives_in_loops_parses_conditions_bodies_and_callees():
    found = parallel.collectives_in_loops(HLO)
    assert len(found) == 2, found  # the condition's all-reduce and the fusion's collective-permute
    assert any(f.startswith("cond.1:") and "all-reduce" in f for f in found)
    assert any(f.startswith("fused:") and "collective-permute" in f for f in found)
    assert parallel.while_loop_count(HLO) == 1
    assert parallel.collectives_in_loops(HLO.replace("while(", "call(")) == []


def _run(devices, path):
    env = subprocess_env(devices, {"PYTHONPATH": str(ROOT)})
    proc = subprocess.run([sys.executable, str(SCRIPT), str(path), *ITEMS], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise AssertionError(f"{SCRIPT.name} on {devices} device(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return dict(np.load(path))


@pytest.mark.slow
def test_eight_devices_iterate_locally_and_match_one(tmp_path):
    eight, one = _run(8, tmp_path / "eight.npz"), _run(1, tmp_path / "one.npz")
    assert int(eight["devices"]) == 8 and int(one["devices"]) == 1
    # the detector sees the problem: a bare vmap of the converged walk synchronises per iteration
    assert eight["probe/vmap/while_loops"] >= 1
    assert json.loads(str(eight["probe/vmap/collectives"])), "expected an all-reduce in the bare vmap's loop"
    assert eight["probe/map_examples/while_loops"] >= 1
    assert json.loads(str(eight["probe/map_examples/collectives"])) == []
    np.testing.assert_allclose(eight["probe/map_examples/y"], eight["probe/vmap/y"], rtol=1e-5, atol=1e-6)
    # the real steps: loops present, none holds a collective
    loops = [k for k in eight if k.endswith("/while_loops") and not k.startswith("probe/")]
    assert len(loops) == 3, loops
    for key in loops:
        assert eight[key] >= 1, f"{key}: expected a while loop in the compiled step"
        collectives = json.loads(str(eight[key.replace("while_loops", "collectives")]))
        assert collectives == [], f"{key}: collectives inside while loops:\n" + "\n".join(collectives)
    # the same results as on one device (float32; reductions over 8 shards associate differently)
    compared = [k for k in one if k.startswith(("rwn/", "gcrf/")) and not k.endswith(("collectives", "while_loops"))]
    assert len(compared) > 30
    for key in compared:
        a, b = eight[key], one[key]
        if key.endswith("/pred"):
            assert np.mean(a != b) <= 1e-3, f"{key}: {np.mean(a != b):.4f} of the predictions differ"
        elif np.issubdtype(a.dtype, np.integer):
            np.testing.assert_allclose(a, b, atol=max(1, int(1e-3 * np.abs(b).max())), err_msg=key)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=key)
    assert one["rwn/eval/solves"][1] == 8 and one["gcrf/eval/solves"][1] == 8
