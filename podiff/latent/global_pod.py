"""``GlobalPOD``: one POD basis over the whole field, fitted by the method of snapshots.

The latent space of the global-POD baseline (one token per field, an MLP denoiser); it has the
part of ``PatchPOD``'s interface that the pipeline uses.
"""

from __future__ import annotations

import torch

from podiff.core import distributed as distributed_
from podiff.core.io import load_tensors, save_tensors


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
            distributed: bool | None = None) -> GlobalPOD:
        """``data [N, C, H, W]`` (NaN = masked); over ranks the rows are gathered (exact)."""
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

    def to(self, device) -> GlobalPOD:
        """Moves mean, basis, eigenvalues and the valid-pixel mask to ``device``."""
        if self.fitted:
            for name in ("mean", "basis", "eigenvalues", "valid_pixels"):
                setattr(self, name, getattr(self, name).to(device))
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
        tensors = {"mean": self.mean, "basis": self.basis, "eigenvalues": self.eigenvalues,
                   "valid_pixels": self.valid_pixels.to(torch.uint8)}
        save_tensors(path, tensors, self.FORMAT, rank_request=self.rank_request, energy=self.energy, rank=self.rank,
                     image_size=list(self.image_size), channels=self.channels, report=self.report)

    @classmethod
    def load(cls, path) -> GlobalPOD:
        tensors, meta = load_tensors(path, cls.FORMAT, "GlobalPOD file")
        pod = cls(meta["rank_request"], meta["energy"])
        pod.rank, pod.image_size, pod.channels, pod.report = (meta["rank"], tuple(meta["image_size"]),
                                                              meta["channels"], meta["report"])
        pod.mean, pod.basis, pod.eigenvalues = tensors["mean"], tensors["basis"], tensors["eigenvalues"]
        pod.valid_pixels, pod.fitted = tensors["valid_pixels"].bool(), True
        return pod

    def __repr__(self) -> str:
        return f"GlobalPOD(rank={getattr(self, 'rank', None)}, image_size={getattr(self, 'image_size', None)})"


__all__ = ["GlobalPOD"]
