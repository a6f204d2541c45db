"""Training: the diffusion loss, the training noise and the ``Trainer`` loop.

``Trainer(pipe, device=...)`` owns what only training needs: the device the step runs on,
the optimiser, the batch/noise generator, DistributedDataParallel, bfloat16 autocast, the EMA
update and the checkpoints. ``PODiffPipeline.fit`` makes one; the model it trains (denoiser,
schedule, EMA copy) stays on the pipeline.

The step functions hold no data-dependent Python: ``Trainer.step`` reads no value off the
device, so it runs under ``FakeTensorMode`` on tensors of any device (the placement tests),
and on CUDA it queues work without a host sync. The loop around it syncs once a step for
the loss history and the NaN check.

Randomness is device independent: batch indices and noise are drawn from one CPU generator
seeded by ``config.seed`` and moved to the device, so a CUDA run sees the batches and noise
a CPU run sees, and a resumed run continues the same streams.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from podiff.core import distributed as distributed_
from podiff.core.io import atomic_write
from podiff.core.progress import log_line, progress_bar

CHECKPOINT_FORMAT = "podiff.PODiffPipeline.checkpoint"


def draw_noise(shape, t_max: float, generator: torch.Generator | None, device, dtype=torch.float32, colour=None):
    """Training noise for tokens of ``shape [B, L, r]``: ``t [B] ~ U(0, t_max)`` and ``ε ~ N(0, I)``,
    coloured by ``colour`` (e.g. a ``token_noise.GridCorrelation``) when given.

    Drawn on the generator's device (the CPU by default) and moved to ``device``.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.rand(shape[0], generator=generator, device=gen_device, dtype=dtype) * t_max
    eps = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    t, eps = t.to(device), eps.to(device)
    return t, (eps if colour is None else colour(eps))


def continuation_steps(best_step: int, n_train: int, n_held: int) -> int:
    """The steps that give the ``n_held`` new fields the chosen model's steps per field
    (``ceil(best_step · n_held / n_train)``)."""
    if n_train < 1 or n_held < 0 or best_step < 0:
        raise ValueError(f"need n_train >= 1, n_held >= 0 and best_step >= 0; got {n_train}, {n_held}, {best_step}")
    return math.ceil(best_step * n_held / n_train)


@dataclass
class TrainingRecord:
    """What a ``Trainer`` has done: ``step`` (optimiser steps so far, across resumes), ``history``
    (the loss of each step), ``val_history`` (``(step, EMA validation loss)`` pairs) and
    ``best_step`` (the step whose weights were kept; None without validation) and ``refit``
    (after a refit on every field, ``fitting.refit``: ``{"from_step", "steps", "fields"}``)."""

    step: int = 0
    history: list = field(default_factory=list)
    val_history: list = field(default_factory=list)
    best_step: int | None = None
    refit: dict | None = None


def diffusion_loss(x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, *, denoiser,
                   schedule, prediction_type: str, smoothness: float = 0.0,
                   geometry: dict | None = None) -> torch.Tensor:
    """The training loss for token batches ``x0, cond [B, L, r]`` at times ``t [B]`` with noise ``eps``.

    Fixed schedules: mean squared error of the ε- or v-prediction. Learned schedule: the
    continuous-time diffusion loss ``E[−λ'(t) ‖ε − ε̂‖²]`` per mode (normalised by
    ``λ_max − λ_min``) plus ``smoothness · E[(∂²λ/∂t²)²]``. ``geometry``: the tokens' ``grid`` and
    ``origin`` when they are not the model's own grid (a shifted grid, a crop), passed to the denoiser.
    """
    lam = schedule.log_snr(t, cond).to(x0.dtype)
    alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    x_t = alpha * x0 + sigma * eps
    level = t if denoiser.config.noise_input == "time" else lam.expand_as(x0)
    out = denoiser(x_t, cond, level, **(geometry or {})).to(x0.dtype)  # float32 again under autocast
    if not schedule.learned:
        target = alpha * eps - sigma * x0 if prediction_type == "v" else eps
        return F.mse_loss(out, target)
    eps_hat = sigma * x_t + alpha * out if prediction_type == "v" else out
    span = schedule.lambda_max - schedule.lambda_min
    weight = -schedule.dlog_snr_dt(t, cond) / span  # >= 0, mean about 1
    diffusion = (weight * (eps - eps_hat) ** 2).mean()
    return diffusion + smoothness * schedule.smoothness(t, cond) / span**2


