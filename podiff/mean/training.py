"""The loop a trained regression shares (the U-Net, also a mean model, and the regression ViT
baseline): ``train_regressor`` with early stopping (``BestWeights``), and ``continue_on_all``, the
continuation on every field once the held-out ones have chosen the steps."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

from podiff.diffusion.training import continuation_steps


class BestWeights:
    """Early stopping for a trained baseline: ``update(step, loss, model)`` appends to ``history``
    (the baseline's ``val_history``), keeps the weights of the lowest loss and says whether
    ``patience`` evaluations (None or 0: never) have passed without improvement; ``restore(model)``
    puts the best weights back and returns their step (None without an evaluation)."""

    def __init__(self, patience: int | None, history: list):
        self.patience, self.history, self.best = patience, history, None

    def update(self, step: int, loss: float, model) -> bool:
        self.history.append((step, loss))
        if self.best is None or loss < self.best[1]:
            self.best = (step, loss, copy.deepcopy(model.state_dict()))
            return False
        return bool(self.patience) and sum(1 for s, _ in self.history if s > self.best[0]) >= self.patience

    def restore(self, model) -> int | None:
        if self.best is None:
            return None
        model.load_state_dict(self.best[2])
        return self.best[0]


def train_regressor(model, batch_loss: Callable, first: int, last: int, *, learning_rate: Callable,
                    generator: torch.Generator, rows: int, batch: int, clip: float, validate: Callable | None = None,
                    eval_every: int = 50, patience: int | None = 8, history: list | None = None,
                    progress: bool = False, desc: str = "regression") -> tuple[int, int | None]:
    """The loop a trained baseline shares: steps ``first..last`` of AdamW on ``batch_loss(idx)`` (a
    batch of ``batch`` of the ``rows`` training rows drawn from ``generator``), the rate
    ``learning_rate(step)``, gradients clipped to ``clip``; with ``validate()`` (a validation loss)
    every ``eval_every`` steps, the best weights kept and early stopping (``BestWeights`` over
    ``history``; with ``progress``, a bar, or in a log one line per validation). Returns ``(last step
    run, best step or None)``; the model is left in eval mode."""
    from podiff.core.progress import log_line, progress_bar

    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate(first), weight_decay=0.0)
    best = BestWeights(patience, history if history is not None else [])
    model.train()
    step = first - 1
    for step in progress_bar(range(first, last + 1), enabled=progress, desc=desc, unit="step"):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step)
        idx = torch.randint(0, rows, (min(batch, rows),), generator=generator)
        with torch.enable_grad():  # a training step whatever the caller's context (a refit under no_grad)
            loss = batch_loss(idx)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimiser.step()
        if validate is not None and (step % eval_every == 0 or step == last):
            model.eval()
            with torch.no_grad():
                stop = best.update(step, validate(), model)
            model.train()
            # in a log, no bar: one line per validation
            log_line(f"{desc} step {step}/{last}: val {best.history[-1][1]:.4f}, best {best.best[1]:.4f}@"
                     f"{best.best[0]}", enabled=progress)
            if stop:
                break
    best_step = best.restore(model) if validate is not None else None
    model.eval()
    return step, best_step


def continue_on_all(baseline, lr, hr, held_out, progress: bool = False) -> tuple:
    """``refit_on_all`` for a trained baseline (``steps``, ``best_step``, ``continue_on``): continued on
    the training and held-out fields for the steps the held-out ones add at its chosen steps per field
    (``diffusion.training.continuation_steps``), as the diffusion model is. ``(baseline, info)``."""
    t0 = time.perf_counter()
    chosen = baseline.best_step if baseline.best_step is not None else baseline.steps
    steps = continuation_steps(chosen, lr.shape[0], held_out[0].shape[0])
    lr_all, hr_all = (torch.cat([a.cpu(), b.cpu()]) for a, b in zip((lr, hr), held_out, strict=True))
    baseline.continue_on(lr_all, hr_all, steps, progress=progress)
    return baseline, {"steps": steps, "fields": int(lr_all.shape[0]), "seconds": time.perf_counter() - t0}


__all__ = ["BestWeights", "continue_on_all", "train_regressor"]
