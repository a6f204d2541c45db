"""Running on several processes (``torchrun``): rank bookkeeping, sharding and exact reductions.

The model layer uses these so that a run on ``W`` ranks gives what one process gives on the
same data: training with the same *global* batch (every rank draws the same indices and noise
from the same seeded generator and keeps its slice of the rows; DDP averages the gradients),
data standardisation and the POD fit reduced exactly (sums in float64), and samples seeded per
(image, member) so they do not depend on how images are split over ranks or chunks.

>>> from podiff.core import distributed
>>> distributed.init_from_env()          # under torchrun: gloo on CPU, nccl on CUDA; here a no-op
False
>>> rank, world = distributed.rank_world()
>>> distributed.shard(10, rank, world)   # this rank's contiguous slice of 10 samples
slice(0, 10, None)
"""

from __future__ import annotations

import os

import torch


def is_active() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a distributed run."""
    import torch.distributed as dist

    if is_active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Initialises the default process group from torchrun's variables (``WORLD_SIZE`` > 1).

    Backend: nccl when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo otherwise;
    ``PODIFF_DIST_BACKEND`` overrides. Returns whether a multi-rank group is active.
    """
    import torch.distributed as dist

    if is_active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = os.environ.get("PODIFF_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shutdown(wait: bool = True) -> None:
    """Ends the default process group, if one is initialised. Call it before the process exits:
    a gloo group left to the interpreter's teardown can abort the process ("terminate called
    without an active exception") after the work is done. ``wait``: a barrier first, so no rank
    tears the group down while another still talks (leave it out after a failure: the others
    may never arrive)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items (the first ``n % world`` ranks get one more)."""
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``x [n_rank, ...]`` along dim 0, in rank order (sizes may differ)."""
    import torch.distributed as dist

    if not is_active():
        return x
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device))
    counts = [int(c.item()) for c in counts]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=False)])


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks (a copy; ``x`` itself outside a distributed run)."""
    import torch.distributed as dist

    if not is_active():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def barrier() -> None:
    import torch.distributed as dist

    if is_active():
        dist.barrier()


__all__ = ["all_gather_rows", "all_sum", "barrier", "init_from_env", "is_active", "rank_world", "shard", "shutdown"]
