"""The model's own ablations: the same pipeline in pixel space, and on one global POD basis."""

from __future__ import annotations

from dataclasses import replace

from podiff.config import PipelineConfig
from podiff.latent.global_pod import GlobalPOD
from podiff.latent.pod import PatchPOD
from podiff.model.pipeline import PODiffPipeline


def pixel_space_pipeline(config: PipelineConfig, image_size, channels: int = 1) -> PODiffPipeline:
    """The same pipeline on the identity basis (pixel-space diffusion, ``r = C·p·p``)."""
    pod = PatchPOD.identity(config.patch_size, channels, image_size, stride=config.stride)
    return PODiffPipeline(replace(config, rank=None, energy=None), pod=pod)


def global_pod_pipeline(config: PipelineConfig, image_size=None) -> PODiffPipeline:
    """One POD basis over the whole field (``GlobalPOD``, by snapshots) and an MLP denoiser (one token)."""
    pod = GlobalPOD(rank=config.rank, energy=config.energy)
    return PODiffPipeline(replace(config, basis="shared", denoiser_kind="mlp"), pod=pod)


__all__ = ["global_pod_pipeline", "pixel_space_pipeline"]
