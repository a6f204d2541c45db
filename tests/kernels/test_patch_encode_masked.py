"""patch_encode(..., mask=): gappy POD against its float64 reference, span recovery, gradients,
the fixed-mask projector, the op contract and its errors."""

import pytest
import torch
from cases import SHAPE_IDS, SHAPES, interpreter_shape, make_case
from utils import assert_close, orthonormal

import podiff_kernels as pk
from podiff_kernels import dispatch, reference

BACKENDS = ["torch", "triton"]


def _mask(shape, batch: int | None = None, keep: float = 0.6, seed: int = 0) -> torch.Tensor:
    B, C, H, W = shape[:4]
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch or B, C, H, W, generator=g) < keep


@pytest.mark.parametrize("one_mask", [False, True], ids=["per-image", "shared-mask"])
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", BACKENDS)
def test_values_match_reference(backend, name, dtype, shape, local, one_mask):
    backend(name)
    mean_kind = ["shared", "local", "none"][SHAPES.index(shape) % 3]
    if name == "triton":  # two images: per-image masks still differ
        shape = interpreter_shape(shape)
    x, basis, mean, _ = make_case(shape, local, mean_kind)
    mask = _mask(shape, 1 if one_mask else None)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    # The reference on the rounded inputs: a patch with few valid pixels has a condition number
    # up to 1/gap_weight, so rounding the inputs to float32 moves the exact answer by ~1e-4.
    double = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    expected = reference.patch_encode_masked(double(x), mask, double(basis), double(mean), shape[4], shape[5], 1e-3)
    gappy = cast(x).masked_fill(~mask, float("nan"))  # masked values are never read
    got = pk.patch_encode(gappy, cast(basis), cast(mean), shape[4], shape[5], mask=mask)
    assert dispatch.last_choice["patch_encode_masked"].backend == name
    assert got.dtype == dtype
    assert_close(got, expected, dtype, f"masked encode[{name}]")


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the under-determined patches
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
def test_field_in_span_recovered_on_every_patch_with_enough_valid_pixels(backend, name, local):
    """x = decode(c) with no overlap; random mask; gap_weight = 0: every patch with >= r valid
    pixels gives back its c exactly; the zero-filled projection (the old encode) does not."""
    backend(name)
    B, C, H, W, p, r = 3, 1, 16, 20, 4, 5
    L, D = (H // p) * (W // p), C * p * p
    basis = orthonormal(D, r, *((L,) if local else ()), seed=3)
    mean = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    coeffs = torch.randn(B, L, r, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = pk.patch_decode(coeffs, basis, mean, (H, W), p, p)
    mask = _mask((B, C, H, W), keep=0.5, seed=6)
    valid_count = torch.nn.functional.unfold(mask.double(), p, stride=p).sum(1)  # [B, L]
    enough = valid_count >= r
    assert enough.float().mean() > 0.5 and (~enough).any()  # both kinds of patch occur
    got = pk.patch_encode(x.masked_fill(~mask, float("nan")), basis, mean, p, mask=mask, gap_weight=0.0)
    assert_close(got[enough], coeffs[enough], torch.float64, f"span recovery [{name}]")
    zero_filled = pk.patch_encode(torch.where(mask, x, 0.0), basis, mean, p)
    assert (zero_filled[enough] - coeffs[enough]).abs().max() > 0.1


def test_unmasked_equals_plain_encode_and_fully_masked_gives_zero():
    x, basis, mean, _ = make_case(SHAPES[1], False, "shared")
    everything = torch.ones_like(x, dtype=torch.bool)
    plain = pk.patch_encode(x, basis, mean, 4, 3)
    assert_close(pk.patch_encode(x, basis, mean, 4, 3, mask=everything), plain, torch.float64, "no gap")
    nothing = pk.patch_encode(x, basis, mean, 4, 3, mask=~everything)
    assert torch.equal(nothing, torch.zeros_like(nothing))  # the mean: c = 0


@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
def test_fixed_mask_projector_equals_per_patch_solve(local):
    shape = SHAPES[0]
    x, basis, mean, _ = make_case(shape, local, "shared")
    mask = _mask(shape, 1, seed=2)
    analysis = pk.masked_projector(mask[0], basis, shape[4], shape[5])
    assert analysis.shape == (basis.shape[-3] if local else 30, basis.shape[-2], basis.shape[-1])
    got = pk.patch_encode(torch.where(mask, x, 0.0), analysis, mean, shape[4], shape[5])
    expected = reference.patch_encode_masked(x, mask, basis, mean, shape[4], shape[5], 1e-3)
    assert_close(got, expected, torch.float64, "projector")


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
def test_gradients_match_reference(backend, name, local):
    backend(name)
    shape = SHAPES[0]
    x, basis, mean, _ = make_case(shape, local, "local")
    mask = _mask(shape)
    p, s = shape[4], shape[5]
    weights = torch.randn_like(reference.patch_encode_masked(x, mask, basis, mean, p, s))

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, basis, mean)]
        (fn(leaves[0], mask, leaves[1], leaves[2]) * weights).sum().backward()
        return [t.grad for t in leaves]

    got = grads(lambda a, m, b, c: pk.patch_encode(a, b, c, p, s, mask=m))
    assert dispatch.last_choice["patch_encode_masked"].backend == name
    expected = grads(lambda a, m, b, c: reference.patch_encode_masked(a, m, b, c, p, s, 1e-3))
    for what, g, e in zip(["x", "basis", "mean"], got, expected, strict=False):
        assert_close(g, e, torch.float64, f"masked encode[{name}] grad {what}")
    assert torch.equal(got[0][~mask], torch.zeros_like(got[0][~mask]))  # masked pixels are not read


def test_gradcheck_and_opcheck():
    shape = (1, 1, 7, 7, 3, 2)
    x, basis, mean, _ = make_case(shape, False, "shared", r=3)
    mask = _mask(shape, seed=1)
    args = (x.requires_grad_(), basis.requires_grad_(), mean.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, c: pk.patch_encode(a, b, c, 3, 2, mask=mask), args)
    # The local basis (test_drop_in opchecks the shared one); C = 3, overlap; small, because
    # opcheck runs the op dozens of times.
    small = (1, 3, 10, 7, 4, 3)
    for local in (True,):
        x, basis, mean, _ = make_case(small, local, "shared")
        m = _mask(small)
        op_args = (x.float().requires_grad_(), m, basis.float().requires_grad_(), mean.float().requires_grad_(),
                   4, 3, 1e-3)
        torch.library.opcheck(torch.ops.podiff.patch_encode_masked.default, op_args)


@pytest.mark.parametrize(
    "mask, gap_weight, error, words",
    [
        (torch.ones(2, 1, 13, 11), 1e-3, TypeError, ["mask", "bool", "torch.float32"]),
        (torch.ones(3, 1, 13, 11, dtype=torch.bool), 1e-3, ValueError, ["mask", "(2, 1, 13, 11)", "(3, 1, 13, 11)"]),
        (torch.ones(1, 1, 13, 10, dtype=torch.bool), 1e-3, ValueError, ["mask", "(1, 1, 13, 10)"]),
        (torch.ones(2, 1, 13, 11, dtype=torch.bool), -1.0, ValueError, ["gap_weight", ">= 0", "-1.0"]),
    ],
)
def test_bad_arguments_are_named(mask, gap_weight, error, words):
    x, basis, mean, _ = make_case(SHAPES[0], False, "shared")
    with pytest.raises(error) as info:
        pk.patch_encode(x.float(), basis.float(), mean.float(), 3, 2, mask=mask, gap_weight=gap_weight)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
