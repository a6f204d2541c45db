"""The one source of defaults: ``PipelineConfig`` (what defines a model and its training, saved
with it as JSON) and ``TrainOptions`` (how ``podiff train`` holds out, stops, calibrates and
compares). The command's options read their defaults from these two classes, so
``PipelineConfig()`` builds the model ``podiff train`` builds.

>>> PipelineConfig().residual, PipelineConfig().prediction_type, TrainOptions().val_fraction
('auto', 'v', 0.15)

What fitting produces (the data scaling, the POD, the weights, the spread calibration, the error
shape, the noise correlation) is not configuration: it is the fitted model's state
(``podiff.model``), saved beside the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from podiff.data.bounds import check_bounds
from podiff.diffusion.samplers import SAMPLERS
from podiff.diffusion.schedules import SCHEDULES
from podiff.evaluation.error_shape import ERROR_BANDS, ERROR_SHAPES

#: Residual choices: diffuse what a mean model misses (the better of the tuned ridge and a U-Net on
#: the validation fields, the ridge, the U-Net), or the field itself.
RESIDUALS = ("auto", "ridge", "unet", "none")
PREDICTION_TYPES = ("v", "epsilon")
CONDITIONS = ("auto", "anomaly", "detail")
#: ``PipelineConfig.domain``: the training grid only, or any domain.
DOMAINS = ("fixed", "any")
#: The attention window (tokens a side) a model of any domain gets unless ``denoiser`` sets one.
ANY_DOMAIN_WINDOW = 8
BASES = ("auto", "shared", "local")
PRESETS = ("tiny", "small", "paper")
SPREAD_CALIBRATIONS = ("members", "crps", "modes", "moments")

#: How many patch grids members may be drawn on (``PipelineConfig.member_grids``).
MEMBER_GRIDS = (1, 2, 4, 16)
#: ``crop="auto"``: crops of ``AUTO_CROP`` tokens a side (and ``ANY_DOMAIN_WINDOW``-token attention
#: windows unless ``denoiser`` sets them) for a grid of more than ``AUTO_CROP_ABOVE`` tokens; the
#: whole grid below (the fields measured so far: SST 432 tokens, winds 648, MRI and images 1024).
AUTO_CROP, AUTO_CROP_ABOVE = 16, 1024


@dataclass
class PipelineConfig:
    """Everything that defines a model and its training; saved with it as JSON.

    POD: ``patch_size``, ``stride``, ``rank`` or ``energy``, ``basis`` (``shared``, ``local`` or
    ``auto``: with validation fields, the basis and rank that reach ``energy`` of the held-out
    variance with the fewest modes, ``latent.pod_selection``; without, shared and ``energy`` of
    the training eigenvalues). Denoiser: ``preset`` (``tiny``/``small``/``paper``) with
    ``denoiser`` overrides (``width``, ``depth``, …); ``denoiser_kind`` ``"vit"`` or ``"mlp"``
    (one token only). Diffusion: ``schedule`` (a name in ``diffusion.schedules.SCHEDULES``),
    ``prediction_type`` (``v``/``epsilon``), ``sampler`` (a name in
    ``diffusion.samplers.SAMPLERS``), ``eta``, ``sample_steps``. Training: ``train_steps``,
    ``batch_size``, ``learning_rate``, ``warmup``, ``ema_decay``, ``grad_clip``, ``smoothness``
    (weight of the learned schedule's regulariser), ``seed``, ``amp`` (bfloat16 autocast on
    CUDA). ``residual``: diffuse what a mean model ``μ`` misses (``mean.mean_model``): ``"auto"``
    (the tuned ridge, or a U-Net regression where a paired t-test on the validation fields finds
    it better at 5 %; the ridge without validation fields), ``"ridge"`` or ``"unet"``; or
    ``"none"`` (diffuse the field); ``condition``: a residual model's condition, the ridge's
    anomaly or only its detail below the input grid. ``antithetic``:
    members in mirrored pairs (the same noise, negated), a variance reduction for the ensemble
    mean. ``correlated_noise``: the diffusion noise is correlated across the patch grid as the
    training tokens are (``diffusion.token_noise``; fitting measures it). ``bounds``: ``[lo,
    hi]`` (either None), the field's physical bounds: where the low-resolution block mean sits
    at a bound, the block's pixels are certain (``data.bounds``). None: no bounds.
    ``covariates``: the names of the input's extra channels after the target's own coarse ones
    (predictors, static fields, position, season: ``data.covariates``); the mean model uses them
    as regressors and the denoiser as conditioning. Empty: the input is the target's coarse field.
    ``grid_shifts``: the denoiser trains on the patch grid shifted by every pixel offset below the
    patch size (one shift per batch, reaching past the field's edge with NaN there), so that it
    sees how the field continues across every position of a patch edge, and the tokens a shifted
    grid has at the field's edges (a shared basis without overlap only). ``member_grids``: the
    members are drawn on this many patch grids, shifted by half a patch (1: the fitted grid; 2:
    and the diagonal shift; 4: and the row and column shifts) or by every quarter of a patch along
    each axis (16; ``latent.windows.member_windows``), an equal share on each, so that
    the patch edges fall in different places from member to member; the mean and variance are
    the pooled members' (the law of total variance over each grid's closed-form moments), exact
    as on one grid. Train with ``grid_shifts`` so that the shifted grids' edge tokens are seen.
    ``crop``: the denoiser trains on random crops of this many tokens a side (0: the whole
    grid; at any pixel with ``grid_shifts``, else at whole patches), so that a step's cost is set
    by the crop, not the field; sampling takes the whole grid (``latent.windows``; with windowed
    attention no larger than the crop). ``"auto"`` (the default): the whole grid up to
    ``AUTO_CROP_ABOVE`` tokens, above it ``AUTO_CROP``-token crops and windowed attention
    (``resolved_crop``, ``denoiser_settings``), so that a large field trains at a crop's cost
    per step and samples at a cost linear in its area. ``domain``:
    ``"fixed"`` (the default), the model samples the grid it was trained on; ``"any"``, it samples
    fields of any size and place (``model.domain``): nothing is fitted per location — a shared
    POD basis (``basis="auto"`` means shared), a denoiser without the grid's position and with
    windowed attention (``denoiser_settings()``: ``ANY_DOMAIN_WINDOW`` tokens unless set), a
    shared ridge and a U-Net without position maps, the condition's detail; position comes from
    the coordinates (``--position``). With ``crop`` it trains on crops of fields of any size.

    The device is not part of the config: it is a runtime choice, so a saved model loads on any
    device.
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
    prediction_type: str = "v"
    sampler: str = "dpmsolver++"
    eta: float = 0.0
    sample_steps: int = 10
    train_steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    smoothness: float = 1e-3
    seed: int = 0
    amp: bool = True
    residual: str = "auto"
    antithetic: bool = True
    correlated_noise: bool = True
    condition: str = "auto"
    bounds: list | None = None
    covariates: list = field(default_factory=list)
    grid_shifts: bool = False
    member_grids: int = 1
    crop: int | str = "auto"
    domain: str = "fixed"

    def __post_init__(self):
        if int(self.scale) < 1:
            raise ValueError(f"scale must be a positive int; got {self.scale}")
        _choice("denoiser_kind", self.denoiser_kind, ("vit", "mlp"))
        _choice("residual", self.residual, RESIDUALS)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("schedule", self.schedule, tuple(SCHEDULES))
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice("condition", self.condition, CONDITIONS)
        _choice("basis", self.basis, BASES)
        if self.rank is not None:
            self.energy = None
        self.covariates = [str(name) for name in self.covariates]
        if self.member_grids not in MEMBER_GRIDS:
            raise ValueError(f"member_grids must be one of {MEMBER_GRIDS}; got {self.member_grids!r}")
        if self.member_grids > 1 and (self.basis == "local" or self.stride not in (None, self.patch_size)):
            what = "basis='local'" if self.basis == "local" else f"stride={self.stride} < patch_size={self.patch_size}"
            raise ValueError(f"member_grids={self.member_grids} draws members on shifted patch grids, which needs a "
                             f"shared basis without overlap; got {what}")
        if self.crop != "auto":
            if isinstance(self.crop, str) or int(self.crop) != self.crop or int(self.crop) < 0 or int(self.crop) == 1:
                raise ValueError(f"crop must be 'auto', 0 (the whole grid) or at least 2 tokens; got {self.crop!r}")
            self.crop = int(self.crop)
        bounds = check_bounds(self.bounds)
        self.bounds = None if bounds is None else list(bounds)
        _choice("domain", self.domain, DOMAINS)
        if self.domain == "any":
            self._check_any_domain()

    def _check_any_domain(self) -> None:
        """What ``domain="any"`` cannot have, each a one-line error."""
        conflicts = []
        if self.basis == "local":
            conflicts.append("basis='local' (one basis per location of the training grid)")
        if self.denoiser_kind != "vit":
            conflicts.append(f"denoiser_kind={self.denoiser_kind!r} (one token for the whole field)")
        if self.denoiser.get("position_embedding", "none") != "none":
            conflicts.append(f"denoiser position_embedding={self.denoiser['position_embedding']!r} (positions of "
                             f"the training grid)")
        if self.denoiser.get("window", ANY_DOMAIN_WINDOW) == 0:
            conflicts.append("denoiser window=0 (global attention over the training grid)")
        if self.condition == "anomaly":
            conflicts.append("condition='anomaly' (μ's training mean per pixel)")
        if conflicts:
            raise ValueError("domain='any' samples fields of any size and place, so it cannot have "
                             + "; ".join(conflicts))

    @property
    def resolved_condition(self) -> str:
        """``condition``, ``"auto"`` resolved: ``"detail"`` for a model of any domain, else ``"anomaly"``."""
        if self.condition != "auto":
            return self.condition
        return "detail" if self.domain == "any" else "anomaly"

    @property
    def resolved_basis(self) -> str:
        """``basis``, with ``"auto"`` meaning ``"shared"`` for a model of any domain, trained on
        shifted grids or sampling several (what a local basis cannot do)."""
        return "shared" if (self.domain == "any" or self.shifted_grids) and self.basis == "auto" else self.basis

    @property
    def shifted_grids(self) -> bool:
        """Whether the model meets patch grids other than the fitted one (``grid_shifts``,
        ``member_grids``): its shared basis is then fitted on patches at every offset."""
        return bool(self.grid_shifts) or self.member_grids > 1

    def resolved_crop(self, grid) -> int:
        """The crop (tokens a side; 0: the whole grid) for a token ``grid = (nH, nW)``: ``crop``, or
        for ``"auto"`` ``AUTO_CROP`` above ``AUTO_CROP_ABOVE`` tokens and 0 up to it."""
        if self.crop != "auto":
            return int(self.crop)
        return AUTO_CROP if int(grid[0]) * int(grid[1]) > AUTO_CROP_ABOVE else 0

    def denoiser_settings(self, grid=None) -> dict:
        """``denoiser`` and what ``domain="any"`` implies (no grid position, ``ANY_DOMAIN_WINDOW``-token
        windows unless set), or an automatic crop of the token ``grid`` (those windows unless set)."""
        if self.domain == "any":
            return {"window": ANY_DOMAIN_WINDOW, **self.denoiser, "position_embedding": "none"}
        if grid is not None and self.crop == "auto" and self.resolved_crop(grid):
            return {"window": ANY_DOMAIN_WINDOW, **self.denoiser}
        return dict(self.denoiser)


