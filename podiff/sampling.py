"""Samplers: a diffusers-style scheduler whose ``step`` returns the previous sample.

``DiffusionScheduler(schedule, prediction="v", sampler="ddim", eta=0.0)``;
``set_timesteps(S)`` gives ``S + 1`` times from ``t_max`` down to 0, and
``step(model_output, t, s, sample, cond=None, generator=None)`` moves ``sample`` from
time ``t`` to the earlier time ``s``. Every coefficient comes from the schedule's log-SNR
at ``t`` and ``s`` (per token and mode for a learned schedule), in ratios computed in log
space (``1 − ᾱ_t/ᾱ_s = −expm1(log ᾱ_t − log ᾱ_s)``), so no step divides by a vanishing α:

- v-prediction: ``x̂_0 = α_t x_t − σ_t v``, ``ε̂ = σ_t x_t + α_t v`` — stable at zero SNR.
- ε-prediction: ``x̂_0 = (x_t − σ_t ε̂)/α_t``, used only for ``t <= t_max("epsilon")``
  (σ/α <= 10; see ``podiff.schedules``).

Samplers: ``"ddim"`` (η = ``eta``; 0 is deterministic) and ``"ancestral"`` (the DDPM
posterior ``q(x_s | x_t, x̂_0)``).

Noise comes from one ``generator``, or from ``RowNoise``: one seeded generator per chain row
(``member_seed(seed, image, member)``), so a member's sample does not depend on which other
rows share its batch — the same ensemble whatever the chunking or the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule


@dataclass
class SchedulerOutput:
    """``prev_sample`` at the earlier time; ``pred_original_sample`` is ``x̂_0``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def member_seed(seed: int, image: int, member: int) -> int:
    """A well-mixed 63-bit seed for one (image, member) chain (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(seed), int(image), int(member)]).generate_state(1, np.uint64)[0] >> 1)


class RowNoise:
    """Standard normal noise for a batch of chains, row ``i`` from its own generator seeded ``seeds[i]``.

    ``noise(shape, dtype)`` returns ``[len(seeds), *shape[1:]]`` on ``device``; each call advances
    every row's stream. The generators are CPU generators and the noise is moved: the same seeds
    give the same noise on every device (as diffusers' ``randn_tensor`` does).
    """

    def __init__(self, seeds, device=None, signs=None):
        self.device = torch.device(device or "cpu")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # signs: −1 rows are the mirror chain of a +1 row with the same seed (antithetic members).
        self.signs = None if signs is None else torch.tensor([float(v) for v in signs])
        if self.signs is not None and self.signs.numel() != len(self.generators):
            raise ValueError(f"signs must hold one value per seed ({len(self.generators)}); got {self.signs.numel()}")

    def __call__(self, shape, dtype=torch.float32) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"RowNoise has {len(self.generators)} rows; asked for shape {tuple(shape)}")
        rows = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators])
        if self.signs is not None:
            rows = rows * self.signs.to(dtype).view(-1, *([1] * (rows.dim() - 1)))
        return rows.to(self.device, non_blocking=True)


Noise = Callable[..., torch.Tensor]


def _generator_noise(generator: torch.Generator | None, device) -> Noise:
    """Noise from ``generator`` on its own device, moved to ``device`` (or from ``device``'s default RNG)."""
    source = generator.device if generator is not None else device
    return lambda shape, dtype: torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


class DiffusionScheduler:
    """Moves samples from ``t`` to ``s < t`` given the denoiser's output (see module doc)."""

    def __init__(self, schedule: NoiseSchedule, prediction: str = "v", sampler: str = "ddim", eta: float = 0.0):
        if prediction not in ("v", "epsilon"):
            raise ValueError(f"prediction must be 'v' or 'epsilon'; got {prediction!r}")
        if sampler not in ("ddim", "ancestral"):
            raise ValueError(f"sampler must be 'ddim' or 'ancestral'; got {sampler!r}")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1]; got {eta}")
        self.schedule, self.prediction, self.sampler, self.eta = schedule, prediction, sampler, float(eta)
        self.timesteps: torch.Tensor | None = None

    @property
    def stochastic(self) -> bool:
        """Whether a step adds noise: the ancestral sampler, or DDIM with η > 0."""
        return self.sampler == "ancestral" or self.eta > 0

    def set_timesteps(self, steps: int) -> torch.Tensor:
        """``steps + 1`` times, uniform from ``t_max`` to 0."""
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        self.timesteps = torch.linspace(self.schedule.t_max(self.prediction), 0.0, int(steps) + 1)
        return self.timesteps

    def predictions(self, model_output, x_t, lam_t):
        """``(x̂_0, ε̂)`` from the model output at log-SNR ``lam_t``."""
        alpha, sigma = torch.sigmoid(lam_t).sqrt(), torch.sigmoid(-lam_t).sqrt()
        if self.prediction == "v":
            return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output
        return (x_t - sigma * model_output) / alpha, model_output

    def step(self, model_output: torch.Tensor, t, s, sample: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> SchedulerOutput:
        """One step from time ``t`` to ``s`` (scalars or ``[B]``)."""
        noise = _generator_noise(generator, sample.device)
        return self._step(self.schedule, model_output, t, s, sample, cond, noise)

    def _step(self, schedule, model_output, t, s, sample, cond, noise: Noise) -> SchedulerOutput:
        B = sample.shape[0]
        t = torch.as_tensor(t, dtype=sample.dtype, device=sample.device).expand(B)
        s = torch.as_tensor(s, dtype=sample.dtype, device=sample.device).expand(B)
        lam_t = schedule.log_snr(t, cond).to(sample.dtype)
        lam_s = schedule.log_snr(s, cond).to(sample.dtype)
        x0, eps = self.predictions(model_output, sample, lam_t)
        # log ᾱ = log sigmoid(λ), log(1 − ᾱ) = log sigmoid(−λ): exact at both ends.
        log_ab_t, log_ab_s = F.logsigmoid(lam_t), F.logsigmoid(lam_s)
        alpha_s, sigma2_s = log_ab_s.mul(0.5).exp(), torch.sigmoid(-lam_s)
        sigma2_t = torch.sigmoid(-lam_t)
        one_minus_ratio = -torch.expm1(log_ab_t - log_ab_s)  # 1 − ᾱ_t/ᾱ_s = σ²_{t|s}/σ²_t·(...)
        if self.sampler == "ddim":
            var = (self.eta**2) * torch.where(sigma2_t > 0, sigma2_s / sigma2_t, torch.zeros_like(sigma2_t))
            var = var * one_minus_ratio
            direction = (sigma2_s - var).clamp_min(0).sqrt()
            prev = alpha_s * x0 + direction * eps
        else:
            # q(x_s | x_t, x0): mean = (α_{t|s} σ_s²/σ_t²) x_t + (α_s σ²_{t|s}/σ_t²) x0,
            # var = σ²_{t|s} σ_s²/σ_t², with σ²_{t|s}/σ_t² = 1 − (ᾱ_t/ᾱ_s)(1 − ᾱ_s)/(1 − ᾱ_t).
            alpha_ts = (0.5 * (log_ab_t - log_ab_s)).exp()
            frac = torch.where(sigma2_t > 0, sigma2_s / sigma2_t, torch.zeros_like(sigma2_t))
            cond_frac = 1 - (alpha_ts**2) * frac  # σ²_{t|s}/σ_t²
            prev = alpha_ts * frac * sample + alpha_s * cond_frac * x0
            var = cond_frac * sigma2_s
        if self.stochastic:  # decided by the sampler, not by reading var off the device
            prev = prev + var.clamp_min(0).sqrt() * noise(sample.shape, sample.dtype)
        return SchedulerOutput(prev, x0)

    @torch.no_grad()
    def sample(self, denoiser, cond: torch.Tensor, steps: int, generator: torch.Generator | None = None,
               noise_input: str = "time", noise: Noise | None = None) -> torch.Tensor:
        """Runs the whole chain for condition tokens ``cond [B, L, r_c]``; returns ``x_0 [B, L, r]``.

        Noise from ``noise(shape, dtype)`` (e.g. ``RowNoise``) when given, else from ``generator``.
        """
        times = self.set_timesteps(steps).to(cond.device)
        r = denoiser.config.rank
        bound = self.schedule.bind(cond)  # a learned schedule's weights, once per chain
        noise = noise or _generator_noise(generator, cond.device)
        x = noise((cond.shape[0], cond.shape[1], r), cond.dtype)
        for t, s in zip(times[:-1], times[1:]):
            tb = t.expand(cond.shape[0]).to(cond.dtype)
            level = tb if noise_input == "time" else bound.log_snr(tb, cond).expand(-1, -1, r)
            out = denoiser(x, cond, level).to(x.dtype)  # the updates stay float32 under autocast
            x = self._step(bound, out, t, s, x, cond, noise).prev_sample
        return x
