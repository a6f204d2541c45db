"""A deterministic baseline as a calibrated probabilistic forecast: ``ErrorSpread``.

What a practitioner does with a regression to get uncertainty: a Gaussian around its prediction
whose per-pixel std is the RMS of its out-of-sample errors at that pixel, here its errors on the
validation fields while it was fitted on the training fields only,

    σ_p = sqrt( mean_n (y_np − ŷ_np)² ),

and, as podiff's own predictive has, the shape of the standardised errors ``(y − ŷ)/σ``
(``evaluation.error_shape``: quantiles, one set per band of the prediction) for heavier tails than
the Gaussian's. ``podiff train`` fits one per baseline before the baselines are refitted on every
field (a refitted baseline's std then times the refit's error ratio, as the model's spread,
``fitting.refit.refit_error_ratio``), saves it beside the baseline, and ``podiff evaluate``
scores each baseline's CRPS, coverage and MACE with it (Gaussian and shaped) beside the model's.

Shapes: ``prediction, truth [N, C, H, W]``; ``std [C, H, W]`` (NaN where no valid error).

>>> pred = torch.zeros(20, 1, 4, 4); truth = torch.randn(20, 1, 4, 4)
>>> spread = ErrorSpread.fit(pred, truth, bands=1)
>>> spread.variance(pred).shape
torch.Size([20, 1, 4, 4])
"""

from __future__ import annotations

import os

import torch

from podiff.core.io import load_tensors, save_tensors
from podiff.evaluation import error_shape

FORMAT = "podiff.ErrorSpread"
SUFFIX = ".spread.safetensors"


def spread_file(name: str) -> str:
    """The file of baseline ``name``'s spread beside the baselines (``<name>.spread.safetensors``)."""
    return f"{name}{SUFFIX}"


class ErrorSpread:
    """A per-pixel std ``[C, H, W]`` and the standardised errors' shape (``error_quantiles`` and
    ``band_edges`` as in ``evaluation.error_shape``; None: Gaussian), from ``fields`` held-out fields."""

    def __init__(self, std: torch.Tensor, error_quantiles=None, band_edges=None, fields: int = 0,
                 factor: float = 1.0):
        if std.dim() != 3:
            raise ValueError(f"std must be [C, H, W]; got shape {tuple(std.shape)}")
        self.std = std.detach().cpu().double()
        self.error_quantiles, self.band_edges = error_quantiles, band_edges
        self.fields = int(fields)
        self.factor = float(factor)  # by which the held-out errors' RMS was scaled (``scaled``)

    def scaled(self, factor: float) -> ErrorSpread:
        """This spread with its std times ``factor`` (> 0): for a baseline refitted on more recent
        fields, whose errors are smaller than the held-out fit's (``fitting.refit.refit_error_ratio``)."""
        if not (float(factor) > 0 and float(factor) < float("inf")):
            raise ValueError(f"factor must be a finite number > 0; got {factor}")
        return ErrorSpread(self.std * float(factor), self.error_quantiles, self.band_edges, self.fields,
                           self.factor * float(factor))

    @classmethod
    def fit(cls, prediction: torch.Tensor, truth: torch.Tensor, bands: int = error_shape.ERROR_BANDS) -> ErrorSpread:
        """From a baseline's ``prediction`` of held-out fields and their ``truth`` ``[N, C, H, W]``
        (at least two fields; NaN where masked)."""
        if prediction.shape != truth.shape or prediction.dim() != 4:
            raise ValueError(f"prediction and truth must both be [N, C, H, W]; got {tuple(prediction.shape)} and "
                             f"{tuple(truth.shape)}")
        if truth.shape[0] < 2:
            raise ValueError(f"an error spread needs at least 2 held-out fields; got {truth.shape[0]}")
        err = truth.detach().cpu().double() - prediction.detach().cpu().double()
        valid = ~torch.isnan(err)
        count = valid.sum(0)
        mse = torch.where(valid, err, 0.0).square().sum(0) / count.clamp_min(1)
        std = torch.where(count > 0, mse.sqrt(), float("nan"))
        var = std.square().expand_as(err)
        quantiles, edges = error_shape.fit_error_shape(prediction.detach().cpu().double(), var,
                                                       truth.detach().cpu().double(), bands)
        return cls(std, quantiles, edges, truth.shape[0])

    def variance(self, prediction: torch.Tensor) -> torch.Tensor:
        """The predictive variance for ``prediction [N, C, H, W]`` (its std² at every field)."""
        if tuple(prediction.shape[-3:]) != tuple(self.std.shape):
            raise ValueError(f"prediction's fields are {tuple(prediction.shape[-3:])}; this spread was fitted on "
                             f"{tuple(self.std.shape)}")
        return self.std.square().to(prediction).expand_as(prediction)

    def save(self, path: str | os.PathLike) -> None:
        save_tensors(path, {"std": self.std}, FORMAT, error_quantiles=self.error_quantiles,
                     band_edges=self.band_edges, fields=self.fields, factor=self.factor)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ErrorSpread:
        tensors, meta = load_tensors(path, FORMAT, "error spread")
        return cls(tensors["std"], meta.get("error_quantiles"), meta.get("band_edges"), meta.get("fields", 0),
                   meta.get("factor", 1.0))


__all__ = ["ErrorSpread", "SUFFIX", "spread_file"]