class TrainingModule(nn.Module):
    """The denoiser and schedule with the training loss as ``forward`` (what DDP wraps)."""

    def __init__(self, denoiser: nn.Module, schedule: nn.Module, prediction_type: str, smoothness: float):
        super().__init__()
        self.denoiser, self.schedule = denoiser, schedule
        self.prediction_type, self.smoothness = prediction_type, float(smoothness)

    def forward(self, x0, cond, t, eps, geometry: dict | None = None):
        return diffusion_loss(x0, cond, t, eps, denoiser=self.denoiser, schedule=self.schedule,
                              prediction_type=self.prediction_type, smoothness=self.smoothness, geometry=geometry)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``, else nothing (devices without autocast too)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def rank_rows(batch: int, rank: int, world: int) -> slice:
    """This rank's rows of a global batch (equal shares, so DDP's gradient mean is the batch mean)."""
    if batch % world:
        raise ValueError(f"batch_size must be divisible by the world size {world}; got {batch}")
    return slice(rank * batch // world, (rank + 1) * batch // world)


class TokenTensors:
    """All training tokens in memory, ``x0 [N, L, r]`` and ``cond [N, L, r_c]`` (``r_c = r`` or more, with
    covariate features): the ``Trainer``'s usual token source. A source is anything with ``len()``
    and ``rows(idx) -> (x0 [B, L, r], cond [B, L, r_c])`` on the trainer's device
    (``fitting.StreamedTokens`` reads and encodes each batch instead). A source whose ``windows``
    (``latent.windows.TrainingWindows``) hold more than the fitted grid (shifted grids, crops:
    ``fitting.FieldTokens``) also takes ``rows(idx, window)``; the trainer draws one window per
    batch and places its tokens by ``windows.geometry(window) -> {"grid", "origin"}``."""

    def __init__(self, x0: torch.Tensor, cond: torch.Tensor):
        if x0.dim() != 3 or cond.dim() != 3 or x0.shape[:2] != cond.shape[:2]:
            raise ValueError(f"x0 and cond must be [N, L, r] and [N, L, r_c] with the same N and L; got "
                             f"{tuple(x0.shape)} and {tuple(cond.shape)}")
        self.x0, self.cond = x0, cond

    def __len__(self) -> int:
        return self.x0.shape[0]

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.x0.device)
        return self.x0[idx], self.cond[idx]


