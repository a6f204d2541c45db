"""Baselines, so that comparisons are one call each.

Every baseline has ``fit(lr, hr)`` and ``sample(lr, num_samples=...)`` returning a
``SampleOutput`` like the pipeline's (deterministic ones: zero variance, identical members),
and ``predict(lr)`` for the point estimate.

- ``bicubic(lr, scale)``: bicubic upsampling (masked pixels filled first, NaN again after).
- ``pod_projection(pod, lr, scale, ...)``: the upsampled input projected on the POD (what the
  POD alone can represent of it).
- ``RidgeBaseline`` (``ridge``): ridge regression from each LR ``k×k`` neighbourhood to its HR
  ``s×s`` block, shared or per-location weights; ``RidgeBaseline.tuned`` chooses ``k``, the
  placement and the penalty on validation fields.
- ``RegressionBaseline`` (``regression``): the same ViT trained with MSE to predict the POD
  tokens (the regression half of a CorrDiff-style model).
- Pixel-space diffusion: ``PODiffPipeline(config, pod=PatchPOD.identity(...))`` — the same
  ViT on identity "modes" (``r = D``); see ``pixel_space_pipeline``.
- Global POD: one basis over the whole field with an MLP denoiser; see ``global_pod_pipeline``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F


from .pipeline import PipelineConfig, PODiffPipeline, SampleOutput, upsample
from .global_pod import GlobalPOD
from .pod import PatchPOD
from .ridge import RidgeBaseline  # noqa: F401  (re-exported: every baseline is here)
from .standardise import unstandardise


def bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """``[N, C, h, w] -> [N, C, h·scale, w·scale]``; NaN where the nearest LR pixel is NaN."""
    size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
    up = upsample(lr, size)
    masked = F.interpolate(torch.isnan(lr).float(), size=size, mode="nearest") > 0
    return up.masked_fill(masked, float("nan"))


class _Deterministic:
    """``sample`` for a point predictor: the prediction with zero variance."""

    def sample(self, lr: torch.Tensor, num_samples: int = 1, steps=None, seed=None, return_samples=False,
               **_) -> SampleOutput:
        mean = self.predict(lr)
        var = torch.where(torch.isnan(mean), mean, torch.zeros_like(mean))
        samples = mean[None].expand(num_samples, *mean.shape) if return_samples else None
        return SampleOutput(mean, var, samples)


class BicubicBaseline(_Deterministic):
    """Bicubic upsampling as a model (``fit`` does nothing)."""

    def __init__(self, scale: int):
        self.scale = int(scale)

    def fit(self, lr=None, hr=None, **_) -> "BicubicBaseline":
        return self

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        return bicubic(lr, self.scale)


class PODProjectionBaseline(_Deterministic):
    """The upsampled input projected on a pipeline's POD (``fit`` needs a fitted pipeline)."""

    def __init__(self, pipeline: PODiffPipeline):
        self.pipeline = pipeline

    def fit(self, lr=None, hr=None, **_) -> "PODProjectionBaseline":
        if self.pipeline.pod is None:
            raise RuntimeError("PODProjectionBaseline needs a fitted pipeline (its POD and data scaling)")
        return self

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        return pod_projection(self.pipeline, lr)


def pod_projection(pipeline: PODiffPipeline, lr: torch.Tensor) -> torch.Tensor:
    """The bicubic-upsampled input encoded and decoded by the pipeline's POD, in data units (for a
    residual pipeline: ``μ(lr)`` plus the POD projection of the upsampled input's departure from it)."""
    lr = lr.to(pipeline.device)
    if pipeline.mean_model is None:
        tokens = pipeline.condition_tokens(lr)
        return unstandardise(pipeline.pod.decode(tokens), pipeline.offset, pipeline.data_scale).to(lr.device)
    prediction = pipeline.mean_model.predict(lr)
    departure = upsample(lr, prediction.shape[-2:]) - prediction
    tokens = pipeline.pod.encode(pipeline._standardise(departure))
    return unstandardise(pipeline.pod.decode(tokens), pipeline.offset, pipeline.data_scale) + prediction


def pixel_space_pipeline(config: PipelineConfig, image_size, channels: int = 1) -> PODiffPipeline:
    """The same pipeline on the identity basis (pixel-space diffusion, ``r = C·p·p``)."""
    pod = PatchPOD.identity(config.patch_size, channels, image_size, stride=config.stride)
    return PODiffPipeline(replace(config, rank=None, energy=None), pod=pod)


def global_pod_pipeline(config: PipelineConfig, image_size=None) -> PODiffPipeline:
    """One POD basis over the whole field (``GlobalPOD``, by snapshots) and an MLP denoiser (one token)."""
    pod = GlobalPOD(rank=config.rank, energy=config.energy)
    return PODiffPipeline(replace(config, basis="shared", denoiser_kind="mlp"), pod=pod)
