"""Noise schedules in continuous time ``t ∈ [0, 1]`` (variance preserving).

``x_t = α_t x_0 + σ_t ε`` with ``α_t² = sigmoid(λ_t)``, ``σ_t² = sigmoid(−λ_t)``, where
``λ_t = log SNR(t)`` decreases from the clean end (``t = 0``) to the noise end (``t = 1``).
Every schedule returns ``λ`` shaped to broadcast against tokens ``[B, L, r]``: ``[B, 1, 1]``
for the fixed schedules, ``[B, L, r]`` for the learned one (per token and POD mode).

- ``CosineSchedule`` (default) and ``LinearSchedule`` (DDPM's β from 1e-4 to 0.02 over 1000
  steps, in continuous time) both end *exactly* at ``ᾱ(0) = 1`` and ``ᾱ(1) = 0`` (zero
  terminal SNR; the linear one rescaled as in Lin et al. 2024, "Common diffusion noise
  schedules and sample steps are flawed"). A sampler therefore starts from pure noise, and
  nothing divides by ``α_1``: the failure of a cosine schedule with β capped at 0.999
  (ᾱ_T ≈ 2e-9, whose DDIM step multiplies the denoiser's error by ~350) cannot happen.
  ε-prediction cannot use the zero-SNR end (``x̂_0 = (x_t − σ ε̂)/α`` divides by α = 0), so
  for it samplers and training stop at ``t_max("epsilon")``, where SNR = ``EPS_MIN_SNR``.
- ``LearnedSchedule`` (Conditional Variational Diffusion Models, Della Maggiora et al.):
  ``λ(t, k | c) = λ_max − (λ_max − λ_min) F(t; w(c)_k)``, with ``F`` a convex mixture of
  smooth increasing functions, each exactly 0 at t = 0 and 1 at t = 1, and mixture weights
  from a small network of the condition token ``c`` (never the target). Monotone in ``t``
  with exact end points for any parameters, by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

#: Where ε-prediction stops: SNR 1e-2, i.e. σ/α = 10 bounds the error amplification of x̂_0.
EPS_MIN_SNR = 1e-2


class NoiseSchedule(nn.Module):
    """Base class: ``log_snr(t, cond)``, ``alpha_sigma``, ``t_max``."""

    learned = False

    def log_snr(self, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor, cond: torch.Tensor | None = None):
        """``(α_t, σ_t)`` broadcastable to tokens, from ``λ`` without cancellation."""
        lam = self.log_snr(t, cond)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def bind(self, cond: torch.Tensor | None) -> NoiseSchedule:
        """The schedule for these condition tokens (a learned one precomputes its weights)."""
        return self

    def t_max(self, prediction_type: str) -> float:
        """Largest usable ``t``: 1 (zero SNR) for v-prediction; SNR = ``EPS_MIN_SNR`` for ε."""
        if prediction_type == "v":
            return 1.0
        cache = self.__dict__.setdefault("_t_max_cache", {})  # a constant of the schedule: bisect once
        if prediction_type not in cache:
            lo, hi = 0.0, 1.0  # log-SNR decreases in t: bisect for the SNR threshold
            target = math.log(EPS_MIN_SNR)
            for _ in range(60):
                mid = (lo + hi) / 2
                lam = self._scalar_log_snr(mid)
                lo, hi = (mid, hi) if lam > target else (lo, mid)
            cache[prediction_type] = lo
        return cache[prediction_type]

    def _scalar_log_snr(self, t: float) -> float:
        return float(self.log_snr(torch.tensor([t], dtype=torch.float64)).flatten()[0])


def _as_batch_time(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.reshape(-1, 1, 1) if t.dim() <= 1 else t


class CosineSchedule(NoiseSchedule):
    """``ᾱ(t) = cos²(π/2 · (t + s)/(1 + s)) / cos²(π/2 · s/(1 + s))`` (Nichol & Dhariwal), ``s = 0.008``."""

    def __init__(self, offset: float = 0.008):
        super().__init__()
        self.offset = float(offset)

    def log_snr(self, t, cond=None):
        t = _as_batch_time(t)
        s = self.offset
        angle = (math.pi / 2) * (t.double() + s) / (1 + s)
        alpha_bar = (angle.cos() ** 2 / math.cos(math.pi / 2 * s / (1 + s)) ** 2).clamp(0.0, 1.0)
        alpha_bar = torch.where(t >= 1, torch.zeros_like(alpha_bar), alpha_bar)  # cos(π/2) is 6e-17, not 0
        lam = torch.log(alpha_bar) - torch.log1p(-alpha_bar)
        return lam.to(t.dtype if t.is_floating_point() else torch.float32)


class LinearSchedule(NoiseSchedule):
    """DDPM's linear β (1e-4 to 0.02, T = 1000) in continuous time, rescaled to zero terminal SNR."""

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, steps: int = 1000):
        super().__init__()
        self.beta_start, self.beta_end, self.steps = float(beta_start), float(beta_end), int(steps)

    def _sqrt_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        integral = self.steps * (self.beta_start * t + 0.5 * (self.beta_end - self.beta_start) * t**2)
        return torch.exp(-0.5 * integral)

    def log_snr(self, t, cond=None):
        t = _as_batch_time(t)
        td = t.double()
        a = self._sqrt_alpha_bar(td)
        a1 = self._sqrt_alpha_bar(torch.ones((), dtype=torch.float64))
        a = ((a - a1) / (1 - a1)).clamp(0.0, 1.0)  # α(0) = 1, α(1) = 0 exactly
        alpha_bar = a**2
        lam = torch.log(alpha_bar) - torch.log1p(-alpha_bar)
        return lam.to(t.dtype if t.is_floating_point() else torch.float32)


