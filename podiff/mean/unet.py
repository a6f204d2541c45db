"""``UNetBaseline``: a convolutional encoder–decoder regression (CorrDiff's regression stage).

The input is the bicubic upsampling of every input channel (the target's coarse field and the
covariates: predictors, static fields in blocks, position, season; ``data.covariates``), each
standardised over the training fields, with masked pixels at 0 and a validity channel. The U-Net
(``depth`` levels of two 3×3 convolutions with GroupNorm and SiLU, average pooling down,
nearest upsampling and skip connections up), given also a learned position embedding
(``position_channels`` maps over the training grid, as CorrDiff's regression U-Net has: what is
fixed in place, a front, a coast, a warming pattern, no convolution can know otherwise) predicts
the departure of the high-resolution field
from the bicubic upsampling of its own coarse field, in units of the training fields' std. It is
trained with MSE on the valid pixels by AdamW, keeping the weights of the best validation MSE
and stopping after ``patience`` evaluations without improvement, like the regression ViT.

Example::

    unet = UNetBaseline(scale=4, channels=1).fit(lr_train, hr_train, validation=(lr_val, hr_val))
    unet.predict(lr_test)                                   # [N, C, H, W], data units

Shapes: ``lr [N, C + K, h, w]`` (``K`` covariate channels after the ``C`` target channels),
``hr [N, C, h·s, w·s]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from podiff.core.io import load_tensors, save_tensors
from podiff.core.sample_output import Deterministic
from podiff.data.resample import upsample
from podiff.mean.training import train_regressor

FORMAT = "podiff.UNetBaseline"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    groups = math.gcd(8, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class UNet(nn.Module):
    """``[B, c_in, H, W] -> [B, c_out, H, W]`` (``H``, ``W`` padded to a multiple of ``2**depth`` inside).
    With ``grid = (H, W)``, ``position_channels`` learned maps of that grid join the input (the
    model then takes fields of that grid only)."""

    def __init__(self, c_in: int, c_out: int, width: int = 32, depth: int = 2, grid: tuple | None = None,
                 position_channels: int = 0):
        super().__init__()
        self.depth = int(depth)
        self.grid = tuple(int(n) for n in grid) if grid is not None and position_channels else None
        self.position = (nn.Parameter(torch.randn(int(position_channels), *self.grid)) if self.grid is not None
                         else None)
        widths = [width * 2**i for i in range(self.depth + 1)]
        c_in = c_in + (int(position_channels) if self.position is not None else 0)
        self.down = nn.ModuleList([_block(c_in, widths[0])] + [_block(widths[i], widths[i + 1])
                                                               for i in range(self.depth)])
        self.up = nn.ModuleList([_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(self.depth))])
        self.head = nn.Conv2d(widths[0], c_out, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # starts at the bicubic upsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.position is not None:
            if (H, W) != self.grid:
                raise ValueError(f"this U-Net's position embedding covers the {self.grid[0]}×{self.grid[1]} grid it "
                                 f"was trained on; got fields of {H}×{W}")
            x = torch.cat([x, self.position.expand(x.shape[0], -1, -1, -1)], 1)
        m = 2**self.depth
        x = F.pad(x, (0, -W % m, 0, -H % m), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.head(x)[..., :H, :W]


class UNetBaseline(Deterministic):
    """A U-Net regression from the upsampled input (and covariates) to the high-resolution field."""

    def __init__(self, scale: int, channels: int, width: int = 16, depth: int = 2, seed: int = 0,
                 position_channels: int = 8):
        if int(scale) < 1 or int(channels) < 1:
            raise ValueError(f"scale and channels must be >= 1; got {scale} and {channels}")
        if int(position_channels) < 0:
            raise ValueError(f"position_channels must be >= 0; got {position_channels}")
        self.scale, self.channels, self.width, self.depth, self.seed = int(scale), int(channels), int(width), \
            int(depth), int(seed)
        self.position_channels = int(position_channels)
        self.model: UNet | None = None
        self.in_mean = self.in_std = self.out_std = None
        self.steps = self.steps_refit = 0
        self.best_step: int | None = None
        self.val_history: list[tuple[int, float]] = []

    # -------------------------------------------------------------- data

    def _inputs(self, lr: torch.Tensor) -> torch.Tensor:
        size = (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale)
        up = upsample(lr.float(), size)
        valid = F.interpolate((~torch.isnan(lr[:, : self.channels])).all(1, keepdim=True).float(), size=size,
                              mode="nearest")
        z = (up - self.in_mean.view(1, -1, 1, 1)) / self.in_std.view(1, -1, 1, 1)
        return torch.cat([torch.nan_to_num(z, nan=0.0), valid], 1)

    def _base(self, lr: torch.Tensor) -> torch.Tensor:
        return upsample(lr[:, : self.channels].float(), (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale))

    def _setup(self, lr: torch.Tensor, hr: torch.Tensor) -> None:
        if lr.shape[1] < self.channels or hr.shape[1] != self.channels:
            raise ValueError(f"lr must have at least {self.channels} channels and hr exactly {self.channels}; got "
                             f"{lr.shape[1]} and {hr.shape[1]}")
        flat = lr.float().transpose(0, 1).reshape(lr.shape[1], -1)
        self.in_mean = torch.nanmean(flat, 1)
        self.in_std = torch.sqrt(torch.nanmean((flat - self.in_mean[:, None]) ** 2, 1)).clamp_min(1e-6)
        resid = (hr.float() - self._base(lr)).transpose(0, 1).reshape(self.channels, -1)
        self.out_std = torch.sqrt(torch.nanmean(resid**2, 1)).clamp_min(1e-6)
        with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's random state left as it was
            torch.manual_seed(self.seed)
            self.model = UNet(lr.shape[1] + 1, self.channels, self.width, self.depth, tuple(hr.shape[-2:]),
                              self.position_channels)

    def _targets(self, lr, hr):
        y = (hr.float() - self._base(lr)) / self.out_std.view(1, -1, 1, 1)
        return self._inputs(lr), y

    # -------------------------------------------------------------- training

    def fit(self, lr, hr, validation=None, *, steps: int = 2000, batch_size: int = 8, learning_rate: float = 1e-3,
            eval_every: int = 50, patience: int | None = 8, progress: bool = False) -> UNetBaseline:
        """Trains on ``lr, hr`` (and keeps the best weights on ``validation = (lr_val, hr_val)``)."""
        lr, hr = lr.detach().cpu(), hr.detach().cpu()
        self._setup(lr, hr)
        x, y = self._targets(lr, hr)
        val = self._targets(*(t.detach().cpu() for t in validation)) if validation is not None else None
        return self._train(x, y, val, 1, int(steps), batch_size, learning_rate, eval_every, patience, progress)

    def continue_on(self, lr, hr, steps: int, *, batch_size: int = 8, learning_rate: float = 1e-3,
                    progress: bool = False) -> UNetBaseline:
        """``steps`` more steps from the current weights on ``lr, hr`` (every field, once chosen)."""
        x, y = self._targets(lr.detach().cpu(), hr.detach().cpu())
        start = self.steps + 1
        self._train(x, y, None, start, start + int(steps) - 1, batch_size, learning_rate, 1, None, progress)
        self.steps_refit = int(steps)
        return self

    @staticmethod
    def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        valid = ~torch.isnan(y)
        return torch.where(valid, pred - torch.nan_to_num(y), 0.0).square().sum() / valid.sum().clamp_min(1)

    def _train(self, x, y, val, first: int, last: int, batch_size: int, learning_rate: float, eval_every: int,
               patience, progress: bool) -> UNetBaseline:
        self.steps, best_step = train_regressor(
            self.model, lambda idx: self._mse(self.model(x[idx]), y[idx]), first, last,
            learning_rate=lambda step: learning_rate, generator=torch.Generator().manual_seed(self.seed + first),
            rows=x.shape[0], batch=batch_size, clip=1.0, validate=(lambda: self._evaluate(*val)) if val else None,
            eval_every=eval_every, patience=patience, history=self.val_history, progress=progress, desc="u-net")
        if val is not None:
            self.best_step = best_step
        return self

    @torch.no_grad()
    def _evaluate(self, x, y, chunk: int = 16) -> float:
        total = sum(float(self._mse(self.model(x[i : i + chunk]), y[i : i + chunk])) *
                    int((~torch.isnan(y[i : i + chunk])).sum()) for i in range(0, x.shape[0], chunk))
        return total / max(1, int((~torch.isnan(y)).sum()))

    @torch.no_grad()
    def predict(self, lr: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("UNetBaseline is not fitted; call fit(lr, hr)")
        device = lr.device
        lr = lr.detach().cpu()
        if lr.shape[1] != self.in_mean.numel():
            raise ValueError(f"lr must have {self.in_mean.numel()} channels (as fitted); got {lr.shape[1]}")
        out = torch.cat([self.model(self._inputs(lr[i : i + chunk])) for i in range(0, lr.shape[0], chunk)])
        pred = self._base(lr) + out * self.out_std.view(1, -1, 1, 1)
        masked = F.interpolate(torch.isnan(lr[:, : self.channels]).float(), size=pred.shape[-2:], mode="nearest") > 0
        return pred.masked_fill(masked, float("nan")).to(device)

    # -------------------------------------------------------------- save / load

    def save(self, path) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(in_mean=self.in_mean, in_std=self.in_std, out_std=self.out_std)
        save_tensors(path, tensors, FORMAT, scale=self.scale, channels=self.channels, width=self.width,
                     depth=self.depth, seed=self.seed, inputs=int(self.in_mean.numel()), steps=self.steps,
                     position_channels=self.position_channels, grid=list(self.model.grid or ()),
                     steps_refit=self.steps_refit, best_step=self.best_step,
                     val_history=[list(v) for v in self.val_history])

    @classmethod
    def load(cls, path) -> UNetBaseline:
        tensors, meta = load_tensors(path, FORMAT, "U-Net baseline")
        unet = cls(meta["scale"], meta["channels"], meta["width"], meta["depth"], meta["seed"],
                   meta.get("position_channels", 0))
        unet.in_mean, unet.in_std, unet.out_std = tensors["in_mean"], tensors["in_std"], tensors["out_std"]
        unet.model = UNet(meta["inputs"] + 1, unet.channels, unet.width, unet.depth, meta.get("grid") or None,
                          unet.position_channels)
        unet.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        unet.model.eval()
        unet.steps, unet.steps_refit, unet.best_step = meta["steps"], meta["steps_refit"], meta["best_step"]
        unet.val_history = [(int(a), float(b)) for a, b in meta["val_history"]]
        return unet


__all__ = ["UNet", "UNetBaseline"]
