"""Datasets larger than memory, streamed from netCDF / Zarr: fitting a POD, and training.

``fit_pod_streaming`` reads the variable lazily (xarray + dask) in chunks of at most
``budget_bytes`` and makes two passes: the per-channel scaling (float64 counts, means and
centred sums of squares merged across chunks, Chan et al.), then ``PatchPOD.fit`` over the
standardised chunks, whose statistics already merge batch by batch. The result equals fitting
the whole array at once (``podiff fit-pod`` on an ``.npz``) to float rounding; peak memory is a
few chunks, not the dataset.

``FieldStream`` is the training part of such a variable, read a few fields at a time
(``fitting.fit_streamed``, ``podiff train --memory-mb`` train from one).
"""

from __future__ import annotations

import numpy as np
import torch

from podiff.data.datasets import _check_finite, block_average, crop_size, split_indices
from podiff.data.fields import open_field


def _chunks(field_, budget_bytes: int, label: str):
    """``field_``'s samples as float32 tensors, as many a chunk as fit ``budget_bytes`` (at least one)."""
    n = field_.sizes[field_.dims[0]]
    per_sample = int(np.prod(field_.shape[1:])) * 4
    step = max(1, budget_bytes // max(per_sample, 1))
    for start in range(0, n, step):
        stop = min(n, start + step)
        values = np.asarray(field_.isel({field_.dims[0]: slice(start, stop)}).values, dtype=np.float32)
        chunk = torch.from_numpy(values)
        _check_finite(chunk, f"{label} (samples {start}-{stop - 1})")
        yield chunk


def streaming_scaling(chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offset [C], scale [C])`` like ``standardise.fit_scaling`` over all chunks' valid pixels,
    from per-chunk float64 moments merged with Chan's formula."""
    count = mean = m2 = None
    for chunk in chunks:
        x = chunk.double().transpose(0, 1).reshape(chunk.shape[1], -1)
        valid = ~torch.isnan(x)
        n = valid.sum(1).double()
        s = torch.where(valid, x, 0.0).sum(1)
        mu = torch.where(n > 0, s / n.clamp_min(1), 0.0)
        q = torch.where(valid, (x - mu[:, None]) ** 2, 0.0).sum(1)
        if count is None:
            count, mean, m2 = n, mu, q
            continue
        total = count + n
        delta = mu - mean
        safe = total.clamp_min(1)
        mean = mean + delta * n / safe
        m2 = m2 + q + delta**2 * count * n / safe
        count = total
    if count is None:
        raise ValueError("the data holds no samples")
    for c, n in enumerate(count.tolist()):
        if n < 2:
            raise ValueError(f"channel {c} has fewer than two valid pixels")
    return mean.float(), (m2 / (count - 1)).sqrt().clamp_min(1e-12).float()


def fit_pod_streaming(pod, source, var, scale: int, *, split: str = "all", dims=None, channels=None,
                      time=None, budget_bytes: int = 256 << 20, device=None, progress: bool = True):
    """Fits ``pod`` (a ``PatchPOD``) on ``split`` of ``var`` in ``source`` standardised per channel,
    reading at most ``budget_bytes`` of samples at a time. Returns ``pod``."""
    from podiff.data.standardise import standardise

    field_, grid = open_field(source, var, dims=dims, channels=channels, time=time)
    label = f"{source}: variable {grid.var!r}"
    sample, _, y, x = field_.dims
    H, W = crop_size(field_.sizes[y], field_.sizes[x], scale, label)
    idx = split_indices(field_.sizes[sample], split)
    field_ = field_.isel({sample: slice(int(idx[0]), int(idx[-1]) + 1), y: slice(0, H), x: slice(0, W)})
    offset, spread = streaming_scaling(_chunks(field_, budget_bytes, label))

    def standardised():
        for chunk in _chunks(field_, budget_bytes, label):
            chunk = chunk.to(device) if device is not None else chunk
            yield standardise(chunk, offset.to(chunk.device), spread.to(chunk.device))

    return pod.fit(standardised(), progress=progress)


class FieldStream:
    """Fields ``indices`` of a lazily opened variable (``fields.open_field``), read on demand.

    Args:
        field_: a lazy ``xr.DataArray`` ``(sample, channel, y, x)``.
        indices: the sample indices this stream holds (``[N]``, in order).
        scale: the super-resolution factor: the grid is cropped to a multiple of it and the
            low-resolution fields are block averages.
        label: names the file and variable in errors.
        covariates: ``data.covariates.covariate_parts`` for every sample of ``field_`` (None:
            none): their channels follow the target's in ``lr``, as in a loaded dataset.

    ``read(positions)`` gives ``(lr [B, C + K, h, w], hr [B, C, H, W])`` for positions into
    ``indices`` (any order, repeats allowed), reading each distinct field once.
    """

    def __init__(self, field_, indices, scale: int, label: str, covariates=None):
        sample, _, y, x = field_.dims
        H, W = crop_size(field_.sizes[y], field_.sizes[x], scale, label)
        self.field = field_.isel({y: slice(0, H), x: slice(0, W)})
        self.sample_dim = sample
        self.indices = np.asarray(indices, dtype=np.int64)
        self.scale, self.label = int(scale), label
        self.shape = (int(field_.sizes["channel"]), H, W)
        self.covariates = covariates or []

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def covariate_names(self) -> list[str]:
        """The names of the covariate channels ``read`` appends to ``lr``."""
        return [name for part in self.covariates for name in part.names]

    @property
    def field_bytes(self) -> int:
        """Bytes of one high-resolution field (float32)."""
        return int(np.prod(self.shape)) * 4

    @property
    def nbytes(self) -> int:
        return self.field_bytes * len(self)

    def subsample(self, budget_bytes: int) -> np.ndarray:
        """Evenly spaced positions, as many as fit ``budget_bytes`` (at least 2, at most all)."""
        count = int(min(len(self), max(2, budget_bytes // self.field_bytes)))
        return np.unique(np.linspace(0, len(self) - 1, count).round().astype(np.int64))

    def read(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions must lie in [0, {len(self)}); got {positions.min()}..{positions.max()}")
        distinct, inverse = np.unique(self.indices[positions], return_inverse=True)
        where = f"{self.label} (samples {int(distinct[0])}-{int(distinct[-1])})"
        try:
            values = np.asarray(self.field.isel({self.sample_dim: distinct}).values, dtype=np.float32)
        except Exception as exc:  # a corrupt chunk, a codec that is missing, a file moved away
            from podiff.data.fields import one_line

            raise ValueError(f"{where} could not be read: {one_line(exc)}") from None
        rows = torch.from_numpy(inverse.reshape(-1))
        hr = torch.from_numpy(values)[rows]
        _check_finite(hr, where)
        lr = block_average(hr, self.scale)
        if self.covariates:
            from podiff.data.covariates import take

            lr = torch.cat([lr, take(self.covariates, distinct)[rows].to(lr)], 1)
        return lr, hr


__all__ = ["FieldStream", "fit_pod_streaming", "streaming_scaling"]
