"""patch_decode: every backend against the float64 reference, values and gradients, round trips, contract."""

import pytest
import torch
from cases import SHAPE_IDS, SHAPES, interpreter_shape, make_case
from utils import assert_close, orthonormal

import podiff_kernels as pk
from podiff_kernels import dispatch, reference
from podiff_kernels._geometry import cover_counts, make_grid

BACKENDS = ["torch", "cpp", "triton"]
MEAN_KINDS = ["shared", "local", "none"]


@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", BACKENDS)
def test_values_match_reference(backend, name, dtype, shape, local):
    backend(name)
    r = 40 if shape == SHAPES[2] else 5  # r = 40: more than one r-block in the Triton kernel
    mean_kind = MEAN_KINDS[SHAPES.index(shape) % 3]
    if name == "triton":
        shape = interpreter_shape(shape)
    _, basis, mean, coeffs = make_case(shape, local, mean_kind, r=r)
    size, p, s = shape[2:4], shape[4], shape[5]
    expected = reference.patch_decode(coeffs, basis, mean, size, p, s)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    got = pk.patch_decode(cast(coeffs), cast(basis), cast(mean), size, p, s)
    assert dispatch.last_choice["patch_decode"].backend == name
    assert got.dtype == dtype
    assert_close(got, expected, dtype, f"decode[{name}]")


@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_match_reference(backend, name, shape, local):
    backend(name)
    mean_kind = MEAN_KINDS[(SHAPES.index(shape) + 1) % 2]
    if name == "triton":
        shape = interpreter_shape(shape)
    _, basis, mean, coeffs = make_case(shape, local, mean_kind)
    size, p, s = shape[2:4], shape[4], shape[5]
    weights = torch.randn(shape[0], shape[1], *size, dtype=torch.float64)

    def run(fn):
        args = [t.detach().clone().requires_grad_() for t in (coeffs, basis, mean)]
        (fn(args[0], args[1], args[2], size, p, s) * weights).sum().backward()
        return [a.grad for a in args]

    got = run(pk.patch_decode)
    assert dispatch.last_choice["patch_decode"].backend == name
    for what, g, e in zip(["coeffs", "basis", "mean"], got, run(reference.patch_decode), strict=False):
        assert_close(g, e, torch.float64, f"decode[{name}] grad {what}")


@pytest.mark.parametrize("name", ["torch", "cpp", "reference"])
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
def test_gradcheck(backend, name, local):
    backend(name)
    _, basis, mean, coeffs = make_case((1, 2, 7, 5, 3, 2), local, "local", r=3)
    args = tuple(t.requires_grad_() for t in (coeffs, basis, mean))
    assert torch.autograd.gradcheck(lambda c, b, m: pk.patch_decode(c, b, m, (7, 5), 3, 2), args)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=["overlap", "no_overlap"])
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
def test_full_rank_round_trip_is_identity(backend, name, shape, local):
    """decode(encode(x)) == x for a full-rank orthonormal basis, with or without overlap."""
    backend(name)
    B, C, H, W, p, s = shape
    grid = make_grid(C, H, W, p, s)
    D = grid.patch_dim
    basis = orthonormal(D, D, *((grid.num_locations,) if local else ()), seed=3)
    mean = torch.randn(D, dtype=torch.float64)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    back = pk.patch_decode(pk.patch_encode(x, basis, mean, p, s), basis, mean, (H, W), p, s)
    assert_close(back, x, torch.float64, f"round trip[{name}]")


def test_cover_counts_match_fold_of_ones():
    for _, C, H, W, p, s in SHAPES:
        grid = make_grid(C, H, W, p, s)
        ones = torch.ones(1, grid.patch_dim, grid.num_locations, dtype=torch.float64)
        fold = torch.nn.functional.fold(ones, (H, W), p, stride=s)[0, 0]
        assert torch.equal(cover_counts(grid, dtype=torch.float64), fold)


def test_opcheck():
    for local in (False, True):
        _, basis, mean, coeffs = make_case(SHAPES[1], local, "local")
        args = (coeffs.float().requires_grad_(), basis.float().requires_grad_(), mean.float().requires_grad_(),
                13, 7, 4, 3, True)
        torch.library.opcheck(torch.ops.podiff.patch_decode.default, args)


def test_compiles_fullgraph_with_encode():
    _, basis, mean, _ = make_case(SHAPES[0], False, "shared")
    basis, mean = basis.float(), mean.float()
    x = torch.randn(2, 1, 13, 11)

    def project(img):
        return pk.patch_decode(pk.patch_encode(img, basis, mean, 3, 2), basis, mean, (13, 11), 3, 2)

    compiled = torch.compile(project, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), project(x), torch.float32, "compiled")


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(coeffs=torch.randn(2, 29, 4)), ValueError, ["coeffs", "[B, 30, 4]", "(2, 29, 4)"]),
        (dict(coeffs=torch.randn(30, 4)), ValueError, ["coeffs", "(30, 4)"]),
        (dict(basis=torch.randn(10, 4)), ValueError, ["D = 10", "patch_size^2 = 9"]),
        (dict(basis=torch.randn(9, 5)), ValueError, ["coeffs", "[B, 30, 5]", "(2, 30, 4)"]),
        (dict(image_size=(14, 11)), ValueError, ["height 14", "not covered"]),
        (dict(image_size=13), ValueError, ["image_size", "(H, W)", "13"]),
        (dict(mean=torch.randn(30, 8)), ValueError, ["mean", "[30, 9]", "(30, 8)"]),
        (dict(coeffs=torch.randn(2, 30, 4, dtype=torch.float64)), TypeError, ["basis", "float32", "coeffs"]),
    ],
)
def test_bad_input(change, error, words):
    args = dict(coeffs=torch.randn(2, 30, 4), basis=torch.randn(9, 4), mean=None, image_size=(13, 11),
                patch_size=3, stride=2)
    args.update(change)
    with pytest.raises(error) as info:
        pk.patch_decode(**args)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
