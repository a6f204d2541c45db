"""patch_stats: against the pairwise float64 reference, strip chunking, exact merges,
masks (NaN and explicit), complete-case statistics, cancellation, errors, opcheck."""

import pytest
import torch
from cases import SHAPE_IDS, SHAPES

import podiff_kernels as pk
from podiff_kernels import dispatch
from podiff_kernels.reference import patch_stats as ref


def reference_stats(x, valid, p, s, local):
    c, m, m2 = ref.patch_stats(torch.where(valid, x, 0.0) if valid is not None else x, valid, p, s, local)
    return ref.covariance(c, m2), m.diagonal(dim1=1, dim2=2), c.diagonal(dim1=1, dim2=2)


def random_valid(shape, seed, keep=0.7):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < keep


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(shape, dtype, local, masked):
    B, C, H, W, p, s = shape
    g = torch.Generator().manual_seed(B * H + W)
    x = (3.0 + torch.randn(B, C, H, W, generator=g, dtype=torch.float64)).to(dtype)
    mask = random_valid((B, 1, H, W), seed=H) if masked else None
    stats = pk.patch_stats(x, p, s, local=local, mask=mask)
    assert dispatch.last_choice["patch_stats"].backend == "torch"
    assert stats.masked == masked and stats.m2.dtype == torch.float64
    valid = mask.expand(B, C, H, W) if masked else None
    cov, mean, n = reference_stats(x.double(), valid, p, s, local)
    torch.testing.assert_close(stats.covariance(), cov, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(stats.mean_vector(), mean, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(stats.samples(), n, rtol=0, atol=0)


@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_strip_chunks_and_merges_are_exact(local, masked):
    x = torch.randn(5, 2, 17, 13, dtype=torch.float64)
    mask = random_valid((5, 2, 17, 13), seed=1) if masked else None
    whole = pk.patch_stats(x, 5, 2, local=local, mask=mask)
    tiny_budget = pk.patch_stats(x, 5, 2, local=local, mask=mask, budget_bytes=1)  # one strip at a time
    merged = None
    for part in torch.split(torch.arange(5), [2, 1, 2]):
        one = pk.patch_stats(x[part], 5, 2, local=local, mask=None if mask is None else mask[part])
        merged = one if merged is None else merged + one
    for other in (tiny_budget, merged):
        torch.testing.assert_close(other.covariance(), whole.covariance(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(other.mean_vector(), whole.mean_vector(), rtol=1e-12, atol=1e-13)


def test_merge_of_dense_and_masked_batches():
    x = torch.randn(4, 1, 9, 9, dtype=torch.float64)
    x[2:, :, :3, :3] = float("nan")
    mixed = pk.patch_stats(x[:2], 3) + pk.patch_stats(x[2:], 3)
    assert mixed.masked
    cov, mean, n = reference_stats(torch.nan_to_num(x), ~torch.isnan(x), 3, 3, False)
    torch.testing.assert_close(mixed.covariance(), cov, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(mixed.samples(), n)


@pytest.mark.parametrize("mode", ["dense", "masked", "complete"])
@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", ["triton"])
def test_triton_kernel_matches_reference(backend, name, shape, dtype, local, mode):
    """The Triton kernel (interpreter here) against the float64 reference, every state form."""
    backend(name)
    B, C, H, W, p, s = shape
    g = torch.Generator().manual_seed(B * H + W + 2)
    x = (1e3 + torch.randn(B, C, H, W, generator=g, dtype=torch.float64)).to(dtype)
    mask = None if mode == "dense" else random_valid((B, 1, H, W), seed=H + 2, keep=0.9)
    stats = pk.patch_stats(x, p, s, local=local, mask=mask, complete=mode == "complete")
    assert dispatch.last_choice["patch_stats"].backend == "triton"
    assert stats.masked == (mode == "masked")
    valid = None if mask is None else mask.expand(B, C, H, W)
    xv = x.double() if valid is None else torch.where(valid, x.double(), 0.0)
    c, m, m2 = ref.patch_stats(xv, valid, p, s, local, complete=mode == "complete")
    torch.testing.assert_close(stats.covariance(), ref.covariance(c, m2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.mean_vector(), m.diagonal(dim1=1, dim2=2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.samples(), c.diagonal(dim1=1, dim2=2), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_large_offset_does_not_cancel(backend, name):
    """1e6 + N(0, 1): centred about per-pixel means first, both paths keep the covariance to
    1e-9 (the one-pass E[x²] − E[x]² would lose ~12 digits), and so does a merge of chunks."""
    backend(name)
    g = torch.Generator().manual_seed(0)
    x = 1e6 + torch.randn(24, 1, 8, 8, generator=g, dtype=torch.float64)
    stats = pk.patch_stats(x[:10], 4) + pk.patch_stats(x[10:], 4)
    assert dispatch.last_choice["patch_stats"].backend == name
    patches = torch.nn.functional.unfold(x, 4, stride=4).transpose(1, 2).reshape(-1, 16)
    torch.testing.assert_close(stats.covariance()[0], torch.cov((patches - 1e6).T), rtol=0, atol=1e-9)


@pytest.mark.parametrize("local", [False, True], ids=["shared", "local"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_complete_cases_match_the_reference_and_the_filtered_patches(shape, dtype, local):
    B, C, H, W, p, s = shape
    g = torch.Generator().manual_seed(B * H + W + 1)
    x = (3.0 + torch.randn(B, C, H, W, generator=g, dtype=torch.float64)).to(dtype)
    mask = random_valid((B, 1, H, W), seed=H + 1, keep=0.97)
    stats = pk.patch_stats(x, p, s, local=local, mask=mask, complete=True)
    assert not stats.masked  # compact state
    valid = mask.expand(B, C, H, W)
    c, m, m2 = ref.patch_stats(torch.where(valid, x.double(), 0.0), valid, p, s, local, complete=True)
    torch.testing.assert_close(stats.covariance(), ref.covariance(c, m2), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(stats.mean_vector(), m.diagonal(dim1=1, dim2=2), rtol=1e-11, atol=1e-12)
    # Independently: the complete rows of the patch matrix, through torch.cov.
    from podiff_kernels.reference.patches import extract_patches
    X = extract_patches(torch.where(valid, x.double(), float("nan")), p, s)  # B, L, D
    groups = X.transpose(0, 1) if local else X.reshape(1, -1, X.shape[-1])
    for gi in range(groups.shape[0]):
        rows = groups[gi][~torch.isnan(groups[gi]).any(-1)]
        assert int(stats.samples()[gi, 0]) == rows.shape[0]
        if rows.shape[0] >= 2:
            torch.testing.assert_close(stats.covariance()[gi], torch.cov(rows.T).reshape(X.shape[-1], -1),
                                       rtol=1e-10, atol=1e-12)


def test_complete_cases_are_a_covariance_where_pairwise_is_not():
    """Pooled patches masked at different pixels (a coast crossing the grid): the pairwise matrix
    mixes pixel pairs from different sets of locations and has negative eigenvalues; the
    complete-case one is positive semi-definite, and both chunk and merge exactly."""
    g = torch.Generator().manual_seed(5)
    ramp = torch.linspace(0, 20, 32, dtype=torch.float64)  # a strong gradient across locations
    x = ramp[None, None, None, :] + 0.05 * torch.randn(30, 1, 16, 32, generator=g, dtype=torch.float64)
    land = torch.zeros(16, 32, dtype=torch.bool)
    for col in range(32):
        land[: (col * 7) % 5, col] = True  # a ragged coast: masks differ between patches
    x[:, :, land] = float("nan")
    pairwise = pk.patch_stats(x, 4)
    complete = pk.patch_stats(x, 4, complete=True)
    assert float(torch.linalg.eigvalsh(pairwise.covariance()[0]).min()) < -1e-3
    assert float(torch.linalg.eigvalsh(complete.covariance()[0]).min()) > -1e-12
    merged = pk.patch_stats(x[:11], 4, complete=True) + pk.patch_stats(x[11:], 4, complete=True, budget_bytes=1)
    torch.testing.assert_close(merged.covariance(), complete.covariance(), rtol=1e-12, atol=1e-13)


def test_no_cancellation_with_a_large_offset():
    """Centred per strip, merged with Chan's update: E[x²] − E[x]² would lose ~12 digits here."""
    g = torch.Generator().manual_seed(0)
    x = 1e6 + torch.randn(64, 1, 8, 8, generator=g, dtype=torch.float64)
    stats = None
    for chunk in x.split(8):
        stats = pk.patch_stats(chunk, 4) if stats is None else stats + pk.patch_stats(chunk, 4)
    patches = torch.nn.functional.unfold(x, 4, stride=4).transpose(1, 2).reshape(-1, 16)
    truth = torch.cov((patches - 1e6).T)  # the subtraction is exact: same values, no offset
    # A float64 mean of 1e6 carries ~1e-10 absolute error, the floor for any streaming method;
    # the one-pass formula's error is ~eps·1e12 = 1e-4.
    torch.testing.assert_close(stats.covariance()[0], truth, rtol=0, atol=1e-9)
    n = patches.shape[0]
    naive = (patches.T @ patches - n * patches.mean(0)[:, None] * patches.mean(0)[None, :]) / (n - 1)
    assert (naive - truth).abs().max() > 1e-6


def test_fixed_land_mask_gives_the_sea_covariance():
    """A mask fixed in time: the local covariance is the sea pixels' covariance, zero on land."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 1, 8, 8, generator=g, dtype=torch.float64)
    land = torch.zeros(8, 8, dtype=torch.bool)
    land[:, :3] = True  # the first 3 columns are land at every time
    x[:, :, land] = float("nan")
    stats = pk.patch_stats(x, 4, local=True)
    patches = torch.nn.functional.unfold(x, 4, stride=4).permute(2, 0, 1)  # L, B, D
    for loc in range(stats.m2.shape[0]):
        sea = ~torch.isnan(patches[loc, 0])
        cov = stats.covariance()[loc]
        if sea.any():
            expected = torch.cov(patches[loc][:, sea].T).reshape(int(sea.sum()), int(sea.sum()))
            torch.testing.assert_close(cov[sea][:, sea], expected, rtol=1e-12, atol=1e-13)
        assert (cov[~sea] == 0).all() and (cov[:, ~sea] == 0).all()
        assert (stats.samples()[loc][~sea] == 0).all() and (stats.samples()[loc][sea] == 20).all()


def test_errors():
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"infinite value at \(1, 0, 2, 3\) outside the mask"):
        bad = x.clone()
        bad[1, 0, 2, 3] = float("inf")
        pk.patch_stats(bad, 4)
    masked_inf = x.clone()
    masked_inf[0, 0, 0, 0] = float("inf")
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[0, 0] = False
    pk.patch_stats(masked_inf, 4, mask=mask)  # an Inf under the mask is fine
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        pk.patch_stats(x, 4, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"mask must broadcast to x's shape \(2, 1, 8, 8\).*got \(7, 8\)"):
        pk.patch_stats(x, 4, mask=torch.ones(7, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="no images"):
        pk.patch_stats(torch.zeros(0, 1, 8, 8), 4)
    with pytest.raises(ValueError, match="not covered by patch_size=3, stride=2"):
        pk.patch_stats(x, 3, 2)
    with pytest.raises(ValueError, match="different geometry"):
        pk.patch_stats(x, 4) + pk.patch_stats(x, 4, local=True)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]; got 3 dims"):
        pk.patch_stats(x[0], 4)


def test_opcheck():
    x = torch.randn(2, 1, 7, 7, dtype=torch.float64)
    valid = torch.rand(2, 1, 7, 7) > 0.3
    for v in (None, valid):
        for local in (False, True):
            for complete in (False, True):
                torch.library.opcheck(torch.ops.podiff.patch_stats.default, (x, v, 3, 2, local, 1 << 20, complete),
                                      test_utils=("test_schema", "test_faketensor"))


def test_op_compiles_fullgraph():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    compiled = torch.compile(lambda t: torch.ops.podiff.patch_stats(t, None, 4, 2, True, 1 << 20),
                             fullgraph=True, backend="aot_eager")
    stats = pk.patch_stats(x, 4, 2, local=True)
    count, mean, m2 = compiled(x)
    assert torch.equal(m2, stats.m2) and torch.equal(mean, stats.mean) and torch.equal(count, stats.count)
