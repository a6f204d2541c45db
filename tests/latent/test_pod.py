"""PatchPOD: scikit-learn PCA agreement, local bases, rank/energy, padding, masks, streaming,
analytic moments, save/load (and bad files), errors, and a 2-process distributed fit."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import podiff_kernels as pk
from podiff import PatchPOD


def smooth_fields(n, c=1, h=24, w=24, seed=0, dtype=torch.float64):
    """Correlated random fields (blurred noise plus a trend): a decaying POD spectrum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h + 6, w + 6, generator=g, dtype=torch.float64)
    x = F.avg_pool2d(x, 7, stride=1)
    yy = torch.linspace(0, 1, h, dtype=torch.float64)[:, None]
    return (x * 3 + 2 * yy).to(dtype)


def test_shared_matches_scikit_learn_pca():
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = smooth_fields(40, c=2, seed=1)
    p, s, r = 4, 2, 12
    pod = PatchPOD(p, s, rank=r).fit(x, progress=False)
    patches = F.unfold(x, p, stride=s).transpose(1, 2).reshape(-1, 2 * p * p).numpy()
    pca = decomposition.PCA(n_components=r, svd_solver="full").fit(patches)
    np.testing.assert_allclose(pod.eigenvalues.numpy(), pca.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(pod.explained_variance_ratio.numpy(), pca.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(pod.mean[0].numpy(), pca.mean_, rtol=1e-10, atol=1e-12)
    # Principal angles between the subspaces: all cosines 1.
    cosines = np.linalg.svd(pod.basis[0].numpy().T @ pca.components_.T, compute_uv=False)
    assert cosines.min() > 1 - 1e-6, cosines.min()
    # And mode by mode (distinct eigenvalues), up to sign.
    dots = np.abs(np.sum(pod.basis[0].numpy() * pca.components_.T, axis=0))
    np.testing.assert_allclose(dots, 1.0, atol=1e-6)


def test_local_matches_per_location_eigh():
    x = smooth_fields(30, seed=2)
    pod = PatchPOD(6, 6, rank=5, basis="local").fit(x, progress=False)
    patches = F.unfold(x, 6, stride=6).permute(2, 0, 1)  # L, B, D
    for loc in [0, 7, patches.shape[0] - 1]:
        cov = torch.cov(patches[loc].T)
        w, v = torch.linalg.eigh(cov)
        torch.testing.assert_close(pod.eigenvalues[loc], w.flip(0)[:5], rtol=1e-9, atol=1e-12)
        cosines = torch.linalg.svdvals(pod.basis[loc].T @ v.flip(1)[:, :5])
        assert cosines.min() > 1 - 1e-9


@pytest.mark.parametrize("basis", ["shared", "local"])
@pytest.mark.parametrize("size, p, s", [((24, 24), 4, 4), ((23, 19), 5, 3), ((20, 20), 6, 4)])
def test_full_rank_round_trip_with_padding(basis, size, p, s):
    x = smooth_fields(48, h=size[0], w=size[1], seed=3)
    pod = PatchPOD(p, s, basis=basis).fit(x, progress=False)
    assert pod.rank == p * p
    y = pod.decode(pod.encode(x))
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-9)


def test_standardised_tokens_have_unit_variance_per_mode():
    x = smooth_fields(50, seed=4)
    pod = PatchPOD(4, 4, rank=6).fit(x, progress=False)
    tokens = pod.encode(x)
    var = tokens.reshape(-1, 6).var(0)
    torch.testing.assert_close(var, torch.ones(6, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    raw = pod.encode(x, standardized=False)
    torch.testing.assert_close(pod.decode(raw, standardized=False), pod.decode(tokens))


def test_energy_rank_shared_and_local():
    x = smooth_fields(40, seed=5)
    pod = PatchPOD(4, 4, energy=0.95).fit(x, progress=False)
    ratio = pod.explained_variance_ratio
    assert ratio.sum() >= 0.95 - 1e-12 and ratio[:-1].sum() < 0.95  # smallest such r
    assert pod.report["energy_reached"] >= 0.95 - 1e-12
    loc = PatchPOD(4, 4, energy=0.95, basis="local").fit(x, progress=False)
    reached = torch.tensor(loc.report["energy_reached"])
    assert (reached >= 0.95 - 1e-12).all()
    all_modes = PatchPOD(4, 4, basis="local").fit(x, progress=False)
    shares = all_modes.explained_variance_ratio.cumsum(-1)
    assert bool((shares[:, loc.rank - 2] < 0.95).any())  # one mode fewer leaves some location short


def test_masked_pixels_never_enter_and_come_back_nan():
    x = smooth_fields(30, seed=6)
    land = torch.zeros(24, 24, dtype=torch.bool)
    land[:8, :5] = True
    x[:, :, land] = float("nan")
    for basis in ("shared", "local"):
        pod = PatchPOD(4, 4, rank=4, basis=basis).fit(x, progress=False)
        assert torch.isfinite(pod.basis).all() and torch.isfinite(pod.mean).all()
        out = pod.decode(pod.encode(x))
        assert torch.isnan(out[:, :, land]).all()
        assert torch.isfinite(out[:, :, ~land]).all()
    # An explicit mask does the same as NaN.
    clean = smooth_fields(30, seed=6)
    a = PatchPOD(4, 4, rank=4).fit(clean, mask=~land, progress=False)
    b = PatchPOD(4, 4, rank=4).fit(x, progress=False)
    torch.testing.assert_close(a.basis, b.basis)


def test_rarely_valid_pixels_are_reported_not_used():
    x = smooth_fields(10, seed=7)
    x[1:, :, 0, 0] = float("nan")  # pixel (0, 0) valid in one image only
    with pytest.warns(RuntimeWarning, match="fewer than min_samples=2"):
        pod = PatchPOD(4, 4, rank=3, basis="local").fit(x, progress=False)
    assert pod.report["sparse_pixels"] == 1 and pod.report["sparse_locations"] == [0]
    assert (pod.basis[0, 0] == 0).all()


def test_streaming_fit_equals_tensor_fit():
    x = smooth_fields(37, seed=8)
    whole = PatchPOD(4, 2, rank=6).fit(x, batch_size=1000, progress=False)
    batches = (x[i : i + 5] for i in range(0, 37, 5))
    stream = PatchPOD(4, 2, rank=6).fit(batches, progress=False)
    torch.testing.assert_close(stream.basis, whole.basis, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stream.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=1e-14)
    assert stream.report["images"] == 37


def test_decode_moments_equal_the_decoded_ensemble_without_overlap():
    x = smooth_fields(30, seed=9)
    pod = PatchPOD(4, 4, rank=8, basis="local").fit(x, progress=False)
    g = torch.Generator().manual_seed(0)
    members = pod.encode(x[:2])[None] + torch.randn(40, 2, 36, 8, generator=g, dtype=torch.float64)
    mean, cov = pk.ensemble_moments(members)
    pixel_mean, pixel_var = pod.decode_moments(mean, cov)
    decoded = torch.stack([pod.decode(m) for m in members])
    torch.testing.assert_close(pixel_mean, decoded.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pixel_var, decoded.var(0), rtol=1e-9, atol=1e-10)


def test_save_load_round_trip_and_bad_files(tmp_path):
    x = smooth_fields(20, h=22, w=22, seed=10)
    x[:, :, :2, :2] = float("nan")
    pod = PatchPOD(4, 3, energy=0.9, basis="local").fit(x, progress=False)
    path = tmp_path / "pod.safetensors"
    pod.save(path)
    back = PatchPOD.load(path)
    assert torch.equal(back.encode(x), pod.encode(x))
    assert torch.equal(back.decode(pod.encode(x)).nan_to_num(-1), pod.decode(pod.encode(x)).nan_to_num(-1))
    assert back.report == json.loads(json.dumps(pod.report)) and back.rank == pod.rank
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away

    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PatchPOD file"):
        PatchPOD.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable PatchPOD file"):
        PatchPOD.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a PatchPOD"):
        PatchPOD.load(tmp_path / "other.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["podiff"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta["version"] = 99
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={"podiff": json.dumps(meta)})
    with pytest.raises(ValueError, match="version 99; this podiff reads version 1"):
        PatchPOD.load(tmp_path / "future.safetensors")
    with pytest.raises(FileNotFoundError, match="no PatchPOD file"):
        PatchPOD.load(tmp_path / "missing.safetensors")


def test_errors():
    x = smooth_fields(8, seed=11)
    with pytest.raises(ValueError, match="rank or energy, not both"):
        PatchPOD(4, rank=2, energy=0.9)
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]; got 1.5"):
        PatchPOD(4, energy=1.5)
    with pytest.raises(ValueError, match="basis must be 'shared' or 'local'; got 'global'"):
        PatchPOD(4, basis="global")
    with pytest.raises(ValueError, match="rank must be <= D = C·p·p = 16; got rank=20"):
        PatchPOD(4, rank=20).fit(x, progress=False)
    with pytest.raises(RuntimeError, match="not fitted yet"):
        PatchPOD(4).encode(x)
    with pytest.raises(ValueError, match="no images"):
        PatchPOD(4).fit(iter([]), progress=False)
    with pytest.raises(ValueError, match="holds 1 image"):
        PatchPOD(4).fit(x[:1], progress=False)
    pod = PatchPOD(4, rank=3, basis="local").fit(x, progress=False)
    with pytest.raises(ValueError, match="3 channels; this POD was fitted on 1"):
        pod.encode(x.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"local POD works on its fitted size \(24, 24\)"):
        pod.encode(x[..., :20, :20])
    with pytest.raises(ValueError, match=r"tokens must be \[B, L=36, r=3\]; got \(8, 36, 4\)"):
        pod.decode(torch.zeros(8, 36, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"same \[C, H, W\]"):
        PatchPOD(4).fit([x, x[..., :20, :20]], progress=False)


def test_shared_basis_encodes_other_sizes():
    x = smooth_fields(20, seed=12)
    pod = PatchPOD(4, 4).fit(x, progress=False)
    big = smooth_fields(2, h=40, w=36, seed=13)
    tokens = pod.encode(big)
    torch.testing.assert_close(pod.decode(tokens, image_size=(40, 36)), big, rtol=1e-9, atol=1e-9)



@pytest.mark.parametrize("stride", [4, 2])
def test_a_shared_basis_on_another_domain_has_its_grid_mask_and_exact_moments(stride):
    x = smooth_fields(20, seed=14)
    pod = PatchPOD(4, stride, rank=10).fit(x, progress=False)
    valid = torch.ones(1, 30, 20, dtype=torch.bool)
    valid[0, :6, :5] = False
    view = pod.on_domain((30, 20), valid)
    assert view.grid == (pod._padded_size(30, 20)[0] // stride - (4 // stride - 1),
                         pod._padded_size(30, 20)[1] // stride - (4 // stride - 1))
    assert view.basis is pod.basis and pod.image_size == (24, 24)  # a view: the fit is untouched
    big = smooth_fields(3, h=30, w=20, seed=15)
    tokens = view.encode(big.masked_fill(~valid, float("nan")))
    # The tokens are the domain's patches' least-squares coefficients, as the fitted POD's encode
    # of another size gives them; decoding masks the domain's invalid pixels.
    torch.testing.assert_close(tokens, pod.encode(big.masked_fill(~valid, float("nan"))), rtol=1e-9, atol=1e-9)
    assert torch.equal(torch.isnan(view.decode(tokens))[0], ~valid)
    if stride != 4:  # overlapping patches: the block variance leaves out the overlap covariance
        return
    # The closed-form moments of an ensemble on the domain: the decoded members' mean and variance.
    g = torch.Generator().manual_seed(0)
    members = tokens[None] + 0.3 * torch.randn(6, *tokens.shape, generator=g, dtype=tokens.dtype)
    mean_tok, cov = pk.ensemble_moments(members)
    mean, var = view.decode_moments(mean_tok, cov)
    decoded = torch.stack([view.decode(m) for m in members])
    torch.testing.assert_close(mean, decoded.mean(0), rtol=1e-9, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(var, decoded.var(0), rtol=1e-7, atol=1e-9, equal_nan=True)


def test_a_local_basis_or_a_bad_mask_on_another_domain_is_an_error():
    x = smooth_fields(40, seed=16)
    local = PatchPOD(4, 4, rank=4, basis="local").fit(x, progress=False)
    assert local.on_domain((24, 24)) is local
    with pytest.raises(ValueError, match=r"a local POD basis belongs to the 24×24 grid it was fitted on .*image_size "
                                         r"\(28, 24\) needs a shared basis"):
        local.on_domain((28, 24))
    shared = PatchPOD(4, 4, rank=4).fit(x, progress=False)
    with pytest.raises(ValueError, match=r"valid_pixels must be a bool \[C=1, 28, 24\] tensor; got torch.float32"):
        shared.on_domain((28, 24), torch.ones(1, 28, 24))
    with pytest.raises(ValueError, match=r"image_size must be \(H, W\) with H, W >= 1; got \(0, 24\)"):
        shared.on_domain((0, 24))

def _distributed_worker(rank, world, init_file, x, mask, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = x[rank::world]
        shard_mask = mask[rank::world]
        pod = PatchPOD(4, 2, rank=6, basis="local").fit(shard, mask=shard_mask, progress=False)
        # A dense rank and a masked rank: the statistics must still combine exactly.
        stats = pk.patch_stats(shard, 4, 2, mask=shard_mask if rank == 1 else None).all_reduce()
        if rank == 0:
            torch.save({"basis": pod.basis, "eig": pod._eigenvalues, "mean": pod.mean,
                        "cov": stats.covariance(), "images": pod.report["images"]}, out)
        dist.barrier()  # no rank tears gloo down while the other still talks (that aborted once)
    finally:
        dist.destroy_process_group()


def test_distributed_fit_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    x = smooth_fields(24, h=16, w=16, seed=14)
    mask = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.1
    out = tmp_path / "rank0.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), x, mask, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    single = PatchPOD(4, 2, rank=6, basis="local").fit(x, mask=mask, progress=False)
    assert got["images"] == 24
    torch.testing.assert_close(got["eig"], single._eigenvalues, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["mean"], single.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["basis"], single.basis, rtol=1e-7, atol=1e-8)
    mixed_mask = torch.cat([torch.ones_like(mask[0::2]), mask[1::2]])
    order = torch.cat([torch.arange(0, 24, 2), torch.arange(1, 24, 2)])
    expected = pk.patch_stats(x[order], 4, 2, mask=mixed_mask)
    torch.testing.assert_close(got["cov"], expected.covariance(), rtol=1e-10, atol=1e-12)


def _coastal(valid: torch.Tensor, p: int) -> torch.Tensor:
    """Valid pixels of patches that hold a masked pixel: ``[N, C, H, W]`` bool."""
    land = F.avg_pool2d((~valid).double(), p) > 0
    return F.interpolate(land.double(), scale_factor=p, mode="nearest").bool() & valid


def test_shared_basis_round_trips_coastal_patches_like_open_ocean_ones():
    """The packaged SST (land NaN), a shared p4 basis (energy 0.999) fitted on 29 months, the
    last 12 round-tripped; the coast is a fixed mask, so each coastal patch is fitted on its
    ocean pixels by the precomputed projector.

    The method's part: every open-ocean patch given a real coastal patch's mask round-trips its
    kept pixels at least as well as unmasked (least squares on fewer pixels: 0.042 K vs 0.050 K).
    The real coastal pixels err more (0.11 K vs 0.050 K) because coastal SST has about 3× more of
    its variance outside the four leading shared modes, not because of the encode; the old
    zero-filled projection erred by tens of kelvin there."""
    from podiff.data.datasets import load_sst

    hr = load_sst(4).hr.double()
    pod = PatchPOD(4, energy=0.999).fit(hr[:29], progress=False)
    test = hr[42:]
    assert pod.gaps(test)[0] == "fixed"
    valid = ~torch.isnan(test)
    coast = _coastal(valid, 4)
    ocean = valid & ~coast
    err = pod.decode(pod.encode(test)) - test
    rmse = lambda e, where: float(e[where].pow(2).mean().sqrt())  # noqa: E731
    assert coast.sum() > 0.1 * valid.sum()
    # Open-ocean patches under coastal masks (each given the mask of a random coastal patch).
    patch_valid = F.unfold(valid.double(), 4, stride=4).transpose(1, 2)  # N, L, 16
    complete = patch_valid.amin(-1) == 1
    coastal_masks = patch_valid[(patch_valid.amax(-1) == 1) & ~complete]
    g = torch.Generator().manual_seed(0)
    pick = coastal_masks[torch.randint(0, coastal_masks.shape[0], complete.shape, generator=g)]
    imposed_valid = torch.where(complete[..., None], pick, patch_valid)
    kept = F.fold(imposed_valid.transpose(1, 2), tuple(test.shape[-2:]), 4, stride=4).bool() & valid
    imposed = pod.decode(pod.encode(test.masked_fill(~kept, float("nan")))) - test
    tested = kept & ocean
    assert tested.sum() > 0.5 * ocean.sum()
    assert rmse(imposed, tested) <= rmse(err, tested), (rmse(imposed, tested), rmse(err, tested))
    assert rmse(err, coast) < 0.15  # kelvin
    basis, mean = pod._operands(test.dtype, test.device, standardized=False)
    zero_filled = pk.patch_encode(torch.nan_to_num(test), basis, mean, 4, 4)
    old = pod.decode(zero_filled, standardized=False) - test
    assert rmse(old, coast) > 50 * rmse(err, coast)

def test_shared_basis_with_a_coast_is_fitted_from_complete_patches():
    """Pooling coastal patches pairwise gave the SST's shared covariance negative eigenvalues,
    so nine of its 16 modes got zero variance and a full-rank basis lost held-out energy; from
    the complete patches every mode has variance and full rank round-trips the ocean exactly."""
    from podiff.data.datasets import load_sst

    hr = load_sst(4).hr.double()
    x = (hr - hr.nanmean()) / hr[~torch.isnan(hr)].std()
    pod = PatchPOD(4).fit(x[:35], progress=False)
    assert pod.rank == 16 and pod.report["statistics"].startswith("complete patches")
    assert bool((pod._eigenvalues > 0).all())
    test = x[35:]
    valid = ~torch.isnan(test)
    err = (pod.decode(pod.encode(test)) - test)[valid]
    assert float(err.abs().max()) < 1e-8
    pairwise = pk.patch_stats(pod._pad(x[:35]), 4).covariance()[0]
    assert float(torch.linalg.eigvalsh(pairwise).min()) < -1e-3  # what the old fit diagonalised
    local = PatchPOD(4, basis="local").fit(x[:35], progress=False)
    assert local.report["statistics"] == "pairwise-complete"  # exact per location for a fixed coast


def test_shared_basis_falls_back_to_pairwise_statistics_with_few_complete_patches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    x[:, :, 0::4, 0::4] = float("nan")  # every 4×4 patch misses its corner
    with pytest.warns(RuntimeWarning, match=r"only 0 patches are complete.*D \+ 1 = 17"):
        pod = PatchPOD(4).fit(x, progress=False)
    assert pod.report["statistics"] == "pairwise-complete"


def test_per_image_gaps_are_solved_per_patch_and_agree_with_the_fixed_projector():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 16, 16, generator=g, dtype=torch.float64)
    land = torch.zeros(1, 16, 16, dtype=torch.bool)
    land[:, :5, :3] = True
    pod = PatchPOD(4, rank=6).fit(x.masked_fill(land, float("nan")), progress=False)
    fixed = x.masked_fill(land, float("nan"))
    assert pod.gaps(fixed)[0] == "fixed"
    clouds = fixed.clone()
    clouds[0, 0, 8:10, 8:11] = float("nan")
    how, valid = pod.gaps(clouds)
    assert how == "per-image" and not bool(valid[0, 0, 8, 8]) and bool(valid[1, 0, 8, 8])
    a, b = pod.encode(fixed), pod.encode(clouds)
    assert torch.allclose(a[1:], b[1:], atol=1e-10)  # the per-patch solve equals the projector
    assert not torch.allclose(a[0], b[0])  # image 0's cloudy patches are fitted on fewer pixels
    explicit = pod.encode(fixed, mask=~torch.isnan(clouds))
    assert torch.allclose(explicit, b, atol=1e-12)
    assert pod.gaps(x)[0] == "none"


def test_a_shared_basis_fitted_at_every_offset_is_the_stride_one_basis_and_describes_shifted_patches():
    """``fit(offsets=True)``: the statistics of the patches at every pixel offset, the basis a
    stride-1 POD fits (float64), while encoding stays on the stride-``p`` grid. On fields whose
    grid-aligned patches have zero mean (a residual whose block means a mean model matches), the
    grid's own basis has no constant direction; the offsets' basis has it with its variance."""
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.randn(40, 1, 20, 28, generator=g, dtype=torch.float64), 5, stride=1)
    x = x - F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")  # zero-mean 4 × 4 blocks
    grid = PatchPOD(4, rank=16, energy=None, basis="shared").fit(x, progress=False)
    every = PatchPOD(4, rank=16, energy=None, basis="shared").fit(x, progress=False, offsets=True)
    stride_one = PatchPOD(4, stride=1, rank=16, energy=None, basis="shared").fit(x, progress=False)
    assert every.stride == 4 and every.grid == grid.grid
    torch.testing.assert_close(every.eigenvalues, stride_one.eigenvalues, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(every.basis.abs(), stride_one.basis.abs(), rtol=1e-8, atol=1e-10)
    constant = torch.full((16,), 0.25, dtype=torch.float64)
    share = lambda pod: float(((pod.basis.reshape(16, 16).T @ constant) ** 2 * pod.eigenvalues).sum())  # noqa: E731
    assert share(grid) < 1e-20 < 1e-3 < share(every)  # the grid's patches never vary along the constant
    shifted = x[..., 2:14, 2:22]  # whole patches straddling the blocks: what each basis keeps of them

    def lost(pod):
        return float((pod.decode(pod.encode(shifted), image_size=(12, 20)) - shifted).pow(2).sum()
                     / shifted.pow(2).sum())

    assert lost(every) < 1e-20 and lost(grid) > 0.2  # all 16 modes: the grid's has a constant of no variance
    with pytest.raises(ValueError, match="offsets=True fits a shared basis"):
        PatchPOD(4, basis="local").fit(x, progress=False, offsets=True)
