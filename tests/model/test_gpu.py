"""On a CUDA machine (``pytest -m gpu``; skipped elsewhere): each Triton kernel and the CUDA
eigensolver against the float64 reference, and the pipeline training and sampling a tiny model
on the GPU with the per-member seeding guarantees. ``benchmarks/gpu_check.py`` runs these."""

import pytest
import torch
from cases import SHAPE_IDS, SHAPES, make_case
from fake_cuda import devices_of
from utils import assert_close

import podiff_kernels as pk
from podiff import PipelineConfig, PODiffPipeline
from podiff.fitting import build, calibrate_spread, fit
from podiff_kernels import dispatch, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = "cuda"
DTYPES = [torch.float32, torch.float64]


def _cuda(*tensors):
    return [None if t is None else t.to(CUDA) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=SHAPE_IDS[1:4])  # overlap, 3×3 covering, none; C = 1, 3
def test_patch_kernels_match_reference_on_cuda(shape, local, dtype, backend):
    backend("triton")
    x, basis, mean, coeffs = make_case(shape, local, "local" if local else "shared", dtype=dtype)
    p, s = shape[4], shape[5]
    H, W = shape[2], shape[3]
    xc, bc, mc, cc = _cuda(x, basis, mean, coeffs)
    got = pk.patch_encode(xc, bc, mc, p, s)
    assert dispatch.last_choice["patch_encode"].backend == "triton"
    assert_close(got, reference.patch_encode(x.double(), basis.double(), mean.double(), p, s), dtype, "encode")
    got = pk.patch_decode(cc, bc, mc, (H, W), p, s)
    assert dispatch.last_choice["patch_decode"].backend == "triton"
    assert_close(got, reference.patch_decode(coeffs.double(), basis.double(), mean.double(), (H, W), p, s), dtype,
                 "decode")
    got = pk.patch_correlate(xc, cc, p, s, local=local)
    assert_close(got, reference.patch_correlate(x.double(), coeffs.double(), p, s, local), dtype, "correlate")
    cov = coeffs[..., None] * coeffs[..., None, :] + torch.eye(coeffs.shape[-1], dtype=dtype)
    m, v = pk.decode_moments(cc, cov.to(CUDA), bc, mc, (H, W), p, s)
    assert dispatch.last_choice["decode_moments"].backend == "triton"
    assert_close(v, reference.propagate_variance(cov.double(), basis.double(), (H, W), p, s), dtype, "block variance")
    diag = coeffs.square()
    assert_close(pk.propagate_variance(diag.to(CUDA), bc, (H, W), p, s),
                 reference.propagate_variance(diag.double(), basis.double(), (H, W), p, s), dtype, "diagonal variance")


