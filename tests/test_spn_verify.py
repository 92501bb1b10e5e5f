"""Kernel trust (issue 29): ``implementation="auto"`` picks a Pallas SPN kernel only where it
is verified (rwseg.spn_verify), with the backend mocked; the device check itself runs here
on CPU in interpret mode."""

import warnings

import jax
import numpy as np
import pytest

from rwseg import spn, spn_pallas, spn_verify
from rwseg.spn import DIRECTIONS

X = np.zeros((5, 7, 3), np.float32)
GATES = np.zeros((4, 5, 7, 3, 3), np.float32)


def _resolve(implementation="auto"):
    return spn._resolve_implementation(implementation, X, GATES, DIRECTIONS)


def _ok(kernel):
    return spn_verify.KernelCheck(kernel, "mocked", "Mock chip", False, 1e-7, 1e-4, True)


def _bad(kernel):
    return spn_verify.KernelCheck(kernel, "mocked", "Mock chip", False, 0.25, 1e-4, False)


@pytest.fixture
def mocked(monkeypatch):
    """A backend-switchable fake accelerator: every kernel lowers and fits; checks are counted."""
    state = {"backend": "cpu", "checks": [], "result": _ok}
    monkeypatch.setattr(jax, "default_backend", lambda: state["backend"])
    monkeypatch.setattr(spn_verify, "device_kind", lambda: "Mock chip")
    monkeypatch.setattr(spn_pallas, "gpu_kernel_lowers", lambda *a: True)
    monkeypatch.setattr(spn_pallas, "fits_on_chip", lambda *a: True)

    def check(kernel, interpret=None, dtype="float32"):
        state["checks"].append((kernel, interpret))
        return state["result"](kernel)

    monkeypatch.setattr(spn_verify, "check_kernel", check)
    monkeypatch.setattr(spn_verify, "_cache", {})
    monkeypatch.setattr(spn_verify, "_self_check", None)
    monkeypatch.delenv("RWSEG_SPN_SELF_CHECK", raising=False)
    return state


@pytest.mark.parametrize("backend, kernel", [("tpu", "pallas"), ("gpu", "pallas_gpu"), ("cuda", "pallas_gpu")])
def test_auto_never_selects_an_unverified_kernel(mocked, monkeypatch, backend, kernel):
    mocked["backend"] = backend
    # nothing recorded, no self-check: the scan, and no check is run behind the user's back
    assert spn_verify.RECORDED[kernel] == ()
    assert _resolve() == "scan" and mocked["checks"] == []
    # "pallas" still forces the kernel; "scan" is the scan
    assert _resolve("pallas") == kernel and _resolve("scan") == "scan"
    # a recorded device check of this device kind: the kernel (still no run-time check)
    monkeypatch.setitem(spn_verify.RECORDED, kernel, ("Mock chip",))
    assert _resolve() == kernel and mocked["checks"] == []
    # recorded for another chip only: the scan
    monkeypatch.setitem(spn_verify.RECORDED, kernel, ("Another chip",))
    assert _resolve() == "scan"
    # a kernel recorded for the other backend does not count here
    other = "pallas" if kernel == "pallas_gpu" else "pallas_gpu"
    monkeypatch.setitem(spn_verify.RECORDED, other, ("Mock chip",))
    assert _resolve() == "scan"


@pytest.mark.parametrize("backend, kernel", [("tpu", "pallas"), ("gpu", "pallas_gpu")])
def test_self_check_at_first_use_is_cached_and_a_mismatch_warns_and_keeps_the_scan(mocked, monkeypatch,
                                                                                   backend, kernel):
    mocked["backend"] = backend
    monkeypatch.setenv("RWSEG_SPN_SELF_CHECK", "1")
    assert spn_verify.self_check_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve() == kernel and _resolve() == kernel
    assert mocked["checks"] == [(kernel, False)]  # once per process, on the chip (not interpreted)
    # a failing check (fresh process): one warning with the difference, then the scan, quietly
    monkeypatch.setattr(spn_verify, "_cache", {})
    mocked["result"] = _bad
    with pytest.warns(RuntimeWarning, match=r"NOT verified: max relative difference 0\.25 .* uses the scan"):
        assert _resolve() == "scan"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve() == "scan"
    assert len(mocked["checks"]) == 2
    assert _resolve("pallas") == kernel  # forcing is unaffected
    # a check that cannot even run: a warning and the scan
    monkeypatch.setattr(spn_verify, "_cache", {})

    def broken(kernel, interpret=None, dtype="float32"):
        raise RuntimeError("Mosaic failed")

    monkeypatch.setattr(spn_verify, "check_kernel", broken)
    with pytest.warns(RuntimeWarning, match="self-check of the .* failed to run .*Mosaic failed"):
        assert _resolve() == "scan"
    # set_self_check overrides the environment
    monkeypatch.setattr(spn_verify, "_cache", {})
    spn_verify.set_self_check(False)
    assert _resolve() == "scan" and len(mocked["checks"]) == 2
    with pytest.raises(TypeError, match="enabled: expected True, False or None"):
        spn_verify.set_self_check("yes")


def test_cpu_auto_is_the_scan_without_any_check(mocked, monkeypatch):
    monkeypatch.setenv("RWSEG_SPN_SELF_CHECK", "1")
    assert _resolve() == "scan" and mocked["checks"] == []


def test_the_device_check_finds_a_wrong_kernel(monkeypatch):
    """check_kernel against a kernel that is off by a little in its transposed (backward)
    recurrence only: not verified, and the message gives the difference (interpret mode)."""
    true = spn_pallas.recurrence

    def wrong(b, p, *, transpose=False, **kw):
        out = true(b, p, transpose=transpose, **kw)
        return out * 1.001 if transpose else out

    monkeypatch.setattr(spn_pallas, "recurrence", wrong)
    small = spn_verify._problems("float32")[:1]
    monkeypatch.setattr(spn_verify, "_problems", lambda dtype: small)
    result = spn_verify.check_kernel("pallas")
    assert result.interpret and not result.verified and 5e-4 < result.max_difference < 2e-3
    assert "NOT verified: max relative difference 0.001" in spn_verify.format_check(result)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        spn_verify.check_kernel("triton")


def test_the_device_check_report_verifies_the_gpu_kernel_in_interpret_mode(monkeypatch, capsys):
    """What `rwseg check-kernels` prints and returns (on CPU: interpret mode; smallest problem)."""
    small = spn_verify._problems("float32")[:1]
    monkeypatch.setattr(spn_verify, "_problems", lambda dtype: small)
    assert spn_verify.report("pallas_gpu") == 0
    out = capsys.readouterr().out
    assert out.startswith("pallas_gpu on cpu (cpu, interpret mode): verified (max relative difference")
