"""POD-ViT vs pixel-space ViT diffusion, same run: one sampling chain per member and one training
step, on fields of the demo's SST shape (16 × 432, local POD p = 4) with the ``tiny`` ViT.

Costs do not depend on training, so the models here are untrained; accuracy at those costs is
``benchmarks/end_to_end.py``'s job (it trains every method and writes the full table).
"""

import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.baselines import pixel_space_pipeline
from podiff.fitting import build, loss

SIZE = (16, 432)
PROVIDERS = {"pod-vit p4": ("pod", 4), "pixel p4": ("pixel", 4), "pixel p2": ("pixel", 2)}


@pytest.fixture(scope="module")
def pipelines():
    g = torch.Generator().manual_seed(0)
    hr = F.avg_pool2d(torch.randn(24, 1, SIZE[0] + 4, SIZE[1] + 4, generator=g), 5, stride=1)
    lr = F.avg_pool2d(hr, 4)
    built = {}
    for name, (kind, p) in PROVIDERS.items():
        cfg = PipelineConfig(residual="none", antithetic=False, scale=4, patch_size=p, basis="local", rank=13,
                             preset="tiny", batch_size=8)
        pipe = PODiffPipeline(cfg) if kind == "pod" else pixel_space_pipeline(cfg, SIZE)
        build(pipe, lr, hr)
        built[name] = pipe
    return built, lr, hr


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_sampling_per_member(compare, pipelines, provider):
    built, lr, _ = pipelines
    pipe = built[provider]
    fn = lambda: pipe.sample(lr[:1], num_samples=2, steps=2).mean  # noqa: E731
    out = compare("sample 2 members × 2 DDIM steps, SST 16x432", provider, fn, baseline=provider != "pod-vit p4",
                  rounds=3)
    assert out.shape == (1, 1, *SIZE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_training_step(compare, pipelines, provider):
    built, lr, hr = pipelines
    pipe = built[provider]
    x0, cond = pipe.target_tokens(hr[:8]).float(), pipe.condition_tokens(lr[:8]).float()

    def step():
        value = loss(pipe, x0, cond, torch.Generator().manual_seed(0))
        value.backward()
        pipe.denoiser.zero_grad(set_to_none=True)
        return value

    value = compare("training step, batch 8, SST 16x432", provider, step, baseline=provider != "pod-vit p4", rounds=3)
    assert torch.isfinite(value)
