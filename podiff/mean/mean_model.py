"""Residual diffusion (CorrDiff-style): a deterministic mean model, and diffusion of what it misses.

The high-resolution field is ``x = μ(lr) + ρ``. ``μ`` is chosen by ``PipelineConfig.residual``:
``"ridge"``, a ``RidgeBaseline`` tuned on the validation fields (``RidgeBaseline.tuned``; fixed
defaults without them); ``"unet"``, a U-Net regression (``mean.unet.UNetBaseline``, CorrDiff's
regression stage) trained with early stopping on them; ``"auto"`` (the default), the ridge
unless the U-Net is better on the validation fields by a one-sided paired t-test on their
per-field MSE at the 5 % level (``LEVEL``; the guard the ridge's own flexible fits pass: on a few
validation fields a lower RMSE is often selection noise, and the ridge refits exactly and
cheaply; without validation fields, the ridge). The POD, the scaling and the diffusion model are fitted to the residual
``ρ``. The condition is ``μ(lr)``'s anomaly (minus its training mean per pixel) encoded on the
residual POD, each mode scaled to unit RMS over the training fields; with
``PipelineConfig(condition="detail")`` it is instead what ``μ`` adds below the input grid
(``μ`` minus the bicubic upsampling of its own block means), which no change of level or
large-scale trend moves. The ensemble is
``μ(lr) + ρ_m``: its mean is ``μ(lr) + mean(ρ)``, its variance the residual's, both still in
closed form. If the diffusion learned nothing the ensemble mean would be the ridge's; what it
learns of the residual is what podiff adds.

The residuals the diffusion learns are out-of-sample where that is cheap: the ridge's are
out-of-fold (five contiguous folds); the U-Net's are its in-sample errors after early stopping
(five more trainings would cost more than the denoiser's), smaller than its errors on new
fields, which the spread calibration on the validation fields then accounts for.

``MeanModel`` holds ``μ`` and the condition statistics and saves them beside the model (a U-Net
``μ`` in ``mean_unet.safetensors`` next to it). The tuned ridge is kept either way: it is the
ridge baseline, and the refit's error ratio is measured with it (``fitting.refit``).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from podiff.core.io import load_tensors, save_tensors
from podiff.evaluation import metrics
from podiff.mean.ridge import RidgeBaseline
from podiff.mean.training import continue_on_all
from podiff.mean.unet import UNetBaseline

FORMAT = "podiff.MeanModel"
#: ``residual="auto"`` takes the U-Net only when a one-sided paired t-test finds it better at this level.
LEVEL = 0.05
#: The regressors each ``residual`` choice considers.
CANDIDATES = {"auto": ("ridge", "unet"), "ridge": ("ridge",), "unet": ("unet",)}
UNET_FILE = "mean_unet.safetensors"


class MeanModel:
    """``μ(lr)``: the tuned ridge, or a U-Net (``unet``) when chosen, and the statistics of the
    condition it gives. ``choice``: how it was chosen (``regressor``, each candidate's
    validation RMSE, the ridge's settings). ``unet_candidate``: ``(UNetBaseline, info)`` of a
    U-Net fitted while choosing (chosen or not; the U-Net baseline reuses it), not saved."""

    def __init__(self, ridge: RidgeBaseline, choice: dict | None = None, unet: UNetBaseline | None = None):
        self.ridge = ridge
        self.unet = unet
        self.choice = choice or {}
        self.unet_candidate: tuple | None = None
        self.cond_mean: torch.Tensor | None = None  # [C, H, W], data units
        self.cond_scale: torch.Tensor | None = None  # [r] or [L, r]

    @property
    def regressor(self) -> str:
        return "unet" if self.unet is not None else "ridge"

    @classmethod
    def fit(cls, scale: int, lr, hr, validation=None, covariates: int = 0, residual: str = "ridge", *,
            steps: int = 2000, eval_every: int = 50, patience: int | None = 8, seed: int = 0,
            progress: bool = False, unet: dict | None = None,
            placements=("shared", "per-location", "pooled")) -> MeanModel:
        """The ridge tuned on ``validation = (lr_val, hr_val)`` when given (fitted on ``lr, hr``
        only; ``covariates``: the input's last channels that are covariates), and, for
        ``residual`` ``"unet"`` or ``"auto"``, a U-Net trained on ``lr, hr`` for at most
        ``steps`` with early stopping on ``validation`` every ``eval_every`` steps (``patience``),
        seeded by ``seed`` (``unet``: its other settings, ``width``, ``depth``, ``position_channels``
        and ``learning_rate``; the defaults else); then the choice (``CANDIDATES``, ``LEVEL``).
        ``placements``: the ridge's candidate weights (``RidgeBaseline.tuned``; ``("shared",)`` for
        a model of any domain)."""
        if residual not in CANDIDATES:
            raise ValueError(f"residual must be one of {', '.join(map(repr, CANDIDATES))}; got {residual!r}")
        if validation is not None:
            ridge, table = RidgeBaseline.tuned(scale, lr, hr, *validation, covariates=covariates,
                                               placements=tuple(placements))
            best = next(row for row in table if row["chosen"])
            choice = {"tuned_on_validation": True, **best, "candidates": len(table)}
        else:
            ridge = RidgeBaseline(scale, covariates=covariates).fit(lr, hr)
            choice = {"tuned_on_validation": False}
        candidates = CANDIDATES[residual] if validation is not None or residual == "unet" else ("ridge",)
        if "unet" not in candidates:
            return cls(ridge, {**choice, "regressor": "ridge"})
        t0 = time.perf_counter()
        settings = dict(unet or {})
        rate = settings.pop("learning_rate", 1e-3)
        unet = UNetBaseline(scale, hr.shape[1], seed=seed, **settings).fit(
            lr, hr, validation, steps=steps, eval_every=eval_every, patience=patience, progress=progress,
            learning_rate=rate)
        about = {"steps": unet.steps, "best_step": unet.best_step, "seconds": time.perf_counter() - t0}
        chosen = "unet"
        if validation is not None:
            from scipy import stats

            lr_val, hr_val = (t.detach().cpu().double() for t in validation)
            ridge_pred, unet_pred = ridge.predict(lr_val), unet.predict(lr_val.float()).double()
            ridge_mse, unet_mse = _field_mse(ridge_pred, hr_val), _field_mse(unet_pred, hr_val)
            p = (float(stats.ttest_rel(ridge_mse, unet_mse, alternative="greater").pvalue)
                 if len(ridge_mse) >= 2 else 1.0)
            choice.update(ridge_val_rmse=metrics.rmse(ridge_pred, hr_val),
                          unet_val_rmse=metrics.rmse(unet_pred, hr_val),
                          unet_better_p=p if p == p else 1.0)  # NaN (no difference at all): not better
            if "ridge" in candidates and not choice["unet_better_p"] < LEVEL:
                chosen = "ridge"
        model = cls(ridge, {**choice, "regressor": chosen}, unet if chosen == "unet" else None)
        model.unet_candidate = (unet, about)
        return model

    def refitted(self, lr: torch.Tensor, hr: torch.Tensor, held_out: int = 0) -> MeanModel:
        """A mean model with the same settings fitted on ``lr, hr`` (every field, once the
        settings were chosen on held-out ones; ``held_out``: how many of the last ones were),
        keeping the condition statistics the denoiser was trained with: the ridge refitted
        exactly, a U-Net continued from its best weights for the steps the held-out fields add
        at its chosen steps per field (``mean.training.continue_on_all``). ``choice["refitted_fields"]``
        says on how many fields (``choice["unet_refit"]``: the U-Net's continuation)."""
        ridge = RidgeBaseline(**self.ridge.settings()).fit(lr.detach().cpu().double(), hr.detach().cpu().double())
        choice = {**self.choice, "refitted_fields": int(lr.shape[0])}
        unet = None
        if self.unet is not None:  # a copy: the held-out fit stays as it was (its held-out scores are taken)
            n = lr.shape[0] - int(held_out)
            unet, choice["unet_refit"] = continue_on_all(copy.deepcopy(self.unet), lr[:n], hr[:n], (lr[n:], hr[n:]))
        model = MeanModel(ridge, choice, unet)
        model.cond_mean, model.cond_scale = self.cond_mean, self.cond_scale
        return model

    def out_of_fold(self, lr: torch.Tensor, hr: torch.Tensor, folds: int = 5) -> torch.Tensor:
        """``μ``'s predictions of its own training fields, each fold (contiguous, in order) by a
        ridge with the same settings fitted on the other folds: the residuals the diffusion learns
        are then out-of-sample errors, as at test time, not the smaller in-sample ones. A U-Net
        ``μ``: its predictions (in sample, after early stopping)."""
        if self.unet is not None:
            return self.predict(lr)
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
        """``μ(lr)`` ``[N, C, H, W]`` on ``lr``'s device and dtype (the ridge's computed on the CPU
        in float64, the U-Net's on the CPU in float32)."""
        if self.unet is not None:
            return self.unet.predict(lr.detach().cpu().float()).to(device=lr.device, dtype=lr.dtype)
        return self.ridge.predict(lr.detach().cpu().double()).to(device=lr.device, dtype=lr.dtype)

    def describe(self) -> str:
        if self.unet is not None:
            return f"U-Net (width {self.unet.width}, {self.unet.depth} levels; ridge {self.ridge.describe()} beside)"
        return self.ridge.describe()

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
        """``path`` (the ridge, the condition statistics, the choice) and, for a U-Net ``μ``,
        ``mean_unet.safetensors`` beside it."""
        if self.unet is not None:
            self.unet.save(Path(path).with_name(UNET_FILE))
        tensors = dict(self.ridge.tensors(), cond_mean=self.cond_mean, cond_scale=self.cond_scale)
        save_tensors(path, tensors, FORMAT, ridge=self.ridge.state(), choice=self.choice, regressor=self.regressor)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MeanModel:
        tensors, meta = load_tensors(path, FORMAT, "mean model")
        unet = UNetBaseline.load(Path(path).with_name(UNET_FILE)) if meta.get("regressor") == "unet" else None
        model = cls(RidgeBaseline.from_state(meta["ridge"], tensors), meta.get("choice"), unet)
        model.cond_mean, model.cond_scale = tensors["cond_mean"], tensors["cond_scale"]
        return model


def _field_mse(prediction: torch.Tensor, truth: torch.Tensor):
    """Each field's MSE over its valid pixels (a numpy array, for scipy)."""
    ok = ~torch.isnan(prediction) & ~torch.isnan(truth)
    squared = torch.where(ok, prediction - truth, 0.0).square().flatten(1).sum(1)
    return (squared / ok.flatten(1).sum(1).clamp_min(1)).numpy()


__all__ = ["CANDIDATES", "LEVEL", "MeanModel", "UNET_FILE"]
