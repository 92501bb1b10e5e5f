"""``rwseg plan`` (rwseg.train.plan): ahead-of-time compilation for TPU topologies.

The TPU tests need libtpu (``pip install 'rwseg[tpu]'``, part of the ``test`` extra) and
run in subprocesses: one process plans the six methods (tests/_plan_all.py), one runs the
CLI on a step that cannot fit. The HLO parsing and error paths are tested without libtpu.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from rwseg.train import plan
from _train_cli import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install 'rwseg[tpu]')")

HLO = """\
HloModule jit_step

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[4,8]{1,0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: f32[16,3], b: bf16[2,5]) -> f32[16,3] {
  %a = f32[16,3]{1,0} parameter(0)
  %all-reduce-start = (f32[16,3]{1,0}, f32[16,3]{1,0}) all-reduce-start(%a), replica_groups={{0,1,2,3}}
  %all-reduce-done = f32[16,3]{1,0} all-reduce-done(%all-reduce-start)
  %ag = bf16[8,5]{1,0} all-gather(%b), dimensions={0}
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[16,3]{1,0} add(%all-reduce-done, %all-reduce-done)
}
"""


def test_collective_stats_counts_kinds_and_result_bytes():
    stats = plan.collective_stats(HLO)
    # async start/done counts once, with the result's bytes (not the (operand, result) tuple's)
    assert stats == {"all-reduce": (2, 16 * 3 * 4 + 4 * 8 * 4), "all-gather": (1, 8 * 5 * 2)}
    from rwseg.train.parallel import collectives_in_loops

    assert [line.split(":")[0] for line in collectives_in_loops(HLO)] == ["body"]


def test_resource_exhausted_message_gives_the_compilers_figure():
    msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
           "Used 25.60G of 15.75G hbm. Exceeded hbm capacity by 9.85G. HLO temporaries (25.60G) exceeds "
           "available HBM (15.75G)")
    assert plan._exhausted_bytes(msg) == int(25.60 * (1 << 30))
    assert plan._exhausted_bytes("RESOURCE_EXHAUSTED: something else") == 0


def test_hbm_table_and_unknown_generation():
    assert plan.hbm_bytes("v5e:16x16") == 16 * plan.GIB and plan.hbm_bytes("v4:4x4x8") == 32 * plan.GIB
    assert plan.hbm_bytes("v5p:4x4x8") == 95 * plan.GIB and plan.hbm_bytes("v6e:16x16") == 32 * plan.GIB
    with pytest.raises(plan.PlanError, match="--topology"):
        plan.hbm_bytes("tpu7:2x2")


def test_lever_table_compares_peak_bytes():
    """The saving is in peak bytes per chip, which decides the fit (a step's temporaries can be zero)."""
    def step(temp, argument=1000, error=""):
        return plan.StepPlan("train", True, 10 * plan.GIB, argument_bytes=argument, output_bytes=100, alias_bytes=100,
                             temp_bytes=temp, flops=2e9, error=error)

    rows = [("as configured", step(0)), ("remat", step(0, argument=500)), ("microbatches=2", step(1000)),
            ("bfloat16", step(0, error="RESOURCE_EXHAUSTED"))]
    lines = plan.format_levers(rows).splitlines()
    assert lines[2].startswith("| as configured |") and lines[2].split("|")[4].strip() == "-"
    assert lines[3].split("|")[4].strip() == "50 %" and lines[4].split("|")[4].strip() == "-100 %"
    assert lines[5].split("|")[3].strip() == "over HBM" and lines[5].split("|")[4].strip() == "-"


def test_compare_levers_compiles_each_lever_alone(monkeypatch):
    """compare_levers: the configured step, then each lever of LEVERS alone on top of the config
    (one compile each, here a fake plan_config), skipping a lever already on and microbatches
    that do not divide the per-chip batch."""
    from rwseg import configs

    calls = []

    def fake_plan(config, topology, **kw):
        calls.append((bool(config.remat), str(config.compute_dtype), int(config.microbatches), kw["batch_per_chip"]))
        step = plan.StepPlan("train", True, plan.GIB, argument_bytes=100, temp_bytes=10 * len(calls))
        return plan.Plan("baseline", topology, 4, plan.GIB, 4, 32, "float32", False, 1, [step])

    monkeypatch.setattr(plan, "plan_config", fake_plan)
    config = configs.get_config("baseline", "smoke")
    rows = plan.compare_levers(config, "v5e:2x2", batch_per_chip=2, mesh=object())
    assert [name for name, _ in rows] == ["as configured", "remat", "bfloat16", "microbatches=2"]
    assert calls == [(False, "float32", 1, 2), (True, "float32", 1, 2), (False, "bfloat16", 1, 2), (False, "float32", 2, 2)]
    calls.clear()
    config.remat = True
    rows = plan.compare_levers(config, "v5e:2x2", batch_per_chip=3, mesh=object())  # 2 does not divide 3
    assert [name for name, _ in rows] == ["as configured", "bfloat16"] and len(calls) == 2


def test_without_libtpu_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else object())
    with pytest.raises(plan.PlanError, match=r"rwseg\[tpu\]"):
        plan.topology_mesh("v5e:2x2")


