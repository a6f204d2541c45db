"""What fitting produces beside the weights, held by the fitted model and saved with it (never in
its config): ``Calibration`` (the spread factor, per-mode factors, the predictive's shape) and
``upgrade_saved`` (a version-1 model folder, whose config held those values, read as today's).

>>> Calibration().spread, Calibration(spread=1.5).error_quantiles
(1.0, None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from podiff.evaluation.error_shape import check_error_shape

#: Keys a version-1 ``config.json`` held in its config that are fitted state now.
FITTED_KEYS = ("spread", "mode_spread", "error_quantiles", "error_band_edges", "noise_correlation")
#: Config fields renamed since version 1 (old name -> new name).
RENAMED_KEYS = {"prediction": "prediction_type", "lr": "learning_rate"}
#: Defaults of version 1 where today's differ: an old config that left them out meant these.
VERSION_1_DEFAULTS = {"residual": "none", "antithetic": False, "batch_size": 32}


@dataclass
class Calibration:
    """The calibration fitted on held-out fields (``fitting.calibrate_spread``).

    ``spread``: the members' deviations from the ensemble mean are scaled by it (the variance by
    its square). ``mode_spread``: one factor per POD mode for the members' token deviations,
    applied before ``spread`` (None: all 1). ``error_quantiles``: the predictive's shape,
    quantiles of the validation errors over the calibrated std (``evaluation.error_shape``;
    None: Gaussian), one list per band of the predicted mean with ``error_band_edges``
    ``[C][B − 1]`` (None: one shape); intervals and CRPS use it, the mean and variance do not.
    """

    spread: float = 1.0
    mode_spread: list | None = None
    error_quantiles: list | None = None
    error_band_edges: list | None = None

    def __post_init__(self):
        if not (math.isfinite(float(self.spread)) and float(self.spread) > 0):
            raise ValueError(f"spread must be a finite number > 0; got {self.spread}")
        self.spread = float(self.spread)
        if self.mode_spread is not None:
            values = [float(v) for v in self.mode_spread]
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"mode_spread must be None or a list of finite factors > 0, one per POD mode; "
                                 f"got {self.mode_spread!r}")
            self.mode_spread = values
        if self.error_quantiles is not None:
            self.error_quantiles, self.error_band_edges = check_error_shape(self.error_quantiles,
                                                                            self.error_band_edges)
        elif self.error_band_edges is not None:
            raise ValueError("error_band_edges needs error_quantiles (one shape per band); got no error_quantiles")


def upgrade_saved(meta: dict) -> dict:
    """A saved model's ``config.json`` of version 1 as version 2: the fitted values move from the
    config to ``calibration`` and ``noise_correlation``, renamed fields take their new names, and
    defaults that changed are written out as version 1 meant them."""
    meta = dict(meta)
    config = dict(meta["config"])
    for old, new in RENAMED_KEYS.items():
        if old in config:
            config[new] = config.pop(old)
    for key, value in VERSION_1_DEFAULTS.items():
        config.setdefault(key, value)
    meta["calibration"] = {key: config.pop(key) for key in FITTED_KEYS[:4] if key in config}
    meta["noise_correlation"] = config.pop("noise_correlation", None)
    meta["config"] = config
    meta["version"] = 2
    return meta


__all__ = ["Calibration", "FITTED_KEYS", "RENAMED_KEYS", "upgrade_saved"]
