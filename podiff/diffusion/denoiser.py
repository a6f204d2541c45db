"""The denoiser: a small DiT-style Vision Transformer over the ``L`` POD tokens.

Input per location ``l``: the noisy token ``x_t [r]`` and the condition token ``c [r]``
(the POD encoding of the upsampled low-resolution field). A linear embedding of
``[x_t, c]``, a fixed 2-D sin-cos position embedding of the token grid, ``depth``
transformer blocks (attention global, or within shifted windows of the grid) with adaLN-Zero
conditioning on the noise level, and a zero-initialised
linear head to ``r`` values per token. The noise level is the diffusion time ``t`` (a
global conditioning vector) or, with a learned per-token schedule, the log-SNR of every
token and mode (a conditioning vector per token).

>>> cfg = DenoiserConfig.preset("tiny", rank=16, grid=(8, 8))
>>> net = PODDenoiser(cfg)
>>> net(torch.randn(2, 64, 16), torch.randn(2, 64, 16), torch.rand(2)).shape
torch.Size([2, 64, 16])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "tiny": dict(width=96, depth=4, heads=4, mlp_ratio=2.0),  # CPU demo scale
    "small": dict(width=192, depth=6, heads=6, mlp_ratio=4.0),
    "paper": dict(width=384, depth=12, heads=6, mlp_ratio=4.0),  # DiT-S scale
}


#: Tokens per band above which a windowed block runs band by band (``window_bands``).
BAND_TOKENS = 4096
#: ``DenoiserConfig.position_embedding``: the grid's sin-cos positions, or none.
POSITION_EMBEDDINGS = ("sincos", "none")


@dataclass
class DenoiserConfig:
    """Sizes of the denoiser. ``grid = (nH, nW)`` patch locations (``L = nH·nW``).

    ``noise_input``: ``"time"`` (scalar ``t`` per sample) or ``"per_token"`` (a log-SNR per
    token and mode ``[B, L, r]``, from a learned schedule). ``window``: attention within
    ``window × window`` tokens, the windows shifted by half on every other block (Swin), so
    that its cost grows with the area rather than its square; a grid that fits in one window
    attends globally. 0 (the default): global attention in every block (a model saved before
    windows existed loads as it was trained). ``position_embedding``: ``"sincos"`` (the
    default), the tokens' fixed 2-D sin-cos position on the grid; ``"none"``, no position of the
    grid at all, so that the model is the same at every place (with windowed attention it then
    samples a domain of any size or offset: ``PODiffPipeline.for_domain``; the position a model
    needs comes from the coordinates, ``--position``).
    """

    rank: int
    grid: tuple[int, int]
    cond_rank: int | None = None
    width: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    noise_input: str = "time"
    window: int = 0
    position_embedding: str = "sincos"

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        self.cond_rank = int(self.cond_rank or self.rank)
        if self.width % self.heads:
            raise ValueError(f"width must be a multiple of heads; got width={self.width}, heads={self.heads}")
        if self.width % 4:
            raise ValueError(f"width must be a multiple of 4 (2-D sin-cos embedding); got {self.width}")
        if int(self.window) < 0 or int(self.window) == 1:
            raise ValueError(f"window must be 0 (global attention) or an integer >= 2; got {self.window}")
        self.window = int(self.window)
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {', '.join(map(repr, POSITION_EMBEDDINGS))}; "
                             f"got {self.position_embedding!r}")
        if self.noise_input not in ("time", "per_token"):
            raise ValueError(f"noise_input must be 'time' or 'per_token'; got {self.noise_input!r}")

    @classmethod
    def preset(cls, name: str, rank: int, grid, **overrides) -> DenoiserConfig:
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return cls(rank=rank, grid=grid, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_2d(width: int, grid: tuple[int, int], origin: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[nH·nW, width]`` (MAE / DiT) of the tokens at
    ``origin + (row, column)``, in token units: a patch grid shifted by a fraction of a patch
    (``origin = (dy, dx) / p``) is embedded where its tokens lie."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64) + float(origin[0]),
                            torch.arange(grid[1], dtype=torch.float64) + float(origin[1]), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of ``t ∈ [0, 1]`` (scaled to DDPM's 0..1000 range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def window_attention(qkv: torch.Tensor, grid: tuple[int, int], window: int, shift=0) -> torch.Tensor:
    """Attention of the packed ``qkv [B, L, 3, h, d]`` (``L = nH·nW`` tokens of ``grid``,
    row-major) within ``window × window`` squares of the grid, the partition offset by ``shift``
    tokens down and right (Swin; an int, or ``(rows, columns)``); returns ``[B, L, h, d]``. The
    grid is padded to whole windows and padded keys are masked, so a window at an edge attends
    over its real tokens only (none is all padding, as ``shift < window``). One pad and partition
    of the packed tensor, one batched attention over ``B × windows`` (4-D: much faster on the
    CPU than a 5-D batch)."""
    B, L, _, h, d = qkv.shape
    nH, nW = grid
    w = int(window)
    sy, sx = (int(shift), int(shift)) if isinstance(shift, int) else (int(shift[0]), int(shift[1]))
    Hp, Wp = -(-(nH + sy) // w) * w, -(-(nW + sx) // w) * w
    gh, gw = Hp // w, Wp // w
    x = F.pad(qkv.reshape(B, nH, nW, 3 * h * d), (0, 0, sx, Wp - nW - sx, sy, Hp - nH - sy))
    x = x.reshape(B, gh, w, gw, w, 3, h, d).permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B * gh * gw, h, w * w, d)
    mask = None
    if (Hp, Wp, sy, sx) != (nH, nW, 0, 0):
        rows, cols = torch.arange(Hp, device=qkv.device), torch.arange(Wp, device=qkv.device)
        valid = ((rows >= sy) & (rows < sy + nH))[:, None] & ((cols >= sx) & (cols < sx + nW))[None, :]
        mask = valid.reshape(gh, w, gw, w).permute(0, 2, 1, 3).reshape(gh * gw, 1, 1, w * w).repeat(B, 1, 1, 1)
    out = F.scaled_dot_product_attention(x[0], x[1], x[2], attn_mask=mask)  # [B·windows, h, w·w, d]
    out = out.reshape(B, gh, gw, h, w, w, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, h, d)
    return out[:, sy:sy + nH, sx:sx + nW].reshape(B, L, h, d)


def window_bands(grid: tuple[int, int], window: int, shift: int, tokens: int) -> list[tuple[int, int]]:
    """Row bands ``[(r0, r1), …]`` of ``grid`` that hold whole rows of ``shift``-offset windows,
    about ``tokens`` tokens each (at least one row of windows): a block run band by band is the
    block run on the whole grid, as every window lies in one band."""
    nH, nW = grid
    w, s = int(window), int(shift)
    step = w * max(1, int(tokens) // (w * nW))
    edges = [0] + [e for e in range(w - s if s else w, nH, w)][step // w - 1 :: step // w] + [nH]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=False) if b > a]


class Attention(nn.Module):
    """Multi-head self-attention over the token grid: global, or within shifted windows."""

    def __init__(self, width: int, heads: int, window: int = 0, shift: int = 0):
        super().__init__()
        self.heads = heads
        self.window, self.shift = int(window), int(shift)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], row_shift: int | None = None) -> torch.Tensor:
        """``row_shift``: the partition's offset along the rows when ``grid`` is a band of a larger
        grid (``window_bands``; None: ``shift``)."""
        B, L, W = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, W // self.heads)
        if self.window and max(grid) > self.window:
            shift = (self.shift if row_shift is None else row_shift, self.shift)
            out = window_attention(qkv, grid, self.window, shift).reshape(B, L, W)
        else:  # the grid fits in one window: every token sees every other
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, W)
        return self.proj(out)


class DiTBlock(nn.Module):
    """Pre-norm transformer block; adaLN-Zero: shift, scale and gate from the conditioning."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, window: int = 0, shift: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, window, shift)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        w = self.attn.window
        if not w or x.shape[1] <= BAND_TOKENS or max(grid) <= w:
            return self._band(x, c, grid, None)
        # A large windowed grid runs band by band (rows of whole windows): the same sums, each
        # band's activations small enough to stay in cache, so time per token does not grow
        # with the domain and the MLP's hidden activations are one band's.
        B, _, W = x.shape
        nH, nW = grid
        rows = x.view(B, nH, nW, W)
        per_token = c.shape[1] != 1
        out = []
        for r0, r1 in window_bands(grid, w, self.attn.shift, BAND_TOKENS):
            cb = c.view(B, nH, nW, -1)[:, r0:r1].reshape(B, (r1 - r0) * nW, -1) if per_token else c
            band = rows[:, r0:r1].reshape(B, (r1 - r0) * nW, W)
            out.append(self._band(band, cb, (r1 - r0, nW), self.attn.shift if r0 == 0 else 0).view(B, r1 - r0, nW, W))
        return torch.cat(out, 1).view(B, nH * nW, W)

    def _band(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int], row_shift: int | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), grid, row_shift)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class PODDenoiser(nn.Module):
    """``forward(x_t [B, L, r], cond [B, L, r_c], noise [B] | [B, L, r], grid=None, origin=None) -> [B, L, r]``.

    ``noise`` is ``t`` (``noise_input="time"``) or the per-token log-SNR (``"per_token"``).
    The output is the ε- or v-prediction, as the pipeline trains it. ``grid`` and ``origin``
    (default: ``config.grid`` at ``(0, 0)``) place the tokens of another patch grid, e.g. one
    shifted by a fraction of a patch in training (``PipelineConfig.grid_shifts``): the position
    embedding is that of ``origin + (row, column)``, and the attention windows follow ``grid``.
    """

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = config
        W, r = config.width, config.rank
        self.embed = nn.Linear(r + config.cond_rank, W)
        self.register_buffer("pos", sincos_2d(W, config.grid)[None], persistent=False)
        if config.noise_input == "time":
            self.noise_embed = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        else:
            self.noise_embed = nn.Sequential(nn.Linear(r, W), nn.SiLU(), nn.Linear(W, W))
        w = config.window
        self.blocks = nn.ModuleList(DiTBlock(W, config.heads, config.mlp_ratio, w, (i % 2) * (w // 2))
                                    for i in range(config.depth))
        self.norm = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
        self.head = nn.Linear(W, r)
        for module in (self.final_ada[-1], self.head):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def _conditioning(self, noise: torch.Tensor, batch: int, dtype) -> torch.Tensor:
        if self.config.noise_input == "time":
            t = noise.reshape(-1).expand(batch) if noise.numel() in (1, batch) else noise
            return self.noise_embed(timestep_embedding(t, self.config.width).to(dtype))[:, None]  # B, 1, W
        # Log-SNR in about [-10, 10]: scaled to order one, clamped where it is infinite.
        lam = noise.clamp(-20.0, 20.0) / 10.0
        return self.noise_embed(lam.to(dtype).expand(batch, -1, -1))  # B, L, W

    def position(self, grid: tuple[int, int], origin: tuple[float, float] | None) -> torch.Tensor:
        """The position embedding ``[1, L, W]`` of ``grid``'s tokens at ``origin`` (cached per pair)."""
        origin = (0.0, 0.0) if origin is None else (float(origin[0]), float(origin[1]))
        if grid == self.config.grid and origin == (0.0, 0.0):
            return self.pos
        key = (grid, origin, str(self.pos.device))
        cache = self.__dict__.setdefault("_positions", {})
        if key not in cache:
            if len(cache) > 64:  # one per shift in training: a handful
                cache.clear()
            cache[key] = sincos_2d(self.config.width, grid, origin)[None].to(self.pos.device)
        return cache[key]

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                grid: tuple[int, int] | None = None, origin: tuple[float, float] | None = None) -> torch.Tensor:
        B, L, r = x_t.shape
        grid = self.config.grid if grid is None else (int(grid[0]), int(grid[1]))
        if L != grid[0] * grid[1] or r != self.config.rank or cond.shape[-1] != self.config.cond_rank:
            raise ValueError(
                f"x_t must be [B, L={grid[0] * grid[1]}, r={self.config.rank}] and cond [B, L, "
                f"{self.config.cond_rank}] for the token grid {grid}; "
                f"got {tuple(x_t.shape)} and {tuple(cond.shape)}"
            )
        h = self.embed(torch.cat([x_t, cond], dim=-1))
        if self.config.position_embedding == "sincos":
            h = h + self.position(grid, origin).to(x_t.dtype)
        c = self._conditioning(noise, B, h.dtype)
        for block in self.blocks:
            h = block(h, c, grid)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.head(modulate(self.norm(h), shift, scale))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MLPDenoiser(nn.Module):
    """A plain MLP over one token (``L = 1``): the denoiser of the global-POD baseline."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        if config.grid != (1, 1):
            raise ValueError(f"MLPDenoiser handles one token (grid (1, 1)); got grid {config.grid}")
        self.config = config
        W, r = config.width * 2, config.rank
        self.time = nn.Sequential(nn.Linear(config.width, W), nn.SiLU())
        layers, width_in = [], r + config.cond_rank + W
        for _ in range(config.depth):
            layers += [nn.Linear(width_in, W), nn.SiLU()]
            width_in = W
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(W, r)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_t, cond, noise, grid=None, origin=None):
        if grid is not None and tuple(grid) != (1, 1):
            raise ValueError(f"MLPDenoiser handles one token (grid (1, 1)); got grid {tuple(grid)}")
        B = x_t.shape[0]
        if self.config.noise_input == "time":
            t = noise.reshape(-1).expand(B) if noise.numel() in (1, B) else noise
            temb = timestep_embedding(t, self.config.width).to(x_t.dtype)
        else:
            raise ValueError("MLPDenoiser takes noise_input='time'")
        h = torch.cat([x_t[:, 0], cond[:, 0], self.time(temb)], dim=-1)
        return self.head(self.body(h))[:, None]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