@pytest.fixture(scope="module")
def six_plans(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plans.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_plan_all.py"), str(out)], cwd=ROOT,
                          env=subprocess_env(test_compiler=False), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@needs_libtpu
@pytest.mark.slow
def test_every_method_plans_on_a_tpu_topology(six_plans):
    assert sorted(six_plans) == sorted(["baseline", "spn", "rwn", "gcrf", "dilated", "rawks"])
    for method, p in six_plans.items():
        assert p["topology"] == "v5e:2x2" and p["num_chips"] == 4 and p["hbm_bytes"] == 16 * plan.GIB
        assert p["batch_size"] == 4 and p["crop_size"] == 32
        steps = {s["name"]: s for s in p["steps"]}
        assert set(steps) == {"train", "eval"}, method
        for name, s in steps.items():
            assert s["fits"] and not s["error"], (method, name)
            assert s["argument_bytes"] > 0 and s["temp_bytes"] > 0 and s["flops"] > 0 and s["bytes_accessed"] > 0
            assert s["argument_bytes"] + s["temp_bytes"] < 0.01 * s["hbm_bytes"]  # smoke shapes: tiny
            # the done-when: no collective inside a loop in any method's TPU train or eval step
            assert s["collectives_in_loops"] == [], (method, name, s["collectives_in_loops"])
            assert s["compile_seconds"] > 0
        # the gradient all-reduce of the data-parallel step carries the parameters' bytes
        # (argument bytes overstate the state: TPU lays small arrays out in padded (8, 128) tiles);
        # a gradient XLA can prove zero is not reduced (GCRF's smoke step: 117008 of 117064 bytes; its
        # pairwise bias, 64 bytes, cancels in the differences the similarity is built from)
        assert 0 < p["param_bytes"] < steps["train"]["argument_bytes"], method
        count, size = steps["train"]["collectives"]["all-reduce"]
        assert count >= 1 and size >= 0.99 * p["param_bytes"], method
        assert "| fits | yes | yes |" in p["table"] and "collectives inside loops" in p["table"]
    # solver loops: the converged walk, GMF and the RAWKS solve are while loops; the baseline has none
    loops = {m: (p["steps"][0]["while_loops"], p["steps"][1]["while_loops"]) for m, p in six_plans.items()}
    assert loops["baseline"] == (0, 0) and loops["rwn"][1] >= 1 and loops["gcrf"][1] >= 1 and loops["rawks"][0] >= 1
    # SPN's "auto" keeps the scan: the Mosaic kernel runs only where it has been verified
    # (rwseg.spn_verify), which a compile-only TPU never is; no other method has a kernel
    assert all(s["kernel"] == "-" for p in six_plans.values() for s in p["steps"])
    # loop-free steps get the cost model's time; steps with loops do not
    baseline_train = six_plans["baseline"]["steps"][0]
    assert baseline_train["optimal_seconds"] is not None and baseline_train["optimal_seconds"] > 0
    assert all(s["optimal_seconds"] is None for s in six_plans["gcrf"]["steps"])


@needs_libtpu
@pytest.mark.slow
def test_cli_plan_exits_nonzero_when_a_step_does_not_fit():
    proc = subprocess.run(
        [sys.executable, "-m", "rwseg", "plan", "--config", "baseline:smoke", "--topology", "v5e:2x2",
         "--batch_per_chip", "2", "--crop", "32", "--steps", "train", "--hbm_gib", "0.001", "--max_tries", "1"],
        cwd=ROOT, env=subprocess_env(test_compiler=False), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout
    assert "rwseg plan: baseline on v5e:2x2 (4 chips, 0.00 GiB HBM each); batch 8 (2 per chip)" in out
    assert "| fits | **no** |" in out and "| temp (per chip) |" in out and "| GFLOP" in out
    assert "the train step does not fit" in out
    assert "no tried setting fits; tried: --config.remat=True" in out
    # --levers compiles once more per lever (compare_levers, tested above without compiling)


def test_cli_plan_without_libtpu_names_the_extra():
    if HAS_LIBTPU:
        pytest.skip("libtpu is installed")
    proc = subprocess.run([sys.executable, "-m", "rwseg", "plan", "--config", "baseline:smoke", "--topology",
                           "v5e:2x2"], cwd=ROOT, env=subprocess_env(test_compiler=False), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "rwseg[tpu]" in proc.stderr


def test_spn_kernel_vmem_count_matches_the_tpu_compiler():
    """The count of :func:`rwseg.spn_pallas.fits_on_chip` against what the TPU compiler said
    (v5e:2x2 ahead-of-time, spn value and gradient, batch 16): at 64x64x8 "Scoped allocation
    with size 20.00M and limit 16.00M exceeded"; the 32x32x3 smoke SPN compiles with the kernel."""
    from rwseg import spn_pallas

    padded = lambda n, c: 2 * n * (2 + 3) * (-(-n // 8) * 8) * max(128, -(-c // 128) * 128) * 4  # noqa: E731
    assert padded(64, 8) == 20 << 20
    assert not spn_pallas.fits_on_chip(64, 64, 8, 3, 4)
    assert spn_pallas.fits_on_chip(32, 32, 3, 3, 4)
    assert spn_pallas.fits_on_chip(56, 56, 8, 3, 4) and not spn_pallas.fits_on_chip(1024, 1024, 8, 3, 4)
