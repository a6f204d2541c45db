"""Fitting the POD of a dataset larger than memory: chunks of samples streamed from netCDF / Zarr.

``fit_pod_streaming`` reads the variable lazily (xarray + dask) in chunks of at most
``budget_bytes`` and makes two passes: the per-channel scaling (float64 counts, means and
centred sums of squares merged across chunks, Chan et al.), then ``PatchPOD.fit`` over the
standardised chunks, whose statistics already merge batch by batch. The result equals fitting
the whole array at once (``podiff fit-pod`` on an ``.npz``) to float rounding; peak memory is a
few chunks, not the dataset.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import _check_finite, crop_size, split_indices
from .fields import open_field


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
    from .standardise import standardise

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


__all__ = ["fit_pod_streaming", "streaming_scaling"]
