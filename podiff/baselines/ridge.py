"""The tuned ridge regression as a baseline (``mean.ridge.RidgeBaseline``; a residual model's own
mean model ``μ`` when it has one, else tuned on the validation fields as ``μ`` would be)."""

from __future__ import annotations

import time

from podiff.baselines.base import BaselineEntry
from podiff.mean.ridge import RidgeBaseline


def fit(pipe, lr, hr, validation, options, progress: bool):
    t0 = time.perf_counter()
    if pipe.mean_model is not None:
        ridge = pipe.mean_model.ridge
    elif validation is not None:
        ridge, _ = RidgeBaseline.tuned(pipe.config.scale, lr.cpu(), hr.cpu(), *(t.cpu() for t in validation))
    else:
        ridge = RidgeBaseline(pipe.config.scale).fit(lr.cpu(), hr.cpu())
    return ridge, {"describe": ridge.describe(), "seconds": time.perf_counter() - t0,
                   "tuned_on_validation": validation is not None}


def _save(ridge, path, info: dict) -> None:
    ridge.save(path, {"tuned_on_validation": info["tuned_on_validation"]})


ENTRY = BaselineEntry("ridge", fit=fit, load=lambda pipe, path: RidgeBaseline.load(path)[0], file="ridge.safetensors",
                      refit=lambda pipe, lr, hr: RidgeBaseline(pipe.config.scale).fit(lr, hr), save=_save)

__all__ = ["ENTRY", "RidgeBaseline"]
