"""benchmarks/shifted_grid_members.py: members on one grid are the pipeline's own members, and
members on shifted grids cover the field with the fitted grid's valid pixels."""

import pytest
import torch
import torch.nn.functional as F
from utils import benchmark_script

from podiff import PipelineConfig, PODiffPipeline
from podiff.fitting import fit


def _module():
    return benchmark_script("shifted_grid_members")


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    hr = F.avg_pool2d(torch.randn(14, 1, 36, 68, generator=g), 5, stride=1) * 3
    hr[:, :, :4, :8] = float("nan")  # land: whole input cells
    lr = F.avg_pool2d(hr, 4)
    pipe = PODiffPipeline(PipelineConfig(domain="any", residual="ridge", scale=4, patch_size=4, rank=10, crop=3,
                                         antithetic=False, train_steps=4, batch_size=4, sample_steps=3,
                                         denoiser=dict(width=16, depth=2, heads=2, window=2)))
    fit(pipe, lr[:12], hr[:12], progress=False)
    return pipe, lr[12:], hr[12:]


def test_members_on_one_grid_are_the_pipelines_members(trained):
    pipe, lr, _ = trained
    mine = _module().shifted_members(pipe, lr, 3, [(0, 0)], seed=5)
    theirs = pipe.sample(lr, num_samples=3, seed=5, return_samples=True).samples
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_members_on_shifted_grids_cover_the_field_and_score(trained):
    pipe, lr, hr = trained
    module = _module()
    members = module.shifted_members(pipe, lr, 4, [(0, 0), (2, 2)])
    assert members.shape == (4, *hr.shape)
    land = torch.isnan(hr[0, 0])
    assert torch.equal(torch.isnan(members).any(0)[0, 0], land) and torch.isfinite(members[..., ~land]).all()
    assert not torch.allclose(members[:2, ..., ~land], members[2:, ..., ~land])  # the two grids' members differ
    result = module.scores(members, hr, 4)
    assert result["rmse"] > 0 and result["std_seams"] >= 0 and len(result["bands"]) == 4
    with pytest.raises(ValueError, match="needs a residual model of any domain"):
        module.shifted_members(PODiffPipeline(PipelineConfig()), lr, 2, [(0, 0)])
