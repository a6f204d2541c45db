"""``RegressionBaseline``: the same ViT trained with MSE to predict the POD tokens.

The regression half of a CorrDiff-style model, and the deterministic twin of a trained
``PODiffPipeline``: it uses that pipeline's POD, data scaling, condition tokens and (for a
residual pipeline) mean model ``μ``, and a fresh ``PODDenoiser`` of the same configuration that
maps the condition tokens straight to the target tokens (its noisy-token input held at zero).
Training minimises the token MSE with AdamW, keeps the weights of the best validation MSE and
stops when it has not improved for ``patience`` evaluations, like the diffusion model's.

Example (``pipe`` trained)::

    reg = RegressionBaseline(pipe).fit(lr_train, hr_train, validation=(lr_val, hr_val))
    reg.predict(lr_test)                                     # [B, C, H, W], data units
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from podiff.baselines.base import BaselineEntry
from podiff.core.io import load_tensors, save_tensors
from podiff.core.sample_output import Deterministic
from podiff.data.standardise import unstandardise
from podiff.diffusion.denoiser import DenoiserConfig, PODDenoiser
from podiff.mean.training import continue_on_all, train_regressor

FORMAT = "podiff.RegressionBaseline"


class RegressionBaseline(Deterministic):
    """A ViT regressing the target tokens from the condition tokens of ``pipeline``."""

    def __init__(self, pipeline, denoiser_config: dict | None = None):
        if pipeline.denoiser is None:
            raise RuntimeError("RegressionBaseline needs a built pipeline (its POD, scaling and condition)")
        self.pipeline = pipeline
        config = denoiser_config or pipeline.denoiser.config.to_dict()
        torch.manual_seed(pipeline.config.seed + 1)
        self.model = PODDenoiser(DenoiserConfig(**config)).to(pipeline.device)
        self.steps = 0
        self.steps_refit = 0
        self.best_step: int | None = None
        self.val_history: list[tuple[int, float]] = []

    def _forward(self, cond: torch.Tensor) -> torch.Tensor:
        zeros = cond.new_zeros(*cond.shape[:2], self.model.config.rank)  # the condition may carry covariates too
        level = torch.zeros(cond.shape[0], device=cond.device) if self.model.config.noise_input == "time" else zeros
        return self.model(zeros, cond, level)

    def _tokens(self, lr, hr, out_of_fold: bool):
        pipe = self.pipeline
        lr, hr = lr.to(pipe.device), hr.to(pipe.device)
        mu = None
        if pipe.mean_model is not None and out_of_fold:
            mu = pipe.mean_model.out_of_fold(lr, hr)
        with torch.no_grad():
            return (pipe.target_tokens(hr, lr, mu).float(), pipe.condition_tokens(lr, mu).float())

    def fit(self, lr, hr, validation=None, *, steps: int = 2000, batch_size: int | None = None,
            learning_rate: float | None = None, eval_every: int = 50, patience: int | None = 8,
            progress: bool = False) -> RegressionBaseline:
        """Trains on the pipeline's training fields ``lr, hr`` (and validates on ``(lr_val, hr_val)``)."""
        x0, cond = self._tokens(lr, hr, out_of_fold=True)
        val = self._tokens(*validation, out_of_fold=False) if validation is not None else None
        return self._train(x0, cond, val, 1, steps, batch_size, learning_rate, eval_every, patience, progress)

    def continue_on(self, lr, hr, steps: int, *, batch_size: int | None = None, learning_rate: float | None = None,
                    progress: bool = False) -> RegressionBaseline:
        """``steps`` more steps from the current weights on ``lr, hr`` (e.g. every field, once the
        held-out ones have chosen the steps), without validation; ``steps_refit`` records them."""
        x0, cond = self._tokens(lr, hr, out_of_fold=True)
        start = self.steps + 1
        self._train(x0, cond, None, start, start + int(steps) - 1, batch_size, learning_rate, 1, None, progress,
                    warm=True)
        self.steps_refit = int(steps)
        return self

    def _train(self, x0, cond, val, first: int, last: int, batch_size, learning_rate, eval_every, patience,
               progress: bool, warm: bool = False) -> RegressionBaseline:
        cfg = self.pipeline.config
        rate = learning_rate or cfg.learning_rate

        def rate_at(step: int) -> float:
            return rate * (1.0 if warm else min(1.0, step / max(1, cfg.warmup)))

        def batch_loss(idx):
            idx = idx.to(x0.device)
            return F.mse_loss(self._forward(cond[idx]), x0[idx])

        self.steps, best_step = train_regressor(
            self.model, batch_loss, first, last, learning_rate=rate_at,
            generator=torch.Generator().manual_seed(cfg.seed + 1 + first),  # seed + 2 for a first fit
            rows=x0.shape[0], batch=batch_size or cfg.batch_size, clip=cfg.grad_clip or math.inf,
            validate=(lambda: float(F.mse_loss(self._forward(val[1]), val[0]))) if val is not None else None,
            eval_every=eval_every, patience=patience, history=self.val_history, progress=progress)
        if val is not None:
            self.best_step = best_step
        return self

    @torch.no_grad()
    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        pipe = self.pipeline
        lr = lr.to(pipe.device)
        tokens = self._forward(pipe.condition_tokens(lr).float())
        out = unstandardise(pipe.pod.decode(tokens), pipe.offset, pipe.data_scale)
        if pipe.mean_model is not None:
            out = out + pipe.mean_model.predict(lr).to(out)
        return out


    # -------------------------------------------------------------- save / load

    def save(self, path) -> None:
        """One safetensors file next to the pipeline it belongs to, written atomically."""
        save_tensors(path, self.model.state_dict(), FORMAT, denoiser=self.model.config.to_dict(), steps=self.steps,
                     best_step=self.best_step, val_history=[list(v) for v in self.val_history],
                     steps_refit=self.steps_refit)

    @classmethod
    def load(cls, path, pipeline) -> RegressionBaseline:
        tensors, meta = load_tensors(path, FORMAT, "regression baseline")
        model = cls(pipeline, meta["denoiser"])
        model.model.load_state_dict(tensors)
        model.model.to(pipeline.device).eval()
        model.steps, model.best_step = meta["steps"], meta["best_step"]
        model.steps_refit = int(meta.get("steps_refit", 0))
        model.val_history = [(int(a), float(b)) for a, b in meta["val_history"]]
        return model


__all__ = ["RegressionBaseline"]


def _fit(pipe, lr, hr, validation, options, progress: bool):
    if not options.regression_baseline:
        return None, None
    t0 = time.perf_counter()
    reg = RegressionBaseline(pipe).fit(lr, hr, validation, steps=pipe.config.train_steps, eval_every=options.eval_every,
                                       patience=options.patience or None, progress=progress)
    return reg, {"steps": reg.steps, "best_step": reg.best_step, "seconds": time.perf_counter() - t0}


ENTRY = BaselineEntry("regression", fit=_fit, load=lambda pipe, path: RegressionBaseline.load(path, pipe),
                      file="regression.safetensors",
                      refit_on_all=lambda reg, pipe, lr, hr, held_out, options, progress:
                      continue_on_all(reg, lr, hr, held_out, progress))