# Rates of the exponential basis functions (1 − e^{−k t})/(1 − e^{−k}); k → 0 is t itself.
_RATES = (-8.0, -4.0, -1.5, 1.5, 4.0, 8.0)


class LearnedSchedule(NoiseSchedule):
    """Per-token, per-mode schedule ``λ(t, k | c)`` learned jointly with the denoiser.

    ``F(t) = Σ_j w_j B_j(t)``: ``B_j`` are ``t``, ``sin²(π t / 2)`` and exponentials
    ``(1 − e^{−k t})/(1 − e^{−k})``; each increases from exactly 0 to exactly 1, so ``F`` does for
    any softmax weights ``w(c)``. Initialised near the cosine-like ``sin²`` member.

    Args:
        rank: POD modes ``r``; cond_rank: width of a condition token (default ``rank``).
        hidden: width of the weight network. lambda_min, lambda_max: the end log-SNRs
            (defaults ±10: ``ᾱ(0) = 0.99995``, ``ᾱ(1) = 4.5e-5``).
    """

    learned = True

    def __init__(self, rank: int, cond_rank: int | None = None, hidden: int = 64,
                 lambda_min: float = -10.0, lambda_max: float = 10.0):
        super().__init__()
        if not lambda_min < lambda_max:
            raise ValueError(f"lambda_min must be < lambda_max; got {lambda_min}, {lambda_max}")
        self.rank, self.cond_rank = int(rank), int(cond_rank or rank)
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.num_basis = 2 + len(_RATES)
        self.net = nn.Sequential(nn.Linear(self.cond_rank, hidden), nn.SiLU(),
                                 nn.Linear(hidden, self.rank * self.num_basis))
        nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():  # start as the sin² (cosine-like) schedule for every mode
            bias = torch.full((self.rank, self.num_basis), -2.0)
            bias[:, 1] = 2.0
            self.net[-1].bias.copy_(bias.flatten())
        self.register_buffer("rates", torch.tensor(_RATES), persistent=False)

    def weights(self, cond: torch.Tensor) -> torch.Tensor:
        """Mixture weights ``[B, L, r, J]`` from condition tokens ``[B, L, cond_rank]``."""
        if cond is None:
            raise ValueError("a LearnedSchedule needs the condition tokens (cond=[B, L, r])")
        logits = self.net(cond).unflatten(-1, (self.rank, self.num_basis))
        return torch.softmax(logits, dim=-1)

    def _basis(self, t: torch.Tensor, order: int = 0) -> torch.Tensor:
        """``B_j(t)`` (or its ``order``-th derivative) ``[..., J]`` for ``t`` of any shape."""
        t = t[..., None]
        k = self.rates.to(t)
        scale = 1.0 / (-torch.expm1(-k))
        if order == 0:
            exps = -torch.expm1(-k * t) * scale
            return torch.cat([t, torch.sin(math.pi * t / 2) ** 2, exps], dim=-1)
        if order == 1:
            exps = k * torch.exp(-k * t) * scale
            return torch.cat([torch.ones_like(t), (math.pi / 2) * torch.sin(math.pi * t), exps], dim=-1)
        exps = -(k**2) * torch.exp(-k * t) * scale
        return torch.cat([torch.zeros_like(t), (math.pi**2 / 2) * torch.cos(math.pi * t), exps], dim=-1)

    def bind(self, cond: torch.Tensor | None) -> NoiseSchedule:
        """A view with the mixture weights of ``cond`` computed once (for the sampling loop)."""
        return _BoundLearned(self, self.weights(cond))

    def _mix(self, t: torch.Tensor, cond, order: int) -> torch.Tensor:
        w = cond.weights if isinstance(cond, _Weights) else self.weights(cond)  # B, L, r, J
        t = _as_batch_time(t).to(w.dtype)  # B, 1, 1
        return (w * self._basis(t, order)).sum(-1)  # basis B, 1, 1, J

    def log_snr(self, t, cond=None):
        frac = self._mix(t, cond, 0)
        return self.lambda_max - (self.lambda_max - self.lambda_min) * frac

    def dlog_snr_dt(self, t, cond=None):
        """``∂λ/∂t`` (≤ 0), analytic: the weight of the continuous-time diffusion loss."""
        return -(self.lambda_max - self.lambda_min) * self._mix(t, cond, 1)

    def smoothness(self, t, cond) -> torch.Tensor:
        """Mean of ``(∂²λ/∂t²)²`` over the given times and tokens (the CVDM regulariser)."""
        second = -(self.lambda_max - self.lambda_min) * self._mix(t, cond, 2)
        return second.pow(2).mean()

    def t_max(self, prediction_type: str) -> float:
        """1: λ_min is finite. ε-prediction needs λ_min >= log(EPS_MIN_SNR) (bounded σ/α)."""
        if prediction_type == "epsilon" and self.lambda_min < math.log(EPS_MIN_SNR) - 1e-9:
            raise ValueError(
                f"epsilon-prediction with a learned schedule needs lambda_min >= log({EPS_MIN_SNR}) = "
                f"{math.log(EPS_MIN_SNR):.3f} (x0 = (x_t - sigma*eps)/alpha amplifies errors by sigma/alpha); "
                f"got lambda_min={self.lambda_min}. Use v-prediction, or make_schedule('learned', ..., "
                f"prediction_type='epsilon')"
            )
        return 1.0


