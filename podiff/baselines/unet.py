"""The U-Net regression (``mean.unet.UNetBaseline``, CorrDiff's regression stage) as a baseline:
fitted by ``podiff train`` on the model's training fields with early stopping on its validation
fields, or, when the model's mean model considered it (``residual="auto"``/``"unet"``), that
same fit, then refitted on every field as the mean model is."""

from __future__ import annotations

import time

from podiff.baselines.base import BaselineEntry
from podiff.mean.training import continue_on_all
from podiff.mean.unet import UNet, UNetBaseline


def fit(pipe, lr, hr, validation, options, progress: bool):
    if not options.unet_baseline:
        return None, None
    candidate = pipe.mean_model.unet_candidate if pipe.mean_model is not None else None
    if candidate is not None:  # fitted already, on the same fields, when the mean model was chosen
        unet, about = candidate
        return unet, {**about, "shared_with_mean_model": True}
    t0 = time.perf_counter()
    unet = UNetBaseline(pipe.config.scale, hr.shape[1], seed=pipe.config.seed + 3).fit(
        lr, hr, validation, steps=pipe.config.train_steps, eval_every=options.eval_every,
        patience=options.patience or None, progress=progress)
    return unet, {"steps": unet.steps, "best_step": unet.best_step, "seconds": time.perf_counter() - t0}


def refit_on_all(unet, pipe, lr, hr, held_out, options, progress: bool):
    """Continued on every field (``mean.training.continue_on_all``); the refitted mean model's own
    U-Net when the mean model is this U-Net (continued once)."""
    mean = pipe.mean_model
    if mean is not None and mean.unet is not None and mean.choice.get("refitted_fields"):
        return mean.unet, dict(mean.choice.get("unet_refit", {}))
    return continue_on_all(unet, lr, hr, held_out, progress)


ENTRY = BaselineEntry("unet", fit=fit, load=lambda pipe, path: UNetBaseline.load(path), file="unet.safetensors",
                      refit_on_all=refit_on_all)

__all__ = ["ENTRY", "UNet", "UNetBaseline"]
