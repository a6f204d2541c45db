"""One op per file: Triton kernel, launcher, CPU paths, torch.library wiring, public function."""

from .eigh import batched_eigh
from .ensemble_moments import ensemble_moments
from .patch_correlate import patch_correlate
from .patch_decode import patch_decode
from .patch_encode import patch_encode
from .patch_encode_masked import masked_projector, patch_encode_masked
from .patch_stats import PatchStats, patch_stats
from .variance import decode_moments, propagate_variance

__all__ = ["patch_encode", "patch_encode_masked", "masked_projector", "patch_decode", "patch_correlate",
           "propagate_variance", "decode_moments",
           "ensemble_moments", "batched_eigh", "patch_stats", "PatchStats"]