@dataclass
class TrainOptions:
    """How a training run (``podiff train``, ``podiff.workflows.train``) uses its fields beyond
    the model's config: the last ``val_fraction`` of them validate (early stopping every
    ``eval_every`` steps with ``patience``; 0: none), the spread and error shape are calibrated on
    them (``calibrate``, ``spread_calibration``, ``error_shape``, ``error_bands``), the baselines
    are fitted beside the model (``regression_baseline``: also the regression ViT; ``unet_baseline``:
    also the U-Net regression), netCDF/Zarr
    fields larger than ``memory_mb`` stream, a checkpoint is written every ``checkpoint_every``
    steps, and with ``refit`` the final model and baselines are refitted on every field, the
    validation fields included, once the choices are made (``fitting.refit``)."""

    val_fraction: float = 0.15
    eval_every: int = 50
    patience: int = 5
    checkpoint_every: int = 200
    calibrate: bool = True
    spread_calibration: str = "members"
    error_shape: str = "validation"
    error_bands: int = ERROR_BANDS
    regression_baseline: bool = True
    unet_baseline: bool = True
    memory_mb: float = 2048.0
    refit: bool = True

    def __post_init__(self):
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction}")
        _choice("spread_calibration", self.spread_calibration, SPREAD_CALIBRATIONS)
        _choice("error_shape", self.error_shape, ERROR_SHAPES)
        for name in ("eval_every", "checkpoint_every", "error_bands"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)}")
        if int(self.patience) < 0:
            raise ValueError(f"patience must be >= 0 (0: never stop early); got {self.patience}")
        if not float(self.memory_mb) > 0:
            raise ValueError(f"memory_mb must be > 0; got {self.memory_mb}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


__all__ = ["PipelineConfig", "TrainOptions", "RESIDUALS", "PREDICTION_TYPES", "CONDITIONS", "BASES", "DOMAINS",
           "ANY_DOMAIN_WINDOW", "AUTO_CROP", "AUTO_CROP_ABOVE", "MEMBER_GRIDS", "PRESETS",
           "SPREAD_CALIBRATIONS"]
