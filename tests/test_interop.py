"""diffusers interop: the patch POD as a diffusers-style autoencoder (and inside diffusers' own
DiTPipeline), and podiff's denoiser driven by diffusers' DDIMScheduler matching podiff's DDIM.
The diffusers tests skip without it (``pip install diffusers``)."""

import pytest
import torch
import torch.nn.functional as F

from podiff.diffusion.denoiser import DenoiserConfig, PODDenoiser
from podiff.diffusion.sampling import DiffusionScheduler
from podiff.diffusion.schedules import make_schedule
from podiff.interop import PODAutoencoder, continuous_time, ddim_scheduler
from podiff.latent.pod import PatchPOD


def fields(n, seed, channels=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, channels, size + 4, size + 4, generator=g), 5, stride=1)


@pytest.fixture(scope="module")
def pod():
    return PatchPOD(4, 2, rank=7).fit(fields(40, 0, channels=2), progress=False)  # nH = nW = 7


def test_autoencoder_interface_and_layout(pod):
    vae = PODAutoencoder(pod)
    x = fields(3, 1, channels=2)
    out = vae.encode(x)
    z = out.latent_dist.sample(torch.Generator().manual_seed(0))
    assert z.shape == (3, 7, 7, 7) and torch.equal(z, out.latent_dist.mode()) and torch.equal(out[0].mean, z)
    assert (out.latent_dist.std == 0).all()
    tokens = pod.encode(x)  # [B, L, r]: latent channel k at grid cell (i, j) is token i·nW + j, mode k
    assert torch.equal(z[1, 4, 2, 5], tokens[1, 2 * 7 + 5, 4])
    decoded = vae.decode(z).sample
    torch.testing.assert_close(decoded, pod.decode(tokens), rtol=0, atol=0)
    assert torch.equal(vae.decode(z, return_dict=False)[0], decoded) and torch.equal(vae(x).sample, decoded)
    c = vae.config
    found = (c.latent_channels, c.in_channels, c.scaling_factor, c.latent_size, c["patch_size"])
    assert found == (7, 2, 1.0, [7, 7], 4)
    assert vae.dtype == pod.dtype and vae.device.type == "cpu"
    # Analytic pixel moments from latent moments, in the latent layout.
    members = torch.stack([vae.encode(x + 0.05 * torch.randn_like(x)).latent_dist.mode() for _ in range(6)])
    import podiff_kernels as pk

    mean_tok, cov = pk.ensemble_moments(members.flatten(3).transpose(2, 3))
    mean, var = vae.decode_moments(mean_tok.transpose(1, 2).reshape(3, 7, 7, 7), cov)
    want_mean, want_var = pod.decode_moments(mean_tok, cov)
    assert torch.equal(mean, want_mean) and torch.equal(var, want_var)
    raw = PODAutoencoder(pod, standardized=False).encode(x).latent_dist.mode()
    torch.testing.assert_close(raw, vae.to_latents(pod.encode(x, standardized=False)))


def test_autoencoder_errors(pod):
    with pytest.raises(TypeError, match="pod must be a fitted PatchPOD; got str"):
        PODAutoencoder("pod")
    with pytest.raises(RuntimeError, match="not fitted"):
        PODAutoencoder(PatchPOD(4))
    with pytest.raises(ValueError, match=r"latents must be \[B, r=7, nH=7, nW=7\]; got \(2, 6, 7, 7\)"):
        PODAutoencoder(pod).decode(torch.zeros(2, 6, 7, 7))


def test_as_the_vae_of_diffusers_dit_pipeline(pod):
    diffusers = pytest.importorskip("diffusers")
    vae = PODAutoencoder(pod)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=7, out_channels=7, num_layers=1,
        sample_size=7, patch_size=1, num_embeds_ada_norm=10, norm_num_groups=1)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
    seen = []
    decode = vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z)
        return decode(z, *args, **kwargs)

    vae.decode = spy
    images = pipe(class_labels=[1, 3], num_inference_steps=3, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 2, 16, 16) and len(seen) == 1 and seen[0].shape == (2, 7, 7, 7)
    torch.testing.assert_close(images, (pod.decode(vae.to_tokens(seen[0])) / 2 + 0.5).clamp(0, 1))