@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
def test_encode_and_decode_gradients_on_cuda_match_cpu(local, backend):
    backend("triton")
    x, basis, mean, coeffs = make_case(SHAPES[0], local, "shared", dtype=torch.float64)
    p, s = SHAPES[0][4], SHAPES[0][5]
    grads = {}
    for device in ("cpu", CUDA):
        if device == "cpu":
            backend("reference")
        leaves = [t.to(device).requires_grad_() for t in (x, basis, mean)]
        out = pk.patch_encode(*leaves, p, s)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)).sum().backward()
        grads[device] = [t.grad.cpu() for t in leaves]
        backend("triton")
    for a, b in zip(grads[CUDA], grads["cpu"], strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("r", [5, 20, 70])
@pytest.mark.parametrize("diagonal", [False, True], ids=["block", "diagonal"])
def test_ensemble_moments_on_cuda(r, diagonal, backend):
    backend("triton")
    samples = 3.0 + torch.randn(33, 2, 7, r, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
    mean, cov = pk.ensemble_moments(samples.float().to(CUDA), diagonal=diagonal)
    m0, c0 = reference.ensemble_moments(samples, diagonal)
    assert_close(mean, m0, torch.float32, "mean")
    assert_close(cov, c0, torch.float32, "cov")


@pytest.mark.parametrize("n, batch", [(8, 500), (33, 64), (64, 256)])
def test_cuda_eigensolver_matches_float64(n, batch, backend):
    backend("cpp")  # the extension's CUDA Jacobi kernel
    g = torch.Generator().manual_seed(n)
    a = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    spd = a @ a.mT / n
    w, v = pk.batched_eigh(spd.float().to(CUDA))
    w0 = torch.linalg.eigvalsh(spd).flip(-1)  # podiff orders descending
    torch.testing.assert_close(w.double().cpu(), w0, rtol=1e-4, atol=1e-4 * float(w0.abs().max()))
    v = v.double().cpu()
    torch.testing.assert_close(v.mT @ v, torch.eye(n, dtype=torch.float64).expand_as(spd), rtol=0, atol=1e-4)


def _tiny_pipeline():
    g = torch.Generator().manual_seed(0)
    hr = torch.randn(12, 1, 16, 32, generator=g).cumsum(-1) / 4
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    cfg = PipelineConfig(residual="none", antithetic=False, scale=4, patch_size=4, rank=5, basis="local",
                         denoiser=dict(width=32, depth=2, heads=2),
                         batch_size=8, train_steps=40, sample_steps=10)
    return PODiffPipeline(cfg), lr, hr


def test_pipeline_trains_and_samples_on_cuda_with_everything_there(tmp_path):
    pipe, lr, hr = _tiny_pipeline()
    history = fit(pipe, lr, hr, progress=False, device=CUDA, checkpoint=tmp_path / "ck.pt")
    assert len(history) == 40 and sum(history[-5:]) < sum(history[:5])
    assert devices_of(pipe.denoiser, pipe.schedule, pipe.ema, pipe.offset, pipe.pod.basis) == {"cuda"}
    out = pipe.sample(lr[:3], num_samples=8, seed=1, return_samples=True)
    assert devices_of(out.mean, out.variance, out.samples) == {"cuda"}
    assert torch.isfinite(out.mean).all() and (out.variance >= 0).all()
    pipe.save(tmp_path / "model")  # a GPU-trained model loads on the CPU
    on_cpu = PODiffPipeline.load(tmp_path / "model", device="cpu")
    assert devices_of(on_cpu.denoiser) == {"cpu"}


def test_same_seed_same_ensemble_on_cuda_for_any_chunking_and_close_to_cpu():
    pipe, lr, hr = _tiny_pipeline()
    fit(pipe, lr, hr, progress=False, device=CUDA)
    a = pipe.sample(lr[:3], num_samples=8, seed=7, return_samples=True)
    b = pipe.sample(lr[:3], num_samples=8, seed=7, return_samples=True)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)  # same device, same seed: identical
    chunked = pipe.sample(lr[:3], num_samples=8, seed=7, return_samples=True, member_budget=1)
    torch.testing.assert_close(chunked.samples, a.samples, rtol=1e-4, atol=1e-4 * float(hr.std()))
    shuffled = pipe.sample(lr[[2, 0]], num_samples=8, seed=7, return_samples=True, image_ids=[2, 0])
    torch.testing.assert_close(shuffled.samples[:, 0], a.samples[:, 2], rtol=1e-4, atol=1e-4 * float(hr.std()))
    # The same weights and noise on the CPU: agreement to float rounding (not bit for bit).
    cpu = pipe.to("cpu").sample(lr[:3], num_samples=8, seed=7, return_samples=True, amp=False)
    cuda_fp32 = pipe.to(CUDA).sample(lr[:3], num_samples=8, seed=7, return_samples=True, amp=False)
    torch.testing.assert_close(cuda_fp32.samples.cpu(), cpu.samples, rtol=1e-3, atol=1e-3 * float(hr.std()))


def test_build_on_a_cuda_pipeline_moves_cpu_data_there():
    pipe, lr, hr = _tiny_pipeline()
    pipe = build(PODiffPipeline(pipe.config, device=CUDA), lr, hr)  # CPU data: the fits run on the GPU
    assert devices_of(pipe.offset, pipe.data_scale, pipe.pod.basis, pipe.pod.mean, pipe.denoiser, pipe.ema) == {"cuda"}


def test_bounds_and_the_banded_shape_on_cuda():
    """A bounded residual model trained, calibrated (members' spread, the shape per band) and
    sampled on CUDA: the certain pixels are exact there and everything stays on the device."""
    from podiff.data import bounds
    from podiff.evaluation import error_shape

    g = torch.Generator().manual_seed(3)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(24, 1, 22, 38, generator=g), 7, stride=1) * 7
    hr = (smooth - 0.3).clamp_min(0)  # patches of exact zeros
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    cfg = PipelineConfig(antithetic=False, scale=4, patch_size=4, rank=5, residual="ridge", bounds=[0, None],
                         denoiser=dict(width=32, depth=2, heads=2), batch_size=8, train_steps=20, sample_steps=5)
    pipe = PODiffPipeline(cfg)
    fit(pipe, lr[:16], hr[:16], progress=False, device=CUDA)
    calibrate_spread(pipe, lr[16:20], hr[16:20], num_samples=8, seed=0)
    assert len(pipe.calibration.error_band_edges[0]) == error_shape.ERROR_BANDS - 1
    out = pipe.sample(lr[20:], num_samples=8, seed=1, return_samples=True)
    assert devices_of(out.mean, out.variance, out.samples) == {"cuda"}
    certain = bounds.certain_pixels(lr[20:], (0, None), 4).to(CUDA)
    assert bool(certain.any()) and bool((out.mean[certain] == 0).all()) and bool((out.variance[certain] == 0).all())
    lo, hi = error_shape.central_interval(out.mean, out.variance, 0.9, pipe.calibration.error_quantiles,
                                          pipe.calibration.error_band_edges)
    assert devices_of(lo, hi) == {"cuda"} and bool((lo <= hi).all())
