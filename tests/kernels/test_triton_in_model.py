"""The Triton kernels inside the model loop: with ``PODIFF_BACKEND=triton`` (the interpreter on
CPU, the real kernels on CUDA) a tiny pipeline trains and samples with every op the model calls
going through its Triton kernel, so the layouts, strides and dtypes the model really produces
reach the kernels. The POD fit runs before the backend is forced: ``batched_eigh`` has no Triton
kernel (a CUDA/C++ one), and ``patch_stats``' kernel is checked on its own in test_patch_stats."""

import pytest
import torch
from conftest import DEVICE

from podiff import PipelineConfig, PODiffPipeline
from podiff.fitting import build, fit
from podiff_kernels import dispatch

MODEL_OPS = {"patch_encode", "patch_decode", "ensemble_moments", "decode_moments"}


@pytest.fixture
def calls(monkeypatch):
    """Every (op, backend) the dispatcher runs, in order."""
    seen = []
    original = dispatch.call

    def recording(op, device, dtype, case, *args, **kwargs):
        out = original(op, device, dtype, case, *args, **kwargs)
        seen.append((op, dispatch.last_choice[op].backend, str(dtype)))
        return out

    monkeypatch.setattr(dispatch, "call", recording)
    return seen


@pytest.mark.parametrize("basis, stride", [("shared", 2), ("local", 2), ("shared", 4)])
def test_fit_and_sample_run_every_model_op_on_triton(basis, stride, backend, calls):
    g = torch.Generator().manual_seed(3)
    hr = (torch.randn(6, 1, 8, 16, generator=g).cumsum(-1) / 4).to(DEVICE)  # small: the interpreter is slow
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    cfg = PipelineConfig(residual="none", antithetic=False, scale=4, patch_size=4, stride=stride, rank=3, basis=basis,
                         denoiser=dict(width=16, depth=1, heads=2),
                         batch_size=4, sample_steps=2, train_steps=2)
    pipe = build(PODiffPipeline(cfg, device=DEVICE), lr, hr)  # the POD fit (eigh has no Triton kernel)
    backend("triton")
    calls.clear()
    fit(pipe, lr, hr, progress=False)
    out = pipe.sample(lr[:2], num_samples=3, return_samples=True)
    assert {op for op, _, _ in calls} >= MODEL_OPS, calls
    assert {b for _, b, _ in calls} == {"triton"}, calls
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.variance).all()
    assert (out.variance >= 0).all()
    # The Triton pixel moments agree with decoding the members the same kernels produced.
    members = out.samples.double()
    torch.testing.assert_close(out.mean.double(), members.mean(0), rtol=1e-4, atol=1e-4)
    if cfg.stride == cfg.patch_size:  # block variance is exact only without overlap
        torch.testing.assert_close(out.variance.double(), members.var(0), rtol=1e-3, atol=1e-4)
