"""Residual diffusion (CorrDiff-style): a deterministic mean model, and diffusion of what it misses.

With ``PipelineConfig(residual="ridge")`` the high-resolution field is ``x = μ(lr) + ρ``: ``μ``
is a ``RidgeBaseline`` tuned on the validation fields (``RidgeBaseline.tuned``; fixed defaults
without them), and the POD, the scaling and the diffusion model are fitted to the residual
``ρ``. The condition is ``μ(lr)``'s anomaly (minus its training mean per pixel) encoded on the
residual POD, each mode scaled to unit RMS over the training fields; with
``PipelineConfig(condition="detail")`` it is instead what ``μ`` adds below the input grid
(``μ`` minus the bicubic upsampling of its own block means), which no change of level or
large-scale trend moves. The ensemble is
``μ(lr) + ρ_m``: its mean is ``μ(lr) + mean(ρ)``, its variance the residual's, both still in
closed form. If the diffusion learned nothing the ensemble mean would be the ridge's; what it
learns of the residual is what podiff adds.

``MeanModel`` holds ``μ`` and the condition statistics and saves them beside the model.
"""

from __future__ import annotations

import os

import torch

from podiff.core.io import load_tensors, save_tensors
from podiff.mean.ridge import RidgeBaseline

FORMAT = "podiff.MeanModel"


class MeanModel:
    """``μ(lr)`` (a ridge regression) and the statistics of the condition it gives."""

    def __init__(self, ridge: RidgeBaseline, choice: dict | None = None):
        self.ridge = ridge
        self.choice = choice or {}
        self.cond_mean: torch.Tensor | None = None  # [C, H, W], data units
        self.cond_scale: torch.Tensor | None = None  # [r] or [L, r]

    @classmethod
    def fit(cls, scale: int, lr, hr, validation=None, covariates: int = 0) -> MeanModel:
        """Tuned on ``validation = (lr_val, hr_val)`` when given (fitted on ``lr, hr`` only);
        ``covariates``: the input's last channels that are covariates (``RidgeBaseline``)."""
        if validation is not None:
            ridge, table = RidgeBaseline.tuned(scale, lr, hr, *validation, covariates=covariates)
            best = next(row for row in table if row["chosen"])
            return cls(ridge, {"tuned_on_validation": True, **best, "candidates": len(table)})
        return cls(RidgeBaseline(scale, covariates=covariates).fit(lr, hr), {"tuned_on_validation": False})

    def refitted(self, lr: torch.Tensor, hr: torch.Tensor) -> MeanModel:
        """A mean model with the same ridge settings fitted on ``lr, hr`` (every field, once the
        settings were chosen on held-out ones), keeping the condition statistics the denoiser
        was trained with; ``choice["refitted_fields"]`` says on how many fields."""
        ridge = RidgeBaseline(**self.ridge.settings()).fit(lr.detach().cpu().double(), hr.detach().cpu().double())
        model = MeanModel(ridge, {**self.choice, "refitted_fields": int(lr.shape[0])})
        model.cond_mean, model.cond_scale = self.cond_mean, self.cond_scale
        return model

    def out_of_fold(self, lr: torch.Tensor, hr: torch.Tensor, folds: int = 5) -> torch.Tensor:
        """``μ``'s predictions of its own training fields, each fold (contiguous, in order) by a
        ridge with the same settings fitted on the other folds: the residuals the diffusion learns
        are then out-of-sample errors, as at test time, not the smaller in-sample ones."""
        n = lr.shape[0]
        folds = max(2, min(int(folds), n))
        bounds = [round(i * n / folds) for i in range(folds + 1)]
        r = self.ridge
        out = torch.empty(hr.shape, dtype=torch.float64)
        lr64, hr64 = lr.detach().cpu().double(), hr.detach().cpu().double()
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            keep = torch.cat([torch.arange(0, a), torch.arange(b, n)])
            fold = RidgeBaseline(**r.settings()).fit(lr64[keep], hr64[keep])
            out[a:b] = fold.predict(lr64[a:b])
        return out.to(device=lr.device, dtype=lr.dtype)

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        """``μ(lr)`` ``[N, C, H, W]`` on ``lr``'s device and dtype (computed on the CPU in float64)."""
        return self.ridge.predict(lr.detach().cpu().double()).to(device=lr.device, dtype=lr.dtype)

    def condition_field(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction - self.cond_mean.to(prediction)

    def fit_condition(self, prediction: torch.Tensor, raw_tokens) -> None:
        """``cond_mean`` from the training predictions ``[N, C, H, W]``, then ``cond_scale`` from
        ``raw_tokens(prediction)`` (the encoded condition fields, ``[N, L, r]``; the function
        forms the anomaly itself)."""
        self.cond_mean = torch.nanmean(prediction.double(), 0).float().cpu()
        coeffs = raw_tokens(prediction)
        rms = coeffs.double().square().mean(0)  # [L, r]
        rms = rms.mean(0) if rms.dim() == 2 else rms
        self.cond_scale = rms.sqrt().clamp_min(1e-12).float().cpu()

    def to(self, device) -> MeanModel:
        self.cond_mean, self.cond_scale = self.cond_mean.to(device), self.cond_scale.to(device)
        return self

    # -------------------------------------------------------------- save / load

    def save(self, path: str | os.PathLike) -> None:
        tensors = dict(self.ridge.tensors(), cond_mean=self.cond_mean, cond_scale=self.cond_scale)
        save_tensors(path, tensors, FORMAT, ridge=self.ridge.state(), choice=self.choice)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MeanModel:
        tensors, meta = load_tensors(path, FORMAT, "mean model")
        model = cls(RidgeBaseline.from_state(meta["ridge"], tensors), meta.get("choice"))
        model.cond_mean, model.cond_scale = tensors["cond_mean"], tensors["cond_scale"]
        return model


__all__ = ["MeanModel"]
