"""The dispatcher: defaults, forcing, reasons, and the report of backends()."""

import pytest
import torch

import podiff_kernels as pk
from podiff_kernels import dispatch


def test_backends_report_names_every_op_and_reason():
    report = pk.backends()
    assert set(report) >= {"patch_encode", "patch_decode", "patch_correlate", "decode_moments", "propagate_variance",
                           "ensemble_moments", "batched_eigh", "patch_stats", "patch_encode_masked"}
    special = {"ensemble_moments": {"cpu/default"}, "patch_stats": {"cpu/default"},
               "batched_eigh": {"cpu/n<=32", "cpu/n>32"}}
    for op, cases in report.items():
        expected = special.get(op, {"cpu/shared", "cpu/local"})
        assert expected <= set(cases), op
        for case, choice in cases.items():
            assert choice["backend"] in dispatch.BACKENDS, (op, case)
            assert choice["reason"]
            assert "reference" in choice["rejected"]  # the oracle is never a production path


def test_cpu_default_never_reference_or_interpreter():
    for op in ("patch_encode", "patch_decode", "patch_correlate"):
        for case in ("shared", "local"):
            assert dispatch.select(op, "cpu", torch.float32, case).backend in ("torch", "cpp")


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("PODIFF_BACKEND", "reference")
    choice = dispatch.select("patch_encode", "cpu", torch.float32, "shared")
    assert choice.backend == "reference" and "forced" in choice.reason


def test_cpu_alias_picks_fast_path(monkeypatch):
    monkeypatch.setenv("PODIFF_BACKEND", "cpu")
    assert dispatch.select("patch_encode", "cpu", torch.float32, "local").backend in ("cpp", "torch")


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PODIFF_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="PODIFF_BACKEND must be one of .* got 'cuda-magic'"):
        dispatch.select("patch_encode", "cpu", torch.float32, "shared")


def test_forcing_an_unusable_backend_says_why(monkeypatch):
    monkeypatch.setenv("PODIFF_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="PODIFF_BACKEND=cpp cannot run patch_encode on cpu torch.float16: "
                                           "float32/float64 only; got torch.float16"):
        dispatch.select("patch_encode", "cpu", torch.float16, "shared")


def test_half_precision_on_cpu_falls_back_to_torch():
    assert dispatch.select("patch_encode", "cpu", torch.bfloat16, "local").backend == "torch"