class Trainer:
    """Trains a built model's denoiser (and learned schedule) on its device.

    Args:
        pipe: a built model (``fitting.build``): its ``denoiser``, ``schedule``, ``ema``, ``config``,
            ``token_noise`` and ``training`` record (a ``TrainingRecord``, which the trainer
            advances) are used; it is moved to ``device``.
        device: where the step runs (default: the pipeline's device).
        amp: bfloat16 autocast; ``None`` means ``config.amp`` on CUDA and off elsewhere; ``True``
            forces it on any device (CPU autocast exercises the same code path).
        distributed: wrap the model in DistributedDataParallel over the default process group.
        ema_from: the step from which the EMA's warm-up counts (``decay = min(ema_decay,
            (1 + k) / (10 + k))``, ``k`` steps since): a continuation on new fields restarts it,
            so that its weights follow the continued training.
    """

    def __init__(self, pipe, *, device=None, amp: bool | None = None, distributed: bool = False,
                 ema_from: int = 0):
        cfg = pipe.config
        self.ema_from = int(ema_from)  # the EMA warms up from this step (a continuation restarts it)
        self.pipe = pipe
        self.device = torch.device(device) if device is not None else pipe.device
        pipe.to(self.device)
        self.amp = (cfg.amp and self.device.type == "cuda") if amp is None else bool(amp)
        self.distributed = bool(distributed)
        self.rank, self.world = distributed_.rank_world() if self.distributed else (0, 1)
        self.record: TrainingRecord = pipe.training
        self.colour = pipe.token_noise  # the grid-correlated noise map, None for white noise
        self.params = list(pipe.denoiser.parameters()) + list(pipe.schedule.parameters())
        # capturable keeps Adam's step count on the GPU: no host sync inside the step.
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=0.0,
                                           capturable=self.device.type == "cuda")
        self.generator = torch.Generator().manual_seed(cfg.seed)
        model = TrainingModule(pipe.denoiser, pipe.schedule, cfg.prediction_type, cfg.smoothness)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.best: dict | None = None  # {"step", "loss", weights} of the best validation evaluation

    # -------------------------------------------------------------- one step (no host sync)

    def batch(self, x0_all, cond_all: torch.Tensor | None, batch: int):
        """The next global batch ``(x0, cond, t, eps, geometry)``: indices, the window (for a source
        with ``windows``) and noise from the CPU generator, on the tokens' device.
        ``x0_all, cond_all``: all tokens ``[N, L, r]``, or a token source and ``None``. ``geometry``
        is None on the model's own grid, else the window's ``{"grid", "origin"}``."""
        source = TokenTensors(x0_all, cond_all) if cond_all is not None else x0_all
        return self._draw(source, batch, sharded=False)[:5]

    def noise(self, x0: torch.Tensor, generator: torch.Generator, schedule=None, grid=None):
        """``(t, ε)`` for tokens ``x0`` (on the model's grid, or on ``grid``): ``draw_noise`` with the
        model's noise colour."""
        schedule = schedule or self.pipe.schedule
        colour = self.colour if self.colour is None or grid is None else self.colour.on_grid(grid)
        return draw_noise(x0.shape, schedule.t_max(self.pipe.config.prediction_type), generator, x0.device,
                          x0.dtype, colour=colour)

    def owned_batch(self, source, batch: int):
        """``batch``'s draws (the same indices, window and noise) for a sharded source (``owns``): only
        the rows this rank holds are read. Returns ``(x0, cond, t, eps, geometry, share)`` with those
        rows and their share of the global batch."""
        return self._draw(source, batch, sharded=True)

    def _draw(self, source, batch: int, sharded: bool):
        """A global batch's draws from the generator — indices, then a window when the source has
        several (none otherwise: the stream is what it was without windows), then the noise — and
        its rows: all, or (``sharded``) those ``source.owns``. ``(x0, cond, t, eps, geometry, share)``."""
        idx = torch.randint(0, len(source), (batch,), generator=self.generator)
        windows = getattr(source, "windows", None)
        window = windows.draw(self.generator) if windows is not None and windows.count > 1 else None
        geometry = None if window is None or windows.is_fitted(window) else windows.geometry(window)
        own = source.owns(idx) if sharded else None
        rows = idx if own is None else idx[own]
        x0, cond = source.rows(rows) if window is None else source.rows(rows, window)
        t, eps = self.noise(x0.new_empty((batch, *x0.shape[1:])), self.generator,
                            grid=geometry["grid"] if geometry else None)
        if own is None:
            return x0, cond, t, eps, geometry, 1.0
        own = own.to(t.device)
        return x0, cond, t[own], eps[own], geometry, float(own.sum()) / batch

    def step(self, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             geometry: dict | None = None, weight: float | None = None) -> torch.Tensor:
        """One optimiser step on a batch; returns the loss as a tensor (not read off the device).
        ``weight``: the loss is scaled by it (a rank's share of a global batch it holds a part of,
        times the world size); a rank holding no row of the batch passes zero rows and weight 0 and
        still takes part in the gradient's reduction."""
        cfg = self.pipe.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * min(1.0, (self.record.step + 1) / max(1, cfg.warmup))
        if x0.shape[0] == 0:  # no row here: a zero-weighted stand-in keeps every parameter in the graph
            x0, cond = x0.new_zeros((1, *x0.shape[1:])), cond.new_zeros((1, *cond.shape[1:]))
            t, eps, weight = t.new_zeros(1), eps.new_zeros((1, *eps.shape[1:])), 0.0
        with autocast(self.device, self.amp):
            loss = self.model(x0, cond, t, eps, geometry)
        if weight is not None:
            loss = loss * weight
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.update_ema()
        return loss.detach()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def update_ema(self) -> None:
        pipe = self.pipe
        k = self.record.step - self.ema_from
        decay = min(pipe.config.ema_decay, (1 + k) / (10 + k))
        live = nn.ModuleList([pipe.denoiser, pipe.schedule])
        for e, p in zip(pipe.ema.parameters(), live.parameters(), strict=False):
            e.lerp_(p.detach(), 1 - decay)

    # -------------------------------------------------------------- the loop

    @torch.no_grad()
    def validation_loss(self, x0_val: torch.Tensor, cond_val: torch.Tensor, draws: int = 4) -> float:
        """The EMA model's loss on validation tokens ``[N, L, r]``, averaged over ``draws`` noise
        draws per field from a fixed generator: the same noise at every evaluation, so successive
        values differ only by the weights."""
        pipe, cfg = self.pipe, self.pipe.config
        denoiser, schedule = pipe.ema[0], pipe.ema[1]
        generator = torch.Generator().manual_seed(cfg.seed + 7919)
        was_training = denoiser.training
        denoiser.eval()
        total, count = 0.0, 0
        chunk = max(1, 4 * cfg.batch_size)
        with autocast(self.device, self.amp):
            for _ in range(draws):
                for i in range(0, x0_val.shape[0], chunk):
                    x0, cond = x0_val[i : i + chunk], cond_val[i : i + chunk]
                    t, eps = self.noise(x0, generator, schedule)
                    loss = diffusion_loss(x0, cond, t, eps, denoiser=denoiser, schedule=schedule,
                                          prediction_type=cfg.prediction_type, smoothness=cfg.smoothness)
                    total, count = total + float(loss) * x0.shape[0], count + x0.shape[0]
        denoiser.train(was_training)
        return total / count

    def fit(self, x0_all, cond_all: torch.Tensor | None, steps: int, *, progress: bool = True,
            checkpoint: str | Path | None = None, checkpoint_every: int = 200, resume: bool = True,
            log_every: int = 50, validation: tuple[torch.Tensor, torch.Tensor] | None = None,
            eval_every: int = 50, patience: int | None = 8) -> list[float]:
        """Trains on all tokens ``x0_all, cond_all [N, L, r]`` (or a token source, see
        ``TokenTensors``, and ``cond_all=None``) until ``record.step == steps``,
        or, with ``validation = (x0_val, cond_val)``, until the EMA model's validation loss
        (``validation_loss``, every ``eval_every`` steps) has not improved for ``patience``
        evaluations (None: never stop early). The weights of the best evaluation are kept and
        put back at the end (``record.best_step``); ``record.val_history`` holds ``(step, loss)``."""
        cfg, record = self.pipe.config, self.record
        if int(eval_every) < 1:
            raise ValueError(f"eval_every must be >= 1; got {eval_every}")
        if patience is not None and int(patience) < 1:
            raise ValueError(f"patience must be >= 1 or None; got {patience}")
        source = TokenTensors(x0_all.to(self.device), cond_all.to(self.device)) if cond_all is not None else x0_all
        if validation is not None:
            validation = (validation[0].to(self.device), validation[1].to(self.device))
            if validation[0].shape[0] == 0:
                raise ValueError("validation holds no fields; pass None to train without validation")
        batch = min(cfg.batch_size, len(source))
        sharded = self.distributed and hasattr(source, "owns")  # each rank reads only its fields
        rows = None if sharded else rank_rows(batch, self.rank, self.world)
        path = Path(checkpoint) if checkpoint is not None else None
        if path is not None and resume and path.is_file():
            self.restore(path)
        shown = progress and self.rank == 0
        bar = progress_bar(total=steps, initial=min(record.step, steps), enabled=shown, desc="train", unit="step")
        while record.step < steps and not self._stopped(patience):
            if sharded:
                x0, cond, t, eps, geometry, share = self.owned_batch(source, batch)
                loss = self.step(x0, cond, t, eps, geometry, weight=share * self.world)
            else:
                x0, cond, t, eps, geometry = self.batch(source, None, batch)  # every rank draws the global batch
                loss = self.step(x0[rows], cond[rows], t[rows], eps[rows], geometry)
            value = float(distributed_.all_sum(loss.float()) / self.world)
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value} at step {record.step}")
            record.step += 1
            record.history.append(value)
            bar.update(1)
            postfix = {}
            if record.step % log_every == 0:
                postfix["loss"] = f"{sum(record.history[-log_every:]) / log_every:.4f}"
            if validation is not None and (record.step % eval_every == 0 or record.step == steps):
                self._evaluate(*validation)
                postfix["val"] = f"{record.val_history[-1][1]:.4f}"
                postfix["best"] = f"{self.best['loss']:.4f}@{self.best['step']}"
            if postfix:
                bar.set_postfix(postfix)
                # in a log, no bar: one line per validation (or per log_every steps without one)
                if "val" in postfix or validation is None:
                    log_line(f"train step {record.step}/{steps}: " + ", ".join(f"{k} {v}" for k, v in postfix.items()),
                             enabled=shown)
            if path is not None and self.rank == 0 and (record.step % checkpoint_every == 0
                                                        or record.step == steps or self._stopped(patience)):
                state = self.state()
                atomic_write(path, lambda tmp, state=state: torch.save(state, tmp))
        bar.close()
        if self.best is not None and self.best["step"] != record.step:
            self._load_weights(self.best)
        if self.best is not None:
            record.best_step = self.best["step"]
        if self.distributed:
            distributed_.barrier()
        return record.history

    def _stopped(self, patience: int | None) -> bool:
        """No improvement in the last ``patience`` evaluations."""
        if patience is None or self.best is None:
            return False
        later = [s for s, _ in self.record.val_history if s > self.best["step"]]
        return len(later) >= int(patience)

    def _evaluate(self, x0_val: torch.Tensor, cond_val: torch.Tensor) -> None:
        record = self.record
        loss = self.validation_loss(x0_val, cond_val)
        record.val_history.append((record.step, loss))
        if self.best is None or loss < self.best["loss"]:
            self.best = {"step": record.step, "loss": loss, **self._weights()}

    def _weights(self) -> dict:
        copy = lambda module: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}  # noqa: E731
        pipe = self.pipe
        return {"denoiser": copy(pipe.denoiser), "schedule": copy(pipe.schedule), "ema": copy(pipe.ema)}

    def _load_weights(self, weights: dict) -> None:
        pipe = self.pipe
        pipe.denoiser.load_state_dict(weights["denoiser"])
        pipe.schedule.load_state_dict(weights["schedule"])
        pipe.ema.load_state_dict(weights["ema"])

    # -------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        pipe, record = self.pipe, self.record
        return {
            "format": CHECKPOINT_FORMAT, "step": record.step, "history": list(record.history),
            "denoiser": pipe.denoiser.state_dict(), "schedule": pipe.schedule.state_dict(),
            "ema": pipe.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(), "generator": self.generator.get_state(),
            "val_history": [list(v) for v in record.val_history], "best": self.best, "ema_from": self.ema_from,
        }

    def restore(self, path: Path) -> None:
        """Loads a checkpoint written on any device onto this trainer's device."""
        pipe, record = self.pipe, self.record
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a {CHECKPOINT_FORMAT}")
            pipe.denoiser.load_state_dict(state["denoiser"])
            pipe.schedule.load_state_dict(state["schedule"])
            pipe.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        except Exception as exc:
            raise ValueError(f"cannot resume from {path} (corrupted or from another model?): {exc}") from None
        torch.set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        record.step, record.history = int(state["step"]), list(state["history"])
        record.val_history = [(int(s), float(v)) for s, v in state.get("val_history", [])]
        self.best = state.get("best")


__all__ = ["TokenTensors", "Trainer", "TrainingRecord", "TrainingModule", "autocast", "continuation_steps",
           "diffusion_loss", "draw_noise",
           "rank_rows"]
