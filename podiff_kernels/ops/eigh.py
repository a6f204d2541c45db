"""Batched symmetric eigensolver for thousands of small matrices (the local POD fit).

``A [..., n, n] -> (eigenvalues [..., n] descending, eigenvectors [..., n, n] in columns)``.

Implementations (``csrc/eigh.cpp``, ``csrc/eigh_cuda.cu``, ``csrc/jacobi.h``):

- ``cpp`` on CPU: the batch split across threads. Up to ``QL_MAX_N`` each matrix is
  solved by Householder tridiagonalisation + implicit QL in double (so float32
  inputs get float64-accurate results); above, LAPACK ``syevd`` through ATen on one
  contiguous chunk per thread. ``torch.linalg.eigh`` runs a batch through LAPACK one
  matrix at a time on one core.
- ``cpp`` on CUDA: one thread block per matrix, matrix and eigenvectors in shared
  memory (double working precision: n <= 118 in the 227 KB of an H100), parallel-order
  cyclic Jacobi. Its algorithm also runs serially on CPU (``jacobi_eigh_cpu``) so the
  tests check it here; the CUDA file compiles with nvcc.
- ``torch``: ``torch.linalg.eigh``, reordered descending.

Every path reads only the lower triangle (as ``torch.linalg.eigh`` does) and returns
eigenvectors with a fixed sign: the entry of largest magnitude is positive, so
bases agree across backends, runs and ranks.
"""

from __future__ import annotations

import torch

from .. import _extension, dispatch
from ..reference import eigh as reference

#: Largest n solved by tred2/tql2 on CPU; LAPACK per thread above (measured crossover,
#: 4096 matrices on 2 cores: QL 0.17 s vs 0.19 s at n = 32, 0.47 s vs 0.37 s at n = 48).
QL_MAX_N = 32


def _smem_bytes(n: int, threads: int = 256) -> int:
    """Mirror of ``podiff_jacobi_smem_bytes`` (csrc/eigh_cuda.h): double A, V and scratch."""
    half = (n + 1) // 2
    return 8 * (2 * n * n + 2 * half + threads) + 4 * 2 * half + 16


def _case(a: torch.Tensor) -> str:
    n = a.shape[-1]
    if a.device.type == "cpu":
        return f"n<={QL_MAX_N}" if n <= QL_MAX_N else f"n>{QL_MAX_N}"
    if n <= 32:
        return "n<=32"
    props = torch.cuda.get_device_properties(a.device)
    limit = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    return "shared-memory" if _smem_bytes(n) <= limit else "too-large"


dispatch.set_cpp_devices("batched_eigh", ("cpu", "cuda"))
_MEASURED = "2-core Xeon, float32/float64, see benchmarks/test_pod_fit.py"
dispatch.set_cpu_order(
    "batched_eigh", f"n<={QL_MAX_N}", ("cpp", "torch"),
    f"batch-parallel tred2/tql2 measured 1.3-2.2x faster than torch.linalg.eigh ({_MEASURED})",
)
dispatch.set_cpu_order(
    "batched_eigh", f"n>{QL_MAX_N}", ("cpp", "torch"),
    f"LAPACK on one batch chunk per thread measured 1.2-2x faster than torch.linalg.eigh ({_MEASURED})",
)
dispatch.set_gpu_order(
    "batched_eigh", "n<=32", ("torch", "cpp"),
    "cuSOLVER's batched Jacobi (syevjBatched) serves n <= 32 in one launch (not measured here: no GPU)",
)
dispatch.set_gpu_order(
    "batched_eigh", "shared-memory", ("cpp", "torch"),
    "torch.linalg.eigh loops one matrix at a time above n = 32; the Jacobi kernel runs the whole batch "
    "(not measured here: no GPU; run benchmarks/test_pod_fit.py on one)",
)
dispatch.set_gpu_order("batched_eigh", "too-large", ("torch",), "matrix does not fit in one block's shared memory")


