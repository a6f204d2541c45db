"""Baselines, so that comparisons are one call each.

Every baseline has ``fit(lr, hr)`` and ``sample(lr, num_samples=...)`` returning a
``SampleOutput`` like the pipeline's (deterministic ones: zero variance, identical members),
and ``predict(lr)`` for the point estimate.

- ``bicubic(lr, scale)``: bicubic upsampling (masked pixels filled first, NaN again after).
- ``pod_projection(pod, lr, scale, ...)``: the upsampled input projected on the POD (what the
  POD alone can represent of it).
- ``RidgeBaseline``: a learned linear map from the upsampled neighbourhood of each patch
  (a ``(p + 2·margin)``² window) to the HR patch, shared over locations, fitted in closed form
  from streaming normal equations; predictions overlap-average like the POD decoder.
  It is ``patch_encode`` with the ridge weights as the basis, then ``patch_decode`` with the
  identity.
- Pixel-space diffusion: ``PODiffPipeline(config, pod=PatchPOD.identity(...))`` — the same
  ViT on identity "modes" (``r = D``); see ``pixel_space_pipeline``.
- Global POD: one basis over the whole field with an MLP denoiser; see ``global_pod_pipeline``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

import podiff_kernels as pk

from .pipeline import PipelineConfig, PODiffPipeline, SampleOutput, upsample
from .pod import PatchPOD


def bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """``[N, C, h, w] -> [N, C, h·scale, w·scale]``; NaN where the nearest LR pixel is NaN."""
    size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
    up = upsample(lr, size)
    masked = F.interpolate(torch.isnan(lr).float(), size=size, mode="nearest") > 0
    return up.masked_fill(masked, float("nan"))


class _Deterministic:
    """``sample`` for a point predictor: the prediction with zero variance."""

    def sample(self, lr: torch.Tensor, num_samples: int = 1, steps=None, seed=None, return_samples=False,
               **_) -> SampleOutput:
        mean = self.predict(lr)
        var = torch.where(torch.isnan(mean), mean, torch.zeros_like(mean))
        samples = mean[None].expand(num_samples, *mean.shape) if return_samples else None
        return SampleOutput(mean, var, samples)


class BicubicBaseline(_Deterministic):
    """Bicubic upsampling as a model (``fit`` does nothing)."""

    def __init__(self, scale: int):
        self.scale = int(scale)

    def fit(self, lr=None, hr=None, **_) -> "BicubicBaseline":
        return self

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        return bicubic(lr, self.scale)


class PODProjectionBaseline(_Deterministic):
    """The upsampled input projected on a pipeline's POD (``fit`` needs a fitted pipeline)."""

    def __init__(self, pipeline: PODiffPipeline):
        self.pipeline = pipeline

    def fit(self, lr=None, hr=None, **_) -> "PODProjectionBaseline":
        if self.pipeline.pod is None:
            raise RuntimeError("PODProjectionBaseline needs a fitted pipeline (its POD and data scaling)")
        return self

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        return pod_projection(self.pipeline, lr)


def pod_projection(pipeline: PODiffPipeline, lr: torch.Tensor) -> torch.Tensor:
    """The bicubic-upsampled input encoded and decoded by the pipeline's POD, in data units."""
    tokens = pipeline.condition_tokens(lr)
    out = pipeline.pod.decode(tokens)
    return out * pipeline.data_scale.view(1, -1, 1, 1) + pipeline.offset.view(1, -1, 1, 1)


