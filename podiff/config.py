"""``PipelineConfig``: everything that defines a model and its training (saved with it as JSON)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .sampling import SAMPLERS


@dataclass
class PipelineConfig:
    """Everything that defines a model and its training; saved with it as JSON.

    POD: ``patch_size``, ``stride``, ``rank`` or ``energy``, ``basis`` (``shared``, ``local`` or
    ``auto``: with validation fields, the basis and rank that reach ``energy`` of the held-out
    variance with the fewest modes, ``pod_selection``; without, shared and ``energy`` of the
    training eigenvalues). Denoiser: ``preset``
    (``tiny``/``small``/``paper``) with ``denoiser`` overrides (``width``, ``depth``, …);
    ``denoiser_kind`` ``"vit"`` or ``"mlp"`` (one token only). Diffusion: ``schedule``
    (``cosine``/``linear``/``learned``), ``prediction`` (``v``/``epsilon``), ``sampler``
    (``ddim``/``ancestral``/``dpmsolver++``/``sde-dpmsolver++``; ``podiff.sampling``), ``eta``,
    ``sample_steps``. Training: ``train_steps``,
    ``batch_size``, ``lr``, ``warmup``, ``ema_decay``, ``grad_clip``, ``smoothness`` (weight of
    the learned schedule's regulariser), ``seed``, ``amp`` (bfloat16 autocast on CUDA). ``residual``: ``"none"`` (diffuse the field) or
    ``"ridge"`` (diffuse what a tuned ridge regression misses; ``podiff.residual``).
    ``antithetic``: members in mirrored pairs (the same noise, negated), a variance reduction for
    the ensemble mean. ``spread``: the members' deviations from the ensemble mean are scaled by
    it (the variance by its square); ``PODiffPipeline.calibrate_spread`` sets it on validation
    fields (the factor minimising their CRPS). ``mode_spread``: one factor per POD mode
    for the members' token deviations, applied before ``spread`` (None: all 1; set by
    ``calibrate_spread(method="modes")``, which fits them on the validation tokens).
    ``error_quantiles``: the predictive's shape, quantiles of the validation errors over the
    calibrated std (``podiff.error_shape``; set by ``calibrate_spread(shape="validation")``; None:
    Gaussian), one list per band of the predicted mean with ``error_band_edges`` ``[C][B − 1]``
    (None: one shape); intervals and CRPS use it, the mean and variance do not change. ``correlated_noise``: the diffusion noise is correlated across the patch grid as the
    training tokens are (``podiff.token_noise``); ``fit`` measures the correlations and stores
    them in ``noise_correlation`` (None: white noise, as in models saved before it existed).
    ``bounds``: ``[lo, hi]`` (either None), the field's physical bounds (e.g. ``[0, None]`` for an
    intensity): where the low-resolution block mean sits at a bound, the block's pixels are
    certain (``podiff.bounds``); ``fit`` checks that the training fields obey them and that the
    low-resolution fields are block means. None: no bounds.

    The device is not part of the config: it is a runtime choice (``fit(device=...)``,
    ``to(device)``, ``load(..., device=...)``), so a saved model loads on any device.
    """

    scale: int = 4
    patch_size: int = 4
    stride: int | None = None
    rank: int | None = None
    energy: float | None = 0.999
    basis: str = "auto"
    preset: str = "tiny"
    denoiser: dict = field(default_factory=dict)
    denoiser_kind: str = "vit"
    schedule: str = "cosine"
    prediction: str = "v"
    sampler: str = "ddim"
    eta: float = 0.0
    sample_steps: int = 20
    train_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    smoothness: float = 1e-3
    seed: int = 0
    amp: bool = True
    residual: str = "none"
    antithetic: bool = False
    spread: float = 1.0
    mode_spread: list | None = None
    error_quantiles: list | None = None
    error_band_edges: list | None = None
    correlated_noise: bool = True
    condition: str = "anomaly"
    noise_correlation: dict | None = None
    bounds: list | None = None

    def __post_init__(self):
        if int(self.scale) < 1:
            raise ValueError(f"scale must be a positive int; got {self.scale}")
        if self.denoiser_kind not in ("vit", "mlp"):
            raise ValueError(f"denoiser_kind must be 'vit' or 'mlp'; got {self.denoiser_kind!r}")
        if not float(self.spread) > 0:
            raise ValueError(f"spread must be > 0; got {self.spread}")
        if self.mode_spread is not None:
            values = [float(v) for v in self.mode_spread]
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"mode_spread must be None or a list of finite factors > 0, one per POD mode; "
                                 f"got {self.mode_spread!r}")
            self.mode_spread = values
        if self.error_quantiles is not None:
            from .error_shape import check_error_shape

            self.error_quantiles, self.error_band_edges = check_error_shape(self.error_quantiles,
                                                                            self.error_band_edges)
        elif self.error_band_edges is not None:
            raise ValueError("error_band_edges needs error_quantiles (one shape per band); got no error_quantiles")
        if self.residual not in ("none", "ridge"):
            raise ValueError(f"residual must be 'none' or 'ridge'; got {self.residual!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {self.sampler!r}")
        if self.condition not in ("anomaly", "detail"):
            raise ValueError(f"condition must be 'anomaly' or 'detail'; got {self.condition!r}")
        if self.basis not in ("auto", "shared", "local"):
            raise ValueError(f"basis must be 'auto', 'shared' or 'local'; got {self.basis!r}")
        if self.rank is not None:
            self.energy = None
        from .bounds import check_bounds

        bounds = check_bounds(self.bounds)
        self.bounds = None if bounds is None else list(bounds)


__all__ = ["PipelineConfig"]