def _random_denoiser(grid, rank, seed):
    torch.manual_seed(seed)
    net = PODDenoiser(DenoiserConfig(rank=rank, grid=grid, width=32, depth=2, heads=2)).double()
    with torch.no_grad():  # adaLN-Zero and the zero head would make it output 0: give it weights
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_diffusers_ddim_scheduler_matches_podiff_ddim(kind, steps):
    pytest.importorskip("diffusers")
    schedule = make_schedule(kind, rank=5, prediction_type="v")
    scheduler = ddim_scheduler(schedule)
    assert scheduler.alphas_cumprod[-1] == 0 and scheduler.final_alpha_cumprod == 1
    net = _random_denoiser((3, 4), 5, seed=steps)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(4, 12, 5, generator=g, dtype=torch.float64)
    x_T = torch.randn(4, 12, 5, generator=g, dtype=torch.float64)

    ours = DiffusionScheduler(schedule, "v", "ddim").sample(net, cond, steps, noise=lambda shape, dtype: x_T.clone())

    scheduler.set_timesteps(steps)
    times = continuous_time(scheduler.timesteps)
    torch.testing.assert_close(times, torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1], rtol=0, atol=1e-12)
    x = x_T.clone()
    with torch.no_grad():
        for timestep, t in zip(scheduler.timesteps, times, strict=False):
            v = net(x, cond, t.expand(x.shape[0]).to(x.dtype))
            x = scheduler.step(v, timestep, x).prev_sample
    assert x.abs().max() > 0.1  # a real chain, not zeros
    torch.testing.assert_close(x, ours, rtol=1e-5, atol=1e-5)


def _diffusers_dpm_solver(schedule, algorithm):
    """diffusers' DPM-Solver++ (2M) on podiff's ``schedule``: ᾱ at podiff's exact values, final σ = 0."""
    from diffusers import DPMSolverMultistepScheduler

    N = 1000
    alpha_bar = torch.sigmoid(schedule.log_snr(continuous_time(torch.arange(N), N)).flatten().double())
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=N, prediction_type="v_prediction",
                                            algorithm_type=algorithm, solver_order=2, solver_type="midpoint",
                                            final_sigmas_type="zero", lower_order_final=True)
    scheduler.alphas_cumprod = alpha_bar.float()  # set_timesteps derives its σ's from these
    return scheduler


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers on its ᾱ tensor
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [2, 5, 12])
def test_diffusers_dpm_solver_matches_podiff(algorithm, kind, steps):
    """Every step of one chain through diffusers' ``DPMSolverMultistepScheduler`` and podiff's
    sampler, from the same sample, model output and noise, agrees to float32 rounding. The chain
    runs from t = 0.9 (diffusers' σ/α is infinite at podiff's zero-SNR start) to t = 0.05, then
    to clean data: below that diffusers' float32 ᾱ ≈ 1 loses σ's digits (1e-4 at t = 0.001)."""
    pytest.importorskip("diffusers")
    schedule = make_schedule(kind, rank=5, prediction_type="v")
    scheduler = _diffusers_dpm_solver(schedule, algorithm)
    timesteps = torch.linspace(899, 49, steps).round().long()
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    times = torch.cat([continuous_time(timesteps), torch.zeros(1, dtype=torch.float64)])
    net = _random_denoiser((3, 4), 5, seed=steps)
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(4, 12, 5, generator=g, dtype=torch.float64)
    x = torch.randn(4, 12, 5, generator=g, dtype=torch.float64)
    ours = DiffusionScheduler(schedule, "v", algorithm)
    with torch.no_grad():
        for i, timestep in enumerate(scheduler.timesteps):
            v = net(x, cond, times[i].expand(x.shape[0]).to(x.dtype))
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i), dtype=x.dtype)
            theirs = scheduler.step(v, timestep, x, variance_noise=noise).prev_sample.double()
            x = ours.step(v, times[i], times[i + 1], x, generator=torch.Generator().manual_seed(10 + i)).prev_sample
            assert theirs.abs().max() > 0.1
            torch.testing.assert_close(x, theirs, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")


def test_ddim_scheduler_is_the_same_forward_process():
    pytest.importorskip("diffusers")
    schedule = make_schedule("cosine", rank=3, prediction_type="v")
    scheduler = ddim_scheduler(schedule)
    x0, eps = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    timesteps = torch.tensor([0, 10, 500, 900, 999])
    alpha, sigma = schedule.alpha_sigma(continuous_time(timesteps))
    # diffusers keeps ᾱ in float32: near t = 0 its σ = √(1 − ᾱ) loses digits (1.7e-6 measured).
    torch.testing.assert_close(scheduler.add_noise(x0, eps, timesteps), alpha * x0 + sigma * eps,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="learned .* schedule has no diffusers equivalent"):
        ddim_scheduler(make_schedule("learned", rank=3, prediction_type="v"))
    with pytest.raises(ValueError, match="prediction_type must be 'v'"):
        ddim_scheduler(schedule, prediction_type="epsilon")