class RidgeBaseline(_Deterministic):
    """Ridge regression from an upsampled ``(p + 2m)``-pixel window to the ``p×p`` HR patch.

    ``fit(lr, hr)`` accumulates ``XᵀX`` and ``XᵀY`` over all patches (float64, in image chunks),
    solves ``(XᵀX + α·tr(XᵀX)/d·I) W = XᵀY``; ``predict(lr)`` returns ``[N, C, H, W]``.
    """

    def __init__(self, scale: int, patch_size: int = 4, margin: int = 2, alpha: float = 1e-3):
        self.scale, self.p, self.m, self.alpha = int(scale), int(patch_size), int(margin), float(alpha)
        self.weights = self.bias = None

    def _features(self, lr: torch.Tensor):
        up = upsample(lr, (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale))
        H, W = up.shape[-2:]
        Hc, Wc = -(-H // self.p) * self.p, -(-W // self.p) * self.p  # cover with stride p
        padded = F.pad(up, (self.m, self.m + Wc - W, self.m, self.m + Hc - H), mode="replicate")
        return padded, (H, W), (Hc, Wc)

    def _patches(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return F.unfold(x, size, stride=self.p).transpose(1, 2).reshape(-1, x.shape[1] * size * size)

    def fit(self, lr: torch.Tensor, hr: torch.Tensor, chunk: int = 64) -> "RidgeBaseline":
        xtx = xty = sx = sy = None
        n = 0
        for i in range(0, lr.shape[0], chunk):
            feats, (H, W), (Hc, Wc) = self._features(lr[i : i + chunk])
            target = F.pad(hr[i : i + chunk], (0, Wc - W, 0, Hc - H), mode="replicate")
            X = self._patches(feats, self.p + 2 * self.m).double()
            Y = self._patches(target, self.p).double()
            keep = torch.isfinite(Y).all(1) & torch.isfinite(X).all(1)
            X, Y = X[keep], Y[keep]
            if xtx is None:
                xtx, xty = X.T @ X, X.T @ Y
                sx, sy = X.sum(0), Y.sum(0)
            else:
                xtx, xty, sx, sy = xtx + X.T @ X, xty + X.T @ Y, sx + X.sum(0), sy + Y.sum(0)
            n += X.shape[0]
        if n < 2:
            raise ValueError("ridge fit: no patch without masked pixels")
        mx, my = sx / n, sy / n
        cxx = xtx - n * torch.outer(mx, mx)
        cxy = xty - n * torch.outer(mx, my)
        d = cxx.shape[0]
        reg = self.alpha * torch.trace(cxx) / d
        self.weights = torch.linalg.solve(cxx + reg * torch.eye(d, dtype=torch.float64), cxy)  # [d_in, D]
        self.bias = my - mx @ self.weights
        return self

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("RidgeBaseline is not fitted; call fit(lr, hr)")
        feats, (H, W), (Hc, Wc) = self._features(lr)
        k = self.p + 2 * self.m
        C = lr.shape[1]
        dtype = lr.dtype
        # patch_encode with the ridge weights as a "basis" gives each location's predicted patch.
        coeffs = pk.patch_encode(feats.nan_to_num(), self.weights.to(dtype), None, k, self.p)  # N, L, D
        coeffs = coeffs + self.bias.to(dtype)
        D = C * self.p * self.p
        out = pk.patch_decode(coeffs, torch.eye(D, dtype=dtype), None, (Hc, Wc), self.p, self.p)
        out = out[..., :H, :W]
        masked = F.interpolate(torch.isnan(lr).float(), size=(H, W), mode="nearest") > 0
        return out.masked_fill(masked, float("nan"))


def pixel_space_pipeline(config: PipelineConfig, image_size, channels: int = 1) -> PODiffPipeline:
    """The same pipeline on the identity basis (pixel-space diffusion, ``r = C·p·p``)."""
    pod = PatchPOD.identity(config.patch_size, channels, image_size, stride=config.stride)
    return PODiffPipeline(replace(config, rank=None, energy=None), pod=pod)


class GlobalPOD:
    """One POD basis over the whole field (``D = C·H·W``), fitted by the method of snapshots.

    With ``N`` training fields and ``D ≫ N`` (a 16×432 SST field, a 256² image), the ``D×D``
    covariance a patch POD forms does not fit; the thin SVD of the centred ``N×D`` data matrix
    gives the same modes (at most ``N − 1`` of them) in ``O(N²D)``. Pixels masked in any
    training field (fixed land) are left out and come back NaN. The interface is the part of
    ``PatchPOD``'s that the pipeline uses, with one token: ``encode`` -> ``[B, 1, r]``,
    ``decode``, ``decode_moments``, ``grid = (1, 1)``, ``save``/``load``.
    """

    FORMAT = "podiff.GlobalPOD"

    def __init__(self, rank: int | None = None, energy: float | None = 0.99):
        if rank is not None and energy is not None:
            energy = None
        if energy is not None and not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1]; got {energy}")
        self.rank_request, self.energy = rank, energy
        self.fitted = False

    grid = (1, 1)
    num_locations = 1

    def fit(self, data: torch.Tensor, mask: torch.Tensor | None = None, *, progress: bool = False,
            distributed: bool | None = None) -> "GlobalPOD":
        """``data [N, C, H, W]`` (NaN = masked); over ranks the rows are gathered (exact)."""
        from . import distributed as distributed_

        if not isinstance(data, torch.Tensor) or data.dim() != 4 or not data.is_floating_point():
            raise ValueError(f"data must be a floating [N, C, H, W] tensor; got {getattr(data, 'shape', type(data))}")
        if distributed or (distributed is None and distributed_.is_active()):
            data = distributed_.all_gather_rows(data)
        valid = ~torch.isnan(data) if mask is None else (~torch.isnan(data) & mask)
        self.valid_pixels = valid.all(0)  # [C, H, W]
        N = data.shape[0]
        if N < 2 or not bool(self.valid_pixels.any()):
            raise ValueError(f"a global POD needs at least two fields with common valid pixels; got N = {N}")
        X = data[:, self.valid_pixels].double()  # N, D_valid
        self.mean = X.mean(0)
        _, sv, vh = torch.linalg.svd(X - self.mean, full_matrices=False)
        eigenvalues = sv.square() / (N - 1)
        keep = eigenvalues > 1e-12 * eigenvalues[0].clamp_min(1e-300)
        share = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-300)
        limit = int(keep.sum().clamp_min(1))
        if self.rank_request is not None:
            r = min(int(self.rank_request), limit)
        elif self.energy is not None:
            r = min(int((share < self.energy - 1e-12).sum()) + 1, limit)
        else:
            r = limit
        basis = vh[:r].T  # D_valid, r; sign: each mode's largest-magnitude entry positive
        sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
        self.basis, self.eigenvalues = basis * sign, eigenvalues[:r]
        self.rank, self.image_size, self.channels = r, tuple(data.shape[-2:]), data.shape[1]
        self.report = {"images": N, "rank": r, "energy_reached": float(share[r - 1]),
                       "masked_pixels": int((~self.valid_pixels).sum())}
        self.fitted = True
        return self

    def _scaled_basis(self, standardized: bool, like: torch.Tensor) -> torch.Tensor:
        basis = self.basis * self.eigenvalues.sqrt() if standardized else self.basis
        return basis.to(like)

    def encode(self, x: torch.Tensor, standardized: bool = True) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, 1, r]``."""
        if tuple(x.shape[1:]) != (self.channels, *self.image_size):
            raise ValueError(f"x must be [B, {self.channels}, {self.image_size[0]}, {self.image_size[1]}]; "
                             f"got {tuple(x.shape)}")
        a = (x[:, self.valid_pixels].double().nan_to_num() - self.mean) @ self.basis
        if standardized:
            a = a / self.eigenvalues.sqrt()
        return a.to(x.dtype)[:, None]

    def _image(self, values: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
        out = values.new_full((values.shape[0], self.channels, *self.image_size), fill)
        out[:, self.valid_pixels] = values
        return out

    def decode(self, tokens: torch.Tensor, standardized: bool = True) -> torch.Tensor:
        """``[B, 1, r]`` -> ``[B, C, H, W]`` (NaN on masked pixels)."""
        return self._image(tokens[:, 0] @ self._scaled_basis(standardized, tokens).T + self.mean.to(tokens))

    def decode_moments(self, mean_tokens: torch.Tensor, var_or_cov: torch.Tensor, standardized: bool = True):
        """Pixel mean and variance from the token mean ``[B, 1, r]`` and variance ``[B, 1, r]`` or
        covariance ``[B, 1, r, r]``: ``Var(x_j) = φ_jᵀ Σ φ_j``."""
        phi = self._scaled_basis(standardized, mean_tokens)  # D, r
        if var_or_cov.dim() == 3:
            var = var_or_cov[:, 0] @ phi.square().T
        else:
            var = torch.einsum("jk,bkl,jl->bj", phi, var_or_cov[:, 0], phi)
        return self.decode(mean_tokens, standardized), self._image(var.clamp_min(0))

    def save(self, path) -> None:
        import json

        from safetensors.torch import save_file

        from .pod import atomic_write

        meta = {"format": self.FORMAT, "rank_request": self.rank_request, "energy": self.energy, "rank": self.rank,
                "image_size": list(self.image_size), "channels": self.channels, "report": self.report}
        tensors = {"mean": self.mean, "basis": self.basis, "eigenvalues": self.eigenvalues,
                   "valid_pixels": self.valid_pixels.to(torch.uint8)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"podiff": json.dumps(meta)}))

    @classmethod
    def load(cls, path) -> "GlobalPOD":
        import json

        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["podiff"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise ValueError(f"{path} is not a readable GlobalPOD file: {exc}") from None
        if meta.get("format") != cls.FORMAT:
            raise ValueError(f"{path} holds {meta.get('format')!r}, not a {cls.FORMAT}")
        pod = cls(meta["rank_request"], meta["energy"])
        pod.rank, pod.image_size, pod.channels, pod.report = (meta["rank"], tuple(meta["image_size"]),
                                                              meta["channels"], meta["report"])
        pod.mean, pod.basis, pod.eigenvalues = tensors["mean"], tensors["basis"], tensors["eigenvalues"]
        pod.valid_pixels, pod.fitted = tensors["valid_pixels"].bool(), True
        return pod

    def __repr__(self) -> str:
        return f"GlobalPOD(rank={getattr(self, 'rank', None)}, image_size={getattr(self, 'image_size', None)})"


def global_pod_pipeline(config: PipelineConfig, image_size=None) -> PODiffPipeline:
    """One POD basis over the whole field (``GlobalPOD``, by snapshots) and an MLP denoiser (one token)."""
    pod = GlobalPOD(rank=config.rank, energy=config.energy)
    return PODiffPipeline(replace(config, basis="shared", denoiser_kind="mlp"), pod=pod)
