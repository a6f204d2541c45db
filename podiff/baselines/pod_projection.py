"""The upsampled input projected on a trained model's POD: what the POD alone can represent of it."""

from __future__ import annotations

import torch

from podiff.baselines.base import BaselineEntry, Deterministic
from podiff.data.resample import upsample
from podiff.data.standardise import unstandardise


class PODProjectionBaseline(Deterministic):
    """The upsampled input projected on a pipeline's POD (``fit`` needs a fitted pipeline)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def fit(self, lr=None, hr=None, **_) -> PODProjectionBaseline:
        if self.pipeline.pod is None:
            raise RuntimeError("PODProjectionBaseline needs a fitted pipeline (its POD and data scaling)")
        return self

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        return pod_projection(self.pipeline, lr)


def pod_projection(pipeline, lr: torch.Tensor) -> torch.Tensor:
    """The bicubic-upsampled input encoded and decoded by the pipeline's POD, in data units (for a
    residual pipeline: ``μ(lr)`` plus the POD projection of the upsampled input's departure from it)."""
    lr = lr.to(pipeline.device)
    if pipeline.mean_model is None:
        tokens = pipeline.condition_tokens(lr)[..., : pipeline.pod.rank]  # without the covariate features
        return unstandardise(pipeline.pod.decode(tokens), pipeline.offset, pipeline.data_scale).to(lr.device)
    mu = pipeline.mean_model.predict(lr)
    departure = upsample(pipeline.target_input(lr), mu.shape[-2:]) - mu
    tokens = pipeline.pod.encode(pipeline.standardise(departure))
    return unstandardise(pipeline.pod.decode(tokens), pipeline.offset, pipeline.data_scale) + mu


ENTRY = BaselineEntry("pod_projection", make=lambda pipe: PODProjectionBaseline(pipe).fit())

__all__ = ["ENTRY", "PODProjectionBaseline", "pod_projection"]
