"""patch_encode: every backend against the float64 reference, values and gradients, plus contract checks."""

import pytest
import torch
from cases import SHAPE_IDS, SHAPES, make_case
from utils import assert_close

import podiff_kernels as pk
from podiff_kernels import dispatch, reference

BACKENDS = ["torch", "cpp", "triton"]
MEAN_KINDS = ["shared", "local", "none"]


def _mean_kind(i: int) -> str:
    return MEAN_KINDS[i % len(MEAN_KINDS)]


@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", BACKENDS)
def test_values_match_reference(backend, name, dtype, shape, local):
    backend(name)
    x, basis, mean, _ = make_case(shape, local, _mean_kind(SHAPES.index(shape)))
    expected = reference.patch_encode(x, basis, mean, shape[4], shape[5])
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    got = pk.patch_encode(cast(x), cast(basis), cast(mean), shape[4], shape[5])
    assert dispatch.last_choice["patch_encode"].backend == name  # the kernel under test really ran
    assert got.dtype == dtype
    assert_close(got, expected, dtype, f"encode[{name}]")


@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[3:4], ids=SHAPE_IDS[:4])
@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_match_reference(backend, name, shape, local):
    """d/dx, d/dbasis, d/dmean of a random linear functional, against autograd through the reference."""
    backend(name)
    x, basis, mean, _ = make_case(shape, local, _mean_kind(SHAPES.index(shape) + 1))
    p, s = shape[4], shape[5]
    inputs = [t.clone().requires_grad_() for t in (x, basis, mean) if t is not None]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    weights = torch.randn_like(reference.patch_encode(x, basis, mean, p, s))

    def run(fn, args):
        m = args[2] if len(args) == 3 else None
        (fn(args[0], args[1], m, p, s) * weights).sum().backward()
        return [a.grad for a in args]

    got = run(pk.patch_encode, inputs)
    assert dispatch.last_choice["patch_encode"].backend == name
    expected = run(reference.patch_encode, ref_inputs)
    for what, g, e in zip(["x", "basis", "mean"], got, expected, strict=False):
        assert_close(g, e, torch.float64, f"encode[{name}] grad {what}")


@pytest.mark.parametrize("name", ["torch", "cpp", "reference"])
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
def test_gradcheck(backend, name, local):
    backend(name)
    x, basis, mean, _ = make_case((1, 2, 7, 5, 3, 2), local, "shared", r=3)
    args = tuple(t.requires_grad_() for t in (x, basis, mean))
    assert torch.autograd.gradcheck(lambda a, b, m: pk.patch_encode(a, b, m, 3, 2), args)


def test_default_cpu_choice_is_a_fast_path():
    x, basis, mean, _ = make_case(SHAPES[0], False, "shared")
    pk.patch_encode(x.float(), basis.float(), mean.float(), 3, 2)
    assert dispatch.last_choice["patch_encode"].backend in ("torch", "cpp")


def test_opcheck():
    for local in (False, True):
        x, basis, mean, _ = make_case(SHAPES[1], local, "shared")
        args = (x.float().requires_grad_(), basis.float().requires_grad_(), mean.float().requires_grad_(), 4, 3)
        torch.library.opcheck(torch.ops.podiff.patch_encode.default, args)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(x=torch.randn(3, 13, 11)), ValueError, ["x", "[B, C, H, W]", "(3, 13, 11)"]),
        (dict(basis=torch.randn(10, 4)), ValueError, ["basis", "D = C*p*p", "9", "(10, 4)"]),
        (dict(basis=torch.randn(7, 9, 4)), ValueError, ["local basis", "[L, D, r]", "(7, 9, 4)"]),
        (dict(mean=torch.randn(8)), ValueError, ["mean", "[9]", "(8,)"]),
        (dict(x=torch.randn(2, 1, 14, 11)), ValueError, ["height 14", "not covered", "stride=2"]),
        (dict(x=torch.randn(2, 1, 2, 11)), ValueError, ["height 2", "smaller than patch_size 3"]),
        (dict(x=torch.ones(2, 1, 13, 11, dtype=torch.int64)), TypeError, ["x", "floating", "torch.int64"]),
        (dict(basis=torch.randn(9, 4, dtype=torch.float64)), TypeError, ["basis", "float64", "float32"]),
        (dict(stride=4), ValueError, ["stride", "<= patch_size", "4", "3"]),
        (dict(stride=0), ValueError, ["stride", ">= 1", "0"]),
        (dict(patch_size=2.5), TypeError, ["patch_size", "int", "2.5"]),
    ],
)
def test_bad_input_names_argument_expected_and_actual(change, error, words):
    args = dict(x=torch.randn(2, 1, 13, 11), basis=torch.randn(9, 4), mean=torch.randn(9), patch_size=3, stride=2)
    args.update(change)
    with pytest.raises(error) as info:
        pk.patch_encode(**args)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_mixed_devices_error():
    meta = torch.randn(9, 4, device="meta")
    with pytest.raises(ValueError, match="basis is on meta but x is on cpu"):
        pk.patch_encode(torch.randn(2, 1, 13, 11), meta, None, 3, 2)
