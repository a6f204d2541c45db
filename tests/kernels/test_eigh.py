"""batched_eigh: accuracy gates on hard matrices, every backend, the CUDA algorithm's CPU twin,
dispatch, sign convention, errors, opcheck, and an nvcc compile check of the CUDA source."""

import shutil
import subprocess
from importlib import import_module
from pathlib import Path

import pytest
import torch

import podiff_kernels as pk
from podiff_kernels import dispatch, reference

eigh_mod = import_module("podiff_kernels.ops.eigh")

GATE = {torch.float32: 1e-5, torch.float64: 1e-12}  # from the issue: residual and orthogonality


def spectrum_matrix(kind: str, n: int, batch: int, seed: int) -> torch.Tensor:
    """``[batch, n, n]`` float64 symmetric matrices of a named, hard kind."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))[0]
    if kind == "spd":
        w = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1
    elif kind == "indefinite":
        w = torch.randn(batch, n, generator=g, dtype=torch.float64)
    elif kind == "rank-deficient":
        w = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1
        w[:, max(1, n // 3):] = 0.0
    elif kind == "repeated":
        w = torch.ones(batch, n, dtype=torch.float64) * 2.0
        w[:, n // 2:] = 0.5
    elif kind == "graded":  # eigenvalues over 12 decades, like a POD spectrum
        w = torch.logspace(0, -12, n, dtype=torch.float64).expand(batch, n).clone()
    elif kind == "zero":  # an all-land patch location
        return torch.zeros(batch, n, n, dtype=torch.float64)
    else:
        raise ValueError(kind)
    a = q @ torch.diag_embed(w) @ q.mT
    return (a + a.mT) / 2


def check_gates(a: torch.Tensor, w: torch.Tensor, v: torch.Tensor, dtype, what: str) -> None:
    """‖AV − VΛ‖/‖A‖ and ‖VᵀV − I‖ (per matrix, Frobenius), computed in float64."""
    a64, w64, v64 = a.double(), w.double(), v.double()
    tol = GATE[dtype]
    norm_a = torch.linalg.matrix_norm(a64).clamp_min(1e-300)
    residual = torch.linalg.matrix_norm(a64 @ v64 - v64 * w64[..., None, :]) / norm_a
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    ortho = torch.linalg.matrix_norm(v64.mT @ v64 - eye)
    assert residual.max() <= tol, f"{what}: residual {residual.max():.3g} > {tol}"
    assert ortho.max() <= tol, f"{what}: orthogonality {ortho.max():.3g} > {tol}"
    assert (w64[..., :-1] >= w64[..., 1:]).all(), f"{what}: eigenvalues not descending"
    w_ref = reference.batched_eigh(a64)[0]
    err = ((w64 - w_ref).abs().amax(-1) / norm_a).max()
    assert err <= tol, f"{what}: eigenvalues off the float64 reference by {err:.3g} (relative to ‖A‖)"


KINDS = ["spd", "indefinite", "rank-deficient", "repeated", "graded", "zero"]
SIZES = [1, 2, 7, 16, 33, 64]  # 33, 64 take the LAPACK-per-thread branch on CPU; 7, 16 the QL one


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_accuracy_gates(backend, name, dtype, kind, n):
    backend(name)
    a = spectrum_matrix(kind, n, 5, seed=n).to(dtype)
    w, v = pk.batched_eigh(a)
    assert dispatch.last_choice["batched_eigh"].backend == name
    assert w.dtype == dtype and v.dtype == dtype
    check_gates(a, w, v, dtype, f"{name} {kind} n={n}")


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cuda_algorithm_on_cpu(dtype, kind, n):
    """The Jacobi kernel's algorithm, in the kernel's own precision, meets the same gates."""
    a = spectrum_matrix(kind, n, 3, seed=n + 1).to(dtype)
    w, v = eigh_mod.jacobi_eigh_cpu(a)
    check_gates(a, w, v, dtype, f"jacobi {kind} n={n}")


def test_float_working_precision_is_why_the_kernel_works_in_double():
    """In float32 arithmetic the rotations accumulated in V drift past the 1e-5 orthogonality
    gate as n grows; this is the evidence for the kernel's double working precision."""
    a = spectrum_matrix("spd", 48, 2, seed=0).float()
    _, v = eigh_mod.jacobi_eigh_cpu(a, working_double=False)
    drift = torch.linalg.matrix_norm(v.double().mT @ v.double() - torch.eye(48, dtype=torch.float64)).max()
    assert drift > 1e-5
    _, v = eigh_mod.jacobi_eigh_cpu(a)
    drift = torch.linalg.matrix_norm(v.double().mT @ v.double() - torch.eye(48, dtype=torch.float64)).max()
    assert drift < 1e-6


