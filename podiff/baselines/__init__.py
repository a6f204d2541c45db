"""Baselines, so that comparisons are one call each, and their registry.

- ``bicubic(lr, scale)`` / ``BicubicBaseline``: bicubic upsampling.
- ``PODProjectionBaseline`` / ``pod_projection``: the upsampled input projected on the POD.
- ``RidgeBaseline`` (``ridge``): ridge regression from each LR ``k×k`` neighbourhood to its HR
  ``s×s`` block, shared or per-location weights; ``RidgeBaseline.tuned`` chooses ``k``, the
  placement and the penalty on validation fields (``mean.ridge``; also a residual model's ``μ``).
- ``RegressionBaseline`` (``regression``): the same ViT trained with MSE to predict the POD
  tokens (the regression half of a CorrDiff-style model).
- ``UNetBaseline`` (``unet``): a U-Net regression from the upsampled input and covariates to
  the field (CorrDiff's regression stage), trained with early stopping like the regression ViT.
- Ablations of the model (``baselines.ablations``): pixel-space diffusion on the identity basis
  (``pixel_space_pipeline``) and one global POD with an MLP denoiser (``global_pod_pipeline``).

``BASELINES``: every baseline the reports compare with, by name, in report order (a
``base.BaselineEntry`` each). ``podiff train`` fits and saves those with ``fit``;
``podiff evaluate`` loads them, makes those with ``make`` from the model, and scores them all.
``ErrorSpread`` (``baselines.calibrated``): a baseline's per-pixel spread and error shape from its
held-out errors, which makes it a calibrated probabilistic forecast in the reports.
A new baseline is one file with an ``ENTRY`` and one line here.
"""

from podiff.baselines import bicubic as _bicubic
from podiff.baselines import pod_projection as _pod_projection
from podiff.baselines import regression as _regression
from podiff.baselines import ridge as _ridge
from podiff.baselines import unet as _unet
from podiff.baselines.ablations import global_pod_pipeline, pixel_space_pipeline
from podiff.baselines.base import BaselineEntry, Deterministic
from podiff.baselines.bicubic import BicubicBaseline, bicubic
from podiff.baselines.calibrated import ErrorSpread
from podiff.baselines.pod_projection import PODProjectionBaseline, pod_projection
from podiff.baselines.regression import RegressionBaseline
from podiff.baselines.unet import UNetBaseline
from podiff.latent.global_pod import GlobalPOD
from podiff.mean.ridge import RidgeBaseline

BASELINES: dict[str, BaselineEntry] = {
    entry.name: entry
    for entry in (
        _bicubic.ENTRY,
        _pod_projection.ENTRY,
        _ridge.ENTRY,
        _regression.ENTRY,
        _unet.ENTRY,
    )
}

__all__ = ["BASELINES", "BaselineEntry", "BicubicBaseline", "Deterministic", "ErrorSpread", "GlobalPOD",
           "PODProjectionBaseline", "RegressionBaseline", "RidgeBaseline", "UNetBaseline", "bicubic",
           "global_pod_pipeline", "pixel_space_pipeline", "pod_projection"]
