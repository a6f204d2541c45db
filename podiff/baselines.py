"""Baselines, so that comparisons are one call each.

Every baseline has ``fit(lr, hr)`` and ``sample(lr, num_samples=...)`` returning a
``SampleOutput`` like the pipeline's (deterministic ones: zero variance, identical members),
and ``predict(lr)`` for the point estimate.

- ``bicubic(lr, scale)``: bicubic upsampling (masked pixels filled first, NaN again after).
- ``pod_projection(pod, lr, scale, ...)``: the upsampled input projected on the POD (what the
  POD alone can represent of it).
- ``RidgeBaseline``: a learned linear map from the upsampled neighbourhood of each patch
  (a ``(p + 2·margin)``² window) to the HR patch, shared over locations, fitted in closed form
  from streaming normal equations; predictions overlap-average like the POD decoder.
  It is ``patch_encode`` with the ridge weights as the basis, then ``patch_decode`` with the
  identity.
- Pixel-space diffusion: ``PODiffPipeline(config, pod=PatchPOD.identity(...))`` — the same
  ViT on identity "modes" (``r = D``); see ``pixel_space_pipeline``.
- Global POD: one basis over the whole field with an MLP denoiser; see ``global_pod_pipeline``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

import podiff_kernels as pk

from .pipeline import PipelineConfig, PODiffPipeline, SampleOutput, upsample
from .global_pod import GlobalPOD
from .pod import PatchPOD
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
    """The bicubic-upsampled input encoded and decoded by the pipeline's POD, in data units."""
    tokens = pipeline.condition_tokens(lr.to(pipeline.device))
    out = unstandardise(pipeline.pod.decode(tokens), pipeline.offset, pipeline.data_scale)
    return out.to(lr.device)


class RidgeBaseline(_Deterministic):
    """Ridge regression from an upsampled ``(p + 2m)``-pixel window to the ``p×p`` HR patch.

    ``fit(lr, hr)`` accumulates ``XᵀX`` and ``XᵀY`` over all patches (float64, in image chunks),
    solves ``(XᵀX + α·tr(XᵀX)/d·I) W = XᵀY``; ``predict(lr)`` returns ``[N, C, H, W]``.
    """

    def __init__(self, scale: int, patch_size: int = 4, margin: int = 2, alpha: float = 1e-3):
        self.scale, self.p, self.m, self.alpha = int(scale), int(patch_size), int(margin), float(alpha)
        self.weights = self.bias = None

    def _features(self, lr: torch.Tensor):
        up = upsample(lr, (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale))
        H, W = up.shape[-2:]
        Hc, Wc = -(-H // self.p) * self.p, -(-W // self.p) * self.p  # cover with stride p
        padded = F.pad(up, (self.m, self.m + Wc - W, self.m, self.m + Hc - H), mode="replicate")
        return padded, (H, W), (Hc, Wc)

    def _patches(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return F.unfold(x, size, stride=self.p).transpose(1, 2).reshape(-1, x.shape[1] * size * size)

    def fit(self, lr: torch.Tensor, hr: torch.Tensor, chunk: int = 64) -> "RidgeBaseline":
        xtx = xty = sx = sy = None
        n = 0
        for i in range(0, lr.shape[0], chunk):
            feats, (H, W), (Hc, Wc) = self._features(lr[i : i + chunk])
            target = F.pad(hr[i : i + chunk], (0, Wc - W, 0, Hc - H), mode="replicate")
            X = self._patches(feats, self.p + 2 * self.m).double()
            Y = self._patches(target, self.p).double()
            keep = torch.isfinite(Y).all(1) & torch.isfinite(X).all(1)
            X, Y = X[keep], Y[keep]
            if xtx is None:
                xtx, xty = X.T @ X, X.T @ Y
                sx, sy = X.sum(0), Y.sum(0)
            else:
                xtx, xty, sx, sy = xtx + X.T @ X, xty + X.T @ Y, sx + X.sum(0), sy + Y.sum(0)
            n += X.shape[0]
        if n < 2:
            raise ValueError("ridge fit: no patch without masked pixels")
        mx, my = sx / n, sy / n
        cxx = xtx - n * torch.outer(mx, mx)
        cxy = xty - n * torch.outer(mx, my)
        d = cxx.shape[0]
        reg = self.alpha * torch.trace(cxx) / d
        self.weights = torch.linalg.solve(cxx + reg * torch.eye(d, dtype=torch.float64), cxy)  # [d_in, D]
        self.bias = my - mx @ self.weights
        return self

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("RidgeBaseline is not fitted; call fit(lr, hr)")
        feats, (H, W), (Hc, Wc) = self._features(lr)
        k = self.p + 2 * self.m
        C = lr.shape[1]
        dtype = lr.dtype
        # patch_encode with the ridge weights as a "basis" gives each location's predicted patch.
        coeffs = pk.patch_encode(feats.nan_to_num(), self.weights.to(dtype), None, k, self.p)  # N, L, D
        coeffs = coeffs + self.bias.to(dtype)
        D = C * self.p * self.p
        out = pk.patch_decode(coeffs, torch.eye(D, dtype=dtype), None, (Hc, Wc), self.p, self.p)
        out = out[..., :H, :W]
        masked = F.interpolate(torch.isnan(lr).float(), size=(H, W), mode="nearest") > 0
        return out.masked_fill(masked, float("nan"))


def pixel_space_pipeline(config: PipelineConfig, image_size, channels: int = 1) -> PODiffPipeline:
    """The same pipeline on the identity basis (pixel-space diffusion, ``r = C·p·p``)."""
    pod = PatchPOD.identity(config.patch_size, channels, image_size, stride=config.stride)
    return PODiffPipeline(replace(config, rank=None, energy=None), pod=pod)


def global_pod_pipeline(config: PipelineConfig, image_size=None) -> PODiffPipeline:
    """One POD basis over the whole field (``GlobalPOD``, by snapshots) and an MLP denoiser (one token)."""
    pod = GlobalPOD(rank=config.rank, energy=config.energy)
    return PODiffPipeline(replace(config, basis="shared", denoiser_kind="mlp"), pod=pod)
