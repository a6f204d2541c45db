"""Sampling a domain other than the training grid: what binds a fitted model to its grid, and the
model's view of another domain.

A model samples any domain (larger, smaller or offset; ``PODiffPipeline.sample`` takes an input of
any size then) when nothing in it is fitted per location of the training grid:

- a shared POD basis (a local basis holds one basis per patch location) — ``PatchPOD.on_domain``;
- a denoiser without the grid's position (``position_embedding="none"``: the position a model
  needs comes from the coordinates, ``--position``) and with windowed attention (global attention
  over a larger domain spreads each token's attention over tokens it never saw together);
- a mean model without per-location parts: a shared ridge (not per-location weights), a U-Net
  without learned position maps, and a condition that is not the anomaly from the training
  mean of ``μ`` per pixel (``condition="detail"``, or no residual).

The data scaling, the covariates' scaling, the grid-correlated noise (``GridCorrelation.on_grid``),
the calibration and the physical bounds hold for every place. The closed-form mean and variance
stay exact: ``decode_moments`` of the domain's own patch grid.

>>> from podiff.model.domain import domain_limits
>>> # domain_limits(pipe) -> [] when pipe samples any domain, else one line per binding part
"""

from __future__ import annotations

import copy

import torch

from podiff.latent.pod import PatchPOD


def domain_limits(pipe) -> list[str]:
    """What binds the fitted ``pipe`` to its training grid, one phrase each (empty: it samples any
    domain)."""
    H, W = pipe.image_size
    grid = f"the {H}×{W} training grid"
    limits = []
    pod = pipe.pod
    if not isinstance(pod, PatchPOD):
        limits.append(f"a global POD (one token for the whole of {grid})")
    elif pod.local:
        limits.append(f"a local POD basis (one per patch location of {grid})")
    config = getattr(pipe.denoiser, "config", None)
    if config is not None and isinstance(pod, PatchPOD) and not pod.local:
        if config.position_embedding != "none":
            limits.append(f"the denoiser's {config.position_embedding} position embedding of {grid}")
        if not config.window:
            limits.append("the denoiser's global attention")
    mean = pipe.mean_model
    if mean is not None:
        if mean.unet is None and mean.ridge.per_location:
            limits.append(f"the ridge's per-location weights on {grid}")
        if mean.unet is not None and mean.unet.position_channels:
            limits.append(f"the U-Net's learned position maps of {grid}")
        if pipe.config.resolved_condition == "anomaly":
            limits.append(f"the condition's training mean per pixel of {grid}")
    return limits


def valid_pixels_of(lr: torch.Tensor, channels: int, scale: int) -> torch.Tensor:
    """``[C, H, W]`` bool: the high-resolution pixels under an input cell of ``lr [B, C + K, h, w]``'s
    first ``channels`` channels that holds data in at least one field."""
    finite = ~torch.isnan(lr[:, :channels]).all(0)
    return finite.repeat_interleave(scale, -2).repeat_interleave(scale, -1).cpu()


def for_domain(pipe, image_size, valid_pixels: torch.Tensor | None = None):
    """``pipe`` on high-resolution fields of ``image_size = (H, W)``: a view sharing every weight,
    whose POD, token grid and noise are the domain's (``pipe`` itself for its own grid and mask).
    ``valid_pixels [C, H, W]`` (None: all). Anything fitted per location of the training grid is a
    one-line error naming it (``domain_limits``)."""
    size = tuple(int(n) for n in image_size)
    if size == tuple(pipe.image_size) and valid_pixels is None:
        return pipe
    s = pipe.config.scale
    if len(size) != 2 or min(size) < 1 or size[0] % s or size[1] % s:
        raise ValueError(f"image_size must be (H, W), each a multiple of the scale {s}; got {tuple(image_size)}")
    limits = domain_limits(pipe)
    if limits and size != tuple(pipe.image_size):
        raise ValueError(f"this model samples only {pipe.image_size[0]}×{pipe.image_size[1]} fields, not "
                         f"{size[0]}×{size[1]}: it holds " + "; ".join(limits)
                         + " (a model trained with domain='any', podiff train --domain any, samples any domain)")
    view = copy.copy(pipe)
    view.pod = pipe.pod.on_domain(size, valid_pixels)
    view.image_size = size
    return view


__all__ = ["domain_limits", "for_domain", "valid_pixels_of"]