def _eigh_cpp(a: torch.Tensor):
    module = _extension.load()
    if a.device.type == "cpu":
        return tuple(module.batched_eigh_cpu(a, QL_MAX_N))
    if not module.has_cuda_eigh():
        raise _extension.ExtensionError("the podiff extension was built without CUDA (no nvcc at build time)")
    return tuple(module.batched_eigh_cuda(a))


def _eigh_torch(a: torch.Tensor):
    w, v = torch.linalg.eigh(a)  # reads the lower triangle
    return w.flip(-1), fix_signs(v.flip(-1))


def _eigh_reference(a: torch.Tensor):
    w, v = reference.batched_eigh(a)
    return w.to(a.dtype).to(a.device), fix_signs(v).to(a.dtype).to(a.device)


def jacobi_eigh_cpu(a: torch.Tensor, working_double: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernel's parallel-order Jacobi, run serially on CPU.

    Same pairing, rotations, update order, stopping rule and (with ``working_double``)
    working precision as ``csrc/eigh_cuda.cu``: the tests use it to check the GPU
    algorithm without a GPU. ``working_double=False`` works in the input's precision
    (how a float32 kernel would behave). ``a [N, n, n]`` -> ``(w [N, n] descending,
    v [N, n, n])``, raw signs.
    """
    return tuple(_extension.load().jacobi_eigh_cpu(a.contiguous(), working_double))


dispatch.register("batched_eigh", "reference", _eigh_reference)
dispatch.register("batched_eigh", "torch", _eigh_torch)
dispatch.register("batched_eigh", "cpp", _eigh_cpp)


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flips each column of ``vectors [..., n, k]`` so its entry of largest magnitude is positive
    (the C++/CUDA paths apply the same rule, ``fix_column_sign`` in csrc/jacobi.h, as they write)."""
    if vectors.numel() == 0:
        return vectors
    idx = vectors.abs().argmax(dim=-2, keepdim=True)
    sign = torch.gather(vectors, -2, idx).sign()
    return vectors * torch.where(sign == 0, torch.ones_like(sign), sign)


def _check(a: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor; got {type(a).__name__}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A must be float32 or float64; got {a.dtype} (cast it: A.float())")
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"A must have shape [..., n, n] (square last two dims); got {tuple(a.shape)}")


@torch.library.custom_op("podiff::batched_eigh", mutates_args=())
def _batched_eigh_op(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(a)
    n = a.shape[-1]
    flat = a.reshape(-1, n, n).contiguous()
    # One cheap reduction first; the exact (allocating) check only if it is not finite.
    if flat.numel() and not torch.isfinite(flat.sum()) and not torch.isfinite(flat).all():
        bad = int((~torch.isfinite(flat)).flatten(1).any(1).nonzero()[0])
        raise ValueError(f"A must be finite; matrix {bad} of the flattened batch has NaN or Inf entries")
    w, v = dispatch.call("batched_eigh", a.device, a.dtype, _case(flat), flat)
    return w.reshape(a.shape[:-1]), v.reshape(a.shape)


@_batched_eigh_op.register_fake
def _(a):
    _check(a)
    return a.new_empty(a.shape[:-1]), a.new_empty(a.shape)


batched_eigh_op = torch.ops.podiff.batched_eigh


def batched_eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a batch of symmetric matrices, eigenvalues descending.

    Args:
        A: ``[..., n, n]`` float32/float64, symmetric; only the lower triangle is read.

    Returns:
        ``(eigenvalues [..., n], eigenvectors [..., n, n])`` with
        ``A @ V == V @ diag(w)``, ``w`` descending, eigenvector ``k`` in column ``k``
        with its largest-magnitude entry positive. ``dispatch.last_choice["batched_eigh"]``
        says which implementation ran and why. Not differentiable.

    Raises:
        ValueError: non-square ``A`` or non-finite entries (naming the matrix).

    Example:
        >>> A = torch.randn(1024, 64, 64, dtype=torch.float64); A = A @ A.mT
        >>> w, V = batched_eigh(A)
        >>> bool((w[:, :-1] >= w[:, 1:]).all())
        True
    """
    return batched_eigh_op(A)
