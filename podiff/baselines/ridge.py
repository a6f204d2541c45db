"""The tuned ridge regression as a baseline (``mean.ridge.RidgeBaseline``; a residual model's own
mean model ``μ`` when it has one, else tuned on the validation fields as ``μ`` would be)."""

from __future__ import annotations

import time

import torch

from podiff.baselines.base import BaselineEntry
from podiff.mean.ridge import RidgeBaseline


def fit(pipe, lr, hr, validation, options, progress: bool):
    t0 = time.perf_counter()
    if pipe.mean_model is not None:
        ridge = pipe.mean_model.ridge
    elif validation is not None:
        ridge, _ = RidgeBaseline.tuned(pipe.config.scale, lr.cpu(), hr.cpu(), *(t.cpu() for t in validation),
                                       covariates=len(pipe.config.covariates))
    else:
        ridge = RidgeBaseline(pipe.config.scale, covariates=len(pipe.config.covariates)).fit(lr.cpu(), hr.cpu())
    return ridge, {"describe": ridge.describe(), "seconds": time.perf_counter() - t0,
                   "tuned_on_validation": validation is not None}


def refit_on_all(ridge, pipe, lr, hr, held_out, options, progress: bool):
    """The same settings on the training and held-out fields (a residual model's refitted mean model's
    ridge is that already)."""
    t0 = time.perf_counter()
    if pipe.mean_model is not None and pipe.mean_model.choice.get("refitted_fields"):
        refitted = pipe.mean_model.ridge
    else:
        lr_all, hr_all = (torch.cat([a.cpu(), b.cpu()]) for a, b in zip((lr, hr), held_out, strict=True))
        refitted = RidgeBaseline(**ridge.settings()).fit(lr_all, hr_all)
    return refitted, {"fields": int(lr.shape[0] + held_out[0].shape[0]), "seconds": time.perf_counter() - t0}


def _save(ridge, path, info: dict) -> None:
    ridge.save(path, {"tuned_on_validation": info["tuned_on_validation"]})


ENTRY = BaselineEntry("ridge", fit=fit, load=lambda pipe, path: RidgeBaseline.load(path)[0], file="ridge.safetensors",
                      refit=lambda pipe, lr, hr: RidgeBaseline(pipe.config.scale,
                                                                covariates=len(pipe.config.covariates)).fit(lr, hr),
                      save=_save,
                      refit_on_all=refit_on_all)

__all__ = ["ENTRY", "RidgeBaseline"]