class _Weights:
    """Precomputed mixture weights standing in for the condition tokens."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights


class _BoundLearned(NoiseSchedule):
    learned = True

    def __init__(self, schedule: LearnedSchedule, weights: torch.Tensor):
        super().__init__()
        self.schedule, self._w = schedule, _Weights(weights)
        self.lambda_min, self.lambda_max = schedule.lambda_min, schedule.lambda_max

    def log_snr(self, t, cond=None):
        return self.schedule.log_snr(t, self._w)

    def dlog_snr_dt(self, t, cond=None):
        return self.schedule.dlog_snr_dt(t, self._w)

    def t_max(self, prediction_type: str) -> float:
        return self.schedule.t_max(prediction_type)


def _learned(rank: int | None, cond_rank: int | None, prediction_type: str) -> LearnedSchedule:
    if rank is None:
        raise ValueError("the learned schedule needs rank=r (POD modes)")
    lambda_min = math.log(EPS_MIN_SNR) if prediction_type == "epsilon" else -10.0
    return LearnedSchedule(rank, cond_rank, lambda_min=lambda_min)


#: The schedules by name: a factory ``(rank, cond_rank, prediction_type) -> NoiseSchedule`` each.
#: A new schedule is a ``NoiseSchedule`` subclass and one line here.
SCHEDULES = {
    "cosine": lambda rank, cond_rank, prediction_type: CosineSchedule(),
    "linear": lambda rank, cond_rank, prediction_type: LinearSchedule(),
    "learned": _learned,
}


def make_schedule(name: str, rank: int | None = None, cond_rank: int | None = None,
                  prediction_type: str = "v") -> NoiseSchedule:
    """A schedule of ``SCHEDULES`` by name (``"learned"`` needs ``rank``; for ε-prediction its
    noise end is SNR = ``EPS_MIN_SNR`` instead of e^-10)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}; got {name!r}")
    schedule = SCHEDULES[name](rank, cond_rank, prediction_type)
    if not schedule.learned:
        schedule.t_max(prediction_type)  # computed here, on the host, not inside a training or sampling step
    return schedule
