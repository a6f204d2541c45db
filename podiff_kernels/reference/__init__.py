"""Readable float64 oracles, one per op. They import nothing from ``podiff_kernels.ops``."""

from . import patch_stats
from .eigh import batched_eigh
from .patches import patch_correlate, patch_decode, patch_encode, patch_encode_masked
from .variance import dense_decoder, ensemble_moments, propagate_variance

__all__ = [
    "patch_stats",
    "patch_encode",
    "patch_encode_masked",
    "patch_decode",
    "patch_correlate",
    "propagate_variance",
    "ensemble_moments",
    "dense_decoder",
    "batched_eigh",
]
