"""Float64 oracle for ``batched_eigh``: NumPy's LAPACK ``eigh``, reordered descending.

Independent of torch's linear algebra (NumPy ships its own LAPACK binding), so it
checks the torch path as well as ours. Reads the lower triangle, like both.
"""

from __future__ import annotations

import numpy as np
import torch


def batched_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a [..., n, n]`` symmetric -> ``(w [..., n] descending, v [..., n, n])`` in float64."""
    w, v = np.linalg.eigh(a.detach().double().cpu().numpy(), UPLO="L")
    return torch.from_numpy(w[..., ::-1].copy()), torch.from_numpy(v[..., ::-1].copy())
