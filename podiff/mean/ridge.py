"""``RidgeBaseline``: the practitioner's linear super-resolution, tuned on validation fields.

Each low-resolution pixel's ``k×k`` neighbourhood (all channels; masked pixels filled with the
nearest valid value, edges replicated) predicts the ``s×s`` high-resolution block it covers,
``ŷ = W x + b``. Weights are shared by every location, fitted per location, or fitted per
location and *pooled* toward the shared fit (partial pooling: the per-location penalty is on
``W_l − W_shared`` instead of ``W_l``, so a location with few fields borrows from the rest of the
field and a location with a clear signal of its own keeps it). Fitting is
ridge regression in closed form from the normal equations (float64), the intercept not
penalised, the penalty ``λ = α·tr(C)/F`` scaled by the centred features' mean variance so that
``α`` means the same on any data. A masked high-resolution pixel leaves only its own output's
equations (least squares on the valid pixels, as the POD encode does).

``RidgeBaseline.tuned(scale, lr_train, hr_train, lr_val, hr_val)`` chooses ``k ∈ {3, 5, 7}``,
shared, per-location or pooled weights, ``α`` and the pooling penalty on log grids by the
validation RMSE (fitted on the training fields only) and returns the best with the whole table.
On the packaged SST (35 training months, 7 validating, 12 held out) pooling is what validation
picks, and it is 9 % better on the held-out months than the best per-location or shared fit:
a per-location fit has only as many rows as there are fields, a shared one ignores the coast.

Shapes: ``lr [N, C, h, w]``, ``hr [N, C, h·s, w·s]``; ``predict(lr) -> [N, C, h·s, w·s]``.

>>> lr = torch.randn(6, 1, 8, 8); hr = lr.repeat_interleave(2, -1).repeat_interleave(2, -2)
>>> RidgeBaseline(scale=2, neighbourhood=3).fit(lr, hr).predict(lr).shape
torch.Size([6, 1, 16, 16])
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from podiff.core.io import load_tensors, save_tensors
from podiff.core.sample_output import Deterministic

FORMAT = "podiff.RidgeBaseline"

PENALTIES = tuple(10.0**e for e in range(-6, 3))
POOLINGS = tuple(10.0 ** (e / 2) for e in range(-8, 5))  # 1e-4 … 1e2, half-decades
NEIGHBOURHOODS = (3, 5, 7)


def fill_nearest(lr: torch.Tensor) -> torch.Tensor:
    """Masked (NaN) pixels take the value of the nearest valid pixel of the same image and channel."""
    from scipy import ndimage

    out = lr.detach().cpu().double().numpy().copy()
    for image in out.reshape(-1, *out.shape[-2:]):
        invalid = np.isnan(image)
        if invalid.all():
            raise ValueError("an input field is masked everywhere: nothing to fill from")
        if invalid.any():
            idx = ndimage.distance_transform_edt(invalid, return_distances=False, return_indices=True)
            image[...] = image[tuple(idx)]
    return torch.from_numpy(out)


class RidgeBaseline(Deterministic):
    """Ridge regression from each LR ``k×k`` neighbourhood to its HR ``s×s`` block (see the module).

    Args:
        scale: ``s``.
        neighbourhood: ``k`` (odd).
        alpha: relative penalty (``λ = α·tr(C)/F``).
        per_location: one set of weights per LR pixel instead of one for the field.
        pooling: with ``per_location``, the relative penalty on each location's weights' distance
            from the shared fit (made with ``alpha``); 0 penalises the weights themselves.
        covariates: the input's last ``covariates`` channels are covariates (``data.covariates``):
            each enters with its value at the block's own input cell (not a neighbourhood),
            scaled so that its variance is the target columns' mean variance (the penalty then
            treats every column alike); the output has the other channels.
    """

    def __init__(self, scale: int, neighbourhood: int = 5, alpha: float = 1e-3, per_location: bool = False,
                 pooling: float = 0.0, covariates: int = 0):
        if int(scale) < 1:
            raise ValueError(f"scale must be >= 1; got {scale}")
        if int(neighbourhood) < 1 or int(neighbourhood) % 2 == 0:
            raise ValueError(f"neighbourhood must be a positive odd int; got {neighbourhood}")
        if not float(alpha) >= 0:
            raise ValueError(f"alpha must be >= 0; got {alpha}")
        if not float(pooling) >= 0:
            raise ValueError(f"pooling must be >= 0; got {pooling}")
        if float(pooling) > 0 and not per_location:
            raise ValueError(f"pooling={pooling} pools per-location weights: it needs per_location=True")
        self.scale, self.k, self.alpha, self.per_location = int(scale), int(neighbourhood), float(alpha), per_location
        self.pooling = float(pooling)
        if int(covariates) < 0:
            raise ValueError(f"covariates must be >= 0; got {covariates}")
        self.covariates = int(covariates)
        self.weights = None  # [G, D, F + 1] with G = 1 or h·w
        self.feature_mean = None
        self.feature_scale = None  # covariate columns scaled to the target columns' mean variance

    # -------------------------------------------------------------- data -> matrices

    def _features(self, lr: torch.Tensor) -> torch.Tensor:
        """``[N, P = h·w, F = C·k² + covariates]`` float64."""
        filled = fill_nearest(lr)
        C = self._target_channels(lr)
        r = self.k // 2
        padded = F.pad(filled[:, :C], (r, r, r, r), mode="replicate")
        feats = F.unfold(padded, self.k).transpose(1, 2)
        if self.covariates:
            feats = torch.cat([feats, filled[:, C:].flatten(2).transpose(1, 2)], -1)
        return feats

    def _target_channels(self, lr: torch.Tensor) -> int:
        C = lr.shape[1] - self.covariates
        if C < 1:
            raise ValueError(f"lr has {lr.shape[1]} channels; with {self.covariates} covariates it needs at least "
                             f"{self.covariates + 1}")
        return C

    def _fit_feature_stats(self, feats: torch.Tensor) -> None:
        self.feature_mean = feats.mean((0, 1))
        if not self.covariates:
            self.feature_scale = None
            return
        variance = (feats - self.feature_mean).square().mean((0, 1))
        n_target = feats.shape[-1] - self.covariates
        unit = variance[:n_target].mean().sqrt()
        scale = torch.ones_like(variance)
        scale[n_target:] = torch.where(variance[n_target:] > 0, unit / variance[n_target:].clamp_min(1e-300).sqrt(),
                                       0.0)
        self.feature_scale = scale

    def _centred(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats - self.feature_mean
        return x * self.feature_scale if self.feature_scale is not None else x

    def _blocks(self, hr: torch.Tensor) -> torch.Tensor:
        """``[N, P, D = C·s²]`` float64 (NaN where masked)."""
        return F.unfold(hr.detach().cpu().double(), self.scale, stride=self.scale).transpose(1, 2)

    def _design(self, lr: torch.Tensor) -> torch.Tensor:
        x = self._centred(self._features(lr))
        return torch.cat([x, torch.ones_like(x[..., :1])], -1)  # intercept last

    def _normal_equations(self, lr: torch.Tensor, hr: torch.Tensor):
        """Grams ``[G, D or 1, F+1, F+1]``, right-hand sides ``[G, D, F+1]``, and the penalty unit."""
        if tuple(hr.shape[-2:]) != (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale):
            raise ValueError(f"hr must be scale={self.scale} times lr's size {tuple(lr.shape[-2:])}; "
                             f"got {tuple(hr.shape[-2:])}")
        feats = self._features(lr)
        self._fit_feature_stats(feats)
        centred = self._centred(feats)
        X = torch.cat([centred, torch.ones_like(feats[..., :1])], -1)  # N, P, F+1
        Y = self._blocks(hr)
        V = ~torch.isnan(Y)
        Y = torch.where(V, Y, 0.0)
        out = "p" if self.per_location else ""
        if bool(V.all()):  # one Gram for every output
            gram = torch.einsum(f"npf,npg->{out}fg", X, X)[..., None, :, :]
        else:
            gram = torch.einsum(f"npd,npf,npg->{out}dfg", V.double(), X, X)
        rhs = torch.einsum(f"npd,npf->{out}df", Y, X)
        if not self.per_location:
            gram, rhs = gram[None], rhs[None]
        # λ = α · (mean variance of a centred feature) · (rows in each Gram: N·P shared, N per location)
        rows = feats.shape[0] * (1 if self.per_location else feats.shape[1])
        return gram, rhs, float(centred.square().mean()) * rows

    def _solve(self, gram, rhs, lam_per_row: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        """``(G + λP) W = rhs + λP·prior``: with no prior, ``P`` spares the intercept; pooled toward
        ``prior`` (the shared weights ``[D, F+1]``), every coefficient, the intercept included, is
        drawn to it (a location with no valid field gets the shared weights)."""
        Fp = gram.shape[-1]
        penalty = torch.ones(Fp, dtype=torch.float64)
        if prior is None:
            penalty[-1] = 0.0  # the intercept is not penalised
        A = gram + lam_per_row * torch.diag(penalty)
        if prior is not None:
            rhs = rhs + lam_per_row * prior
        if A.shape[1] == 1:  # one Gram for every output: the outputs are right-hand sides of one solve
            return torch.linalg.solve_ex(A[:, 0], rhs.transpose(-1, -2))[0].transpose(-1, -2)  # G, D, F+1
        return torch.linalg.solve_ex(A, rhs.unsqueeze(-1))[0].squeeze(-1)  # G, D, F+1

    def fit(self, lr: torch.Tensor, hr: torch.Tensor) -> RidgeBaseline:
        prior = None
        if self.pooling > 0:
            shared = RidgeBaseline(self.scale, self.k, self.alpha, covariates=self.covariates).fit(lr, hr)
            prior = shared.weights[0]
        gram, rhs, unit = self._normal_equations(lr, hr)
        self.penalty = (self.pooling if prior is not None else self.alpha) * unit
        self.weights = self._solve(gram, rhs, self.penalty, prior)
        self.lr_size = tuple(lr.shape[-2:])
        return self

    def settings(self) -> dict:
        """The constructor's arguments: ``RidgeBaseline(**r.settings())`` is an unfitted copy."""
        return {"scale": self.scale, "neighbourhood": self.k, "alpha": self.alpha,
                "per_location": self.per_location, "pooling": self.pooling, "covariates": self.covariates}

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("RidgeBaseline is not fitted; call fit(lr, hr)")
        if self.per_location and tuple(lr.shape[-2:]) != self.lr_size:
            raise ValueError(f"per-location weights predict on the fitted size {self.lr_size}; got "
                             f"{tuple(lr.shape[-2:])}")
        X = self._design(lr)  # N, P, F+1
        pred = torch.einsum("npf,pdf->npd" if self.per_location else "npf,df->npd", X,
                            self.weights if self.per_location else self.weights[0])
        H, W = lr.shape[-2] * self.scale, lr.shape[-1] * self.scale
        out = F.fold(pred.transpose(1, 2), (H, W), self.scale, stride=self.scale).to(lr.dtype)
        C = self._target_channels(lr)
        masked = F.interpolate(torch.isnan(lr[:, :C]).float(), size=(H, W), mode="nearest") > 0
        return out.masked_fill(masked, float("nan")).to(lr.device)


    def describe(self) -> str:
        where = "per location" if self.per_location else "shared"
        if self.pooling > 0:
            where = f"per location pooled toward shared (pooling {self.pooling:g})"
        extra = f", {self.covariates} covariates" if self.covariates else ""
        return f"ridge {self.k}×{self.k} → {self.scale}×{self.scale}, {where}, α = {self.alpha:g}{extra}"

    def state(self) -> dict:
        return {**self.settings(), "lr_size": list(self.lr_size), "penalty": self.penalty}

    def tensors(self) -> dict:
        out = {"weights": self.weights.contiguous(), "feature_mean": self.feature_mean.contiguous()}
        if self.feature_scale is not None:
            out["feature_scale"] = self.feature_scale.contiguous()
        return out

    @classmethod
    def from_state(cls, state: dict, tensors: dict) -> RidgeBaseline:
        ridge = cls(state["scale"], state["neighbourhood"], state["alpha"], state["per_location"],
                    state.get("pooling", 0.0), state.get("covariates", 0))  # older files have neither
        ridge.weights, ridge.feature_mean = tensors["weights"], tensors["feature_mean"]
        ridge.feature_scale = tensors.get("feature_scale")
        ridge.lr_size, ridge.penalty = tuple(state["lr_size"]), state["penalty"]
        return ridge

    def save(self, path, extra: dict | None = None) -> None:
        """One safetensors file (weights and state), written atomically; ``extra`` goes in the metadata."""
        save_tensors(path, self.tensors(), FORMAT, state=self.state(), **(extra or {}))

    @classmethod
    def load(cls, path) -> tuple[RidgeBaseline, dict]:
        """``(ridge, metadata)`` from a file written by ``save``."""
        tensors, meta = load_tensors(path, FORMAT, "ridge baseline")
        return cls.from_state(meta["state"], tensors), meta

    # -------------------------------------------------------------- tuning

    @classmethod
    def tuned(cls, scale: int, lr_train, hr_train, lr_val, hr_val, neighbourhoods=NEIGHBOURHOODS,
              penalties=PENALTIES, placements=("shared", "per-location", "pooled"),
              poolings=POOLINGS, covariates: int = 0) -> tuple[RidgeBaseline, list[dict]]:
        """The chosen ``(k, placement, α, pooling)``, fitted on the training fields; and every
        candidate's validation RMSE (``[{"neighbourhood", "per_location", "pooling", "alpha",
        "val_rmse", "chosen"}]``). ``placements``: any of ``"shared"``, ``"per-location"`` and
        ``"pooled"`` (per-location weights pooled toward the shared fit with the best ``α`` for
        that ``k``; needs ``"shared"``).

        The choice is the best validation RMSE, guarded against selection noise: a per-location
        or pooled fit, which has far more weights, replaces the best shared one only if a
        one-sided paired t-test on the per-field validation MSE finds it better at the 5 % level
        (why: ``benchmarks/RESULTS.md``, partial pooling)."""
        unknown = set(placements) - {"shared", "per-location", "pooled"}
        if unknown or not placements:
            raise ValueError(f"placements must be some of 'shared', 'per-location', 'pooled'; got {placements}")
        if "pooled" in placements and "shared" not in placements:
            raise ValueError("placements: 'pooled' shrinks toward the tuned shared fit, so it needs 'shared' too")
        target = hr_val.detach().cpu().double()
        valid = ~torch.isnan(target)
        lr_val = lr_val.double()
        table, best, best_shared = [], None, None  # best: (rmse, per-field squared errors, settings, row)

        def score(model, **row):
            nonlocal best, best_shared
            pred = model.predict(lr_val).double()
            ok = valid & ~torch.isnan(pred)
            squared = torch.where(ok, (pred - target).square(), 0.0).flatten(1).sum(1)  # per field
            rmse = math.sqrt(float(squared.sum() / ok.sum()))
            table.append({"neighbourhood": model.k, **row, "val_rmse": rmse, "chosen": False})
            entry = (rmse, squared / ok.flatten(1).sum(1).clamp_min(1), dict(model.settings(), **row), table[-1])
            if best is None or rmse < best[0]:
                best = entry
            if not model.per_location and (best_shared is None or rmse < best_shared[0]):
                best_shared = entry
            return rmse

        for k in neighbourhoods:
            k_shared = None  # this k's best shared fit: (rmse, alpha, weights)
            local = None  # this k's per-location normal equations, made once for both placements
            for placement in [p for p in ("shared", "per-location") if p in placements]:
                model = cls(scale, k, penalties[0], placement == "per-location", covariates=covariates)
                gram, rhs, unit = model._normal_equations(lr_train, hr_train)
                model.lr_size = tuple(lr_train.shape[-2:])
                if model.per_location:
                    local = (gram, rhs, unit, model.feature_mean, model.feature_scale)
                for alpha in penalties:
                    model.alpha, model.penalty = alpha, alpha * unit
                    model.weights = model._solve(gram, rhs, model.penalty)
                    rmse = score(model, per_location=model.per_location, pooling=0.0, alpha=alpha)
                    if placement == "shared" and (k_shared is None or rmse < k_shared[0]):
                        k_shared = (rmse, alpha, model.weights[0])
            if "pooled" in placements:
                model = cls(scale, k, k_shared[1], True, poolings[0], covariates=covariates)
                if local is None:
                    gram, rhs, unit = model._normal_equations(lr_train, hr_train)
                else:  # the same k and fields: the per-location candidates' equations and feature centre
                    gram, rhs, unit, model.feature_mean, model.feature_scale = local
                model.lr_size = tuple(lr_train.shape[-2:])
                for pooling in poolings:
                    model.pooling, model.penalty = pooling, pooling * unit
                    model.weights = model._solve(gram, rhs, model.penalty, k_shared[2])
                    score(model, per_location=True, pooling=pooling, alpha=k_shared[1])
        if best_shared is not None and best is not best_shared:
            from scipy import stats

            gain = best_shared[1] - best[1]  # per-field MSE the flexible fit saves
            n = len(gain)
            if n < 2 or float(gain.mean()) <= stats.t.ppf(0.95, n - 1) * float(gain.std()) / math.sqrt(n):
                best = best_shared
        best[3]["chosen"] = True
        return cls(**best[2]).fit(lr_train, hr_train), table


__all__ = ["RidgeBaseline", "fill_nearest", "NEIGHBOURHOODS", "PENALTIES", "POOLINGS"]
