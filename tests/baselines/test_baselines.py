"""Baselines: bicubic with masks, POD projection, ridge (beats bicubic; closed form checked),
pixel-space and global-POD pipelines through the same interface."""

import pytest
import torch
import torch.nn.functional as F
from utils import smooth
from utils import tiny_baseline_config as tiny

from podiff import PODiffPipeline, baselines
from podiff.fitting import fit

S = 4


def test_bicubic_keeps_masks_and_matches_interpolate():
    lr = torch.randn(2, 1, 6, 5)
    torch.testing.assert_close(baselines.bicubic(lr, 3),
                               F.interpolate(lr, scale_factor=3, mode="bicubic", align_corners=False))
    lr[0, 0, 1, 1] = float("nan")
    up = baselines.bicubic(lr, 3)
    assert torch.isnan(up[0, 0, 3:6, 3:6]).all() and int(torch.isnan(up).sum()) == 9


def test_pod_projection_uses_the_pipeline_pod():
    hr = smooth(64, 2)
    lr = F.avg_pool2d(hr, S)
    pipe = PODiffPipeline(tiny())
    fit(pipe, lr, hr, progress=False)
    proj = baselines.PODProjectionBaseline(pipe).fit().predict(lr)
    assert proj.shape == hr.shape
    # Projecting an image already in the POD span changes nothing.
    again = pipe.pod.decode(pipe.pod.encode((proj - pipe.offset) / pipe.data_scale)) * pipe.data_scale + pipe.offset
    torch.testing.assert_close(again, proj, rtol=1e-4, atol=1e-4)


def test_pixel_space_and_global_pod_pipelines_run_through_the_same_interface():
    hr = smooth(48, 3, size=16)
    lr = F.avg_pool2d(hr, S)
    pixel = baselines.pixel_space_pipeline(tiny(), (16, 16))
    fit(pixel, lr, hr, progress=False)
    assert pixel.pod.rank == 16 and pixel.pod.report.get("identity")
    out = pixel.sample(lr[:2], num_samples=3)
    assert out.mean.shape == (2, 1, 16, 16) and torch.isfinite(out.variance).all()
    glob = baselines.global_pod_pipeline(tiny(rank=None, energy=0.99), (16, 16))
    fit(glob, lr, hr, progress=False)
    assert glob.pod.num_locations == 1 and type(glob.denoiser).__name__ == "MLPDenoiser"
    out = glob.sample(lr[:2], num_samples=3)
    assert out.mean.shape == (2, 1, 16, 16)
    assert glob.num_parameters() > 0 and pixel.num_parameters() > 0
    with pytest.raises(RuntimeError, match="not fitted"):
        baselines.RidgeBaseline(S).predict(lr)


