"""One op per file: Triton kernel, launcher, CPU paths, torch.library wiring, public function."""

from .patch_correlate import patch_correlate
from .patch_decode import patch_decode
from .patch_encode import patch_encode

__all__ = ["patch_encode", "patch_decode", "patch_correlate"]