def test_cuda_algorithm_odd_sizes_pair_every_index():
    """Round-robin pairing with a padded index (odd n): every off-diagonal entry is still zeroed."""
    a = spectrum_matrix("indefinite", 9, 2, seed=3)
    w, v = eigh_mod.jacobi_eigh_cpu(a)
    check_gates(a, w, v, torch.float64, "jacobi n=9")


@pytest.mark.parametrize("n", [5, 40])
def test_backends_agree_with_sign_convention(n):
    a = spectrum_matrix("spd", n, 4, seed=7)
    out = {}
    for name in ["cpp", "torch", "reference"]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PODIFF_BACKEND", name)
            out[name] = pk.batched_eigh(a)
    for name in ["cpp", "torch"]:
        torch.testing.assert_close(out[name][0], out["reference"][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[name][1], out["reference"][1], rtol=0, atol=1e-9)
    v = out["cpp"][1]
    biggest = torch.gather(v, -2, v.abs().argmax(-2, keepdim=True))
    assert (biggest > 0).all()


def test_batch_shape_and_lower_triangle_only():
    a = spectrum_matrix("indefinite", 6, 6, seed=1).reshape(2, 3, 6, 6)
    garbage = a + torch.triu(torch.randn(2, 3, 6, 6, dtype=torch.float64), 1)  # upper triangle ignored
    w, v = pk.batched_eigh(garbage)
    assert w.shape == (2, 3, 6) and v.shape == (2, 3, 6, 6)
    check_gates(a, w, v, torch.float64, "batch dims")


def test_empty_batch():
    w, v = pk.batched_eigh(torch.zeros(0, 4, 4))
    assert w.shape == (0, 4) and v.shape == (0, 4, 4)


@pytest.mark.parametrize("batch, n, case", [(8, 16, "n<=32"), (8, 48, "n>32"), (1, 48, "n>32")])
def test_dispatch_by_size(batch, n, case):
    a = spectrum_matrix("spd", n, batch, seed=0)
    pk.batched_eigh(a)
    choice = dispatch.last_choice["batched_eigh"]
    assert eigh_mod._case(a) == case
    expected = dispatch._REGISTRY["batched_eigh"].cpu_order[case][0][0]
    assert choice.backend == expected and choice.reason


def test_errors():
    with pytest.raises(ValueError, match=r"\[\.\.\., n, n\].*got \(3, 4\)"):
        pk.batched_eigh(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"got \(5,\)"):
        pk.batched_eigh(torch.zeros(5))
    with pytest.raises(TypeError, match="float32 or float64; got torch.int64"):
        pk.batched_eigh(torch.zeros(2, 3, 3, dtype=torch.int64))
    a = torch.eye(3).repeat(4, 1, 1)
    a[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="matrix 2 of the flattened batch has NaN or Inf"):
        pk.batched_eigh(a)


def test_not_differentiable_says_so():
    a = spectrum_matrix("spd", 4, 2, seed=0).requires_grad_()
    w, _ = pk.batched_eigh(a)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        w.sum().backward()


def test_opcheck():
    a = spectrum_matrix("spd", 6, 3, seed=0)
    torch.library.opcheck(torch.ops.podiff.batched_eigh.default, (a,), test_utils=("test_schema", "test_faketensor"))


CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """The CUDA kernel compiles without torch headers (it is built only on CUDA builds of torch)."""
    result = subprocess.run(
        ["nvcc", "-c", str(CSRC / "eigh_cuda.cu"), "-o", str(tmp_path / "eigh_cuda.o"), "-std=c++17"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "eigh_cuda.o").stat().st_size > 0


def test_compiles_fullgraph():
    a = spectrum_matrix("spd", 6, 4, seed=2)
    compiled = torch.compile(lambda m: pk.batched_eigh(m), fullgraph=True, backend="aot_eager")
    w, v = compiled(a)
    w0, v0 = pk.batched_eigh(a)
    assert torch.equal(w, w0) and torch.equal(v, v0)


@pytest.mark.parametrize("limit", [48 * 1024, 100 * 1024, 227 * 1024])
def test_python_shared_memory_mirror_matches_the_cuda_header(limit):
    """Dispatch sizes the CUDA kernel without building it; its formula must equal the header's."""
    from podiff_kernels import _extension

    largest = max(n for n in range(1, 1025) if eigh_mod._smem_bytes(n) <= limit)
    assert largest == _extension.load().cuda_eigh_max_n(limit)
