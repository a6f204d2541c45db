"""podiff_kernels — drop-in patch-POD ops for diffusion codebases.

Every op runs Triton kernels on CUDA tensors, a measured-fastest CPU path on CPU
tensors, and has a float64 reference in ``podiff_kernels.reference``. Each is also
registered as ``torch.ops.podiff.<name>`` (``torch.compile``-able, ``opcheck``-clean).

>>> import torch, podiff_kernels as pk
>>> x = torch.randn(4, 1, 32, 32)                                  # [B, C, H, W]
>>> basis = torch.linalg.qr(torch.randn(64, 16))[0]                 # [D = C*p*p, r]
>>> coeffs = pk.patch_encode(x, basis, None, patch_size=8, stride=4)  # [B, L = 7*7, r]
>>> pk.patch_decode(coeffs, basis, None, (32, 32), 8, stride=4).shape
torch.Size([4, 1, 32, 32])
"""

from .dispatch import backends
from .ops import (
    PatchStats,
    batched_eigh,
    decode_moments,
    ensemble_moments,
    masked_projector,
    patch_correlate,
    patch_decode,
    patch_encode,
    patch_encode_masked,
    patch_stats,
    propagate_variance,
)

__version__ = "0.1.0"

__all__ = [
    "patch_encode",
    "patch_encode_masked",
    "masked_projector",
    "patch_decode",
    "patch_correlate",
    "propagate_variance",
    "decode_moments",
    "ensemble_moments",
    "batched_eigh",
    "patch_stats",
    "PatchStats",
    "backends",
    "__version__",
]
