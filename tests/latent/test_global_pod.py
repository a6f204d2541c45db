"""One POD basis over the whole field (``podiff.latent.global_pod.GlobalPOD``)."""

import pytest
import torch
import torch.nn.functional as F
from utils import smooth
from utils import tiny_baseline_config as tiny

from podiff import PODiffPipeline, baselines
from podiff.fitting import fit

S = 4


def test_global_pod_by_snapshots_equals_the_covariance_pod():
    """Snapshots (thin SVD of the N×D data) give the modes of the D×D covariance eigenproblem."""
    from podiff.latent.pod import PatchPOD

    x = smooth(30, 4, size=12).double()  # D = 144 > N = 30: at most 29 modes
    snap = baselines.GlobalPOD(rank=10, energy=None).fit(x)
    cov = PatchPOD(12, rank=10).fit(x, progress=False)
    torch.testing.assert_close(snap.eigenvalues, cov.eigenvalues.double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(snap.encode(x)[:, 0], cov.encode(x)[:, 0], rtol=1e-7, atol=1e-8)  # same signs
    torch.testing.assert_close(snap.decode(snap.encode(x)), cov.decode(cov.encode(x)), rtol=1e-9, atol=1e-9)
    full = baselines.GlobalPOD(rank=None, energy=None).fit(x)
    assert full.rank == 29  # N − 1: centring removes one dimension
    torch.testing.assert_close(full.decode(full.encode(x)), x, rtol=1e-9, atol=1e-9)


def test_global_pod_on_a_rectangular_masked_field(tmp_path):
    x = smooth(20, 5, size=40)[..., :16, :40]  # 16 × 40, like an SST band
    x[:, :, 3:6, 10:20] = float("nan")  # fixed land
    pod = baselines.GlobalPOD(energy=0.99).fit(x)
    assert pod.report["masked_pixels"] == 30 and pod.rank <= 19
    tokens = pod.encode(x)
    assert tokens.shape == (20, 1, pod.rank) and torch.isfinite(tokens).all()
    back = pod.decode(tokens)
    assert torch.isnan(back[:, :, 3:6, 10:20]).all() and torch.isfinite(back[:, :, 6:]).all()
    # Linear decoder: the analytic block variance equals the decoded members' variance.
    members = tokens[:6, None].double().transpose(0, 1) + 0.3 * torch.randn(8, 1, 1, pod.rank, dtype=torch.float64)
    import podiff_kernels as pk

    mean_tok, cov = pk.ensemble_moments(members)
    mean, var = pod.decode_moments(mean_tok, cov)
    decoded = torch.stack([pod.decode(m) for m in members])
    torch.testing.assert_close(var, decoded.var(0), rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(mean, decoded.mean(0), rtol=1e-9, atol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 16, 40\]; got \(2, 1, 16, 16\)"):
        pod.encode(x[:2, :, :, :16])
    # Through the pipeline, saved and loaded.
    lr = F.avg_pool2d(x, S)
    pipe = baselines.global_pod_pipeline(tiny(rank=None, energy=0.99))
    fit(pipe, lr, x, progress=False)
    out = pipe.sample(lr[:2], num_samples=3)
    assert torch.isnan(out.variance[:, :, 3:6, 10:20]).all() and (out.variance[:, :, 8:] >= 0).all()
    pipe.save(tmp_path / "global")
    again = PODiffPipeline.load(tmp_path / "global").sample(lr[:2], num_samples=3)
    assert torch.equal(again.mean.nan_to_num(), out.mean.nan_to_num())


