"""Choosing the POD from the data: shared or local basis, and the rank, by held-out reconstruction.

The rule (``select_pod``): fit a shared and a local basis on the training fields; for each, the
rank is the smallest ``r`` whose reconstruction of the *validation* fields keeps ``energy`` of
their variance about the POD mean, ``1 − ‖x − decode(encode_r(x))‖² / ‖x − μ‖² >= energy``
(masked pixels out, gappy encode for partly masked patches). The basis that reaches it with
fewer modes wins (fewer tokens for the same held-out fidelity; a basis that does not reach it
at all loses to one that does); on a tie, the shared one (its
eigenvalues, which scale the tokens, come from every location's patches, a local basis's from
the N fields alone). Held-out energy, unlike the training eigenvalue share, does not reward a local basis for
memorising too few fields. A local basis is considered only when each location has at least
``D = C·p·p`` training fields (its covariance is otherwise rank deficient).

Example (``hr_train``, ``hr_val`` standardised ``[N, C, H, W]``)::

    pod, choice = select_pod(hr_train, hr_val, patch_size=4, energy=0.999)
    print(describe(choice))   # POD: local basis, p = 4, r = 9 (held-out energy 0.9991 >= 0.999; ...)
"""

from __future__ import annotations

import torch

from podiff.latent.pod import PatchPOD


def held_out_energy(pod: PatchPOD, x: torch.Tensor) -> list[float]:
    """``[1 − SSE(r)/SSE(0) for r = 1..pod.rank]`` on fields ``x`` (NaN = masked)."""
    valid = ~torch.isnan(x)
    target = torch.where(valid, x, 0.0).double()
    base = pod.decode(torch.zeros(x.shape[0], pod.num_locations, pod.rank, dtype=x.dtype, device=x.device))
    total = float(torch.where(valid, base.double() - target, 0.0).square().sum())
    shares = []
    for r in range(1, pod.rank + 1):
        small = pod.truncated(r)
        rec = small.decode(small.encode(x)).double()
        sse = float(torch.where(valid, rec - target, 0.0).square().sum())
        shares.append(1.0 - sse / total if total > 0 else 1.0)
    return shares


def select_pod(hr_train: torch.Tensor, hr_val: torch.Tensor, patch_size: int, stride: int | None = None,
               energy: float = 0.999, basis: str = "auto", rank: int | None = None,
               offsets: bool = False) -> tuple[PatchPOD, dict]:
    """The POD for ``hr_train`` chosen on ``hr_val`` by the rule in the module docstring.

    Args:
        hr_train, hr_val: ``[N, C, H, W]`` (standardised; NaN = masked).
        basis: ``"auto"``, or ``"shared"``/``"local"`` to choose only the rank.
        rank: a fixed rank (then only the basis is chosen).
        offsets: a shared basis fitted on patches at every offset (``PatchPOD.fit``).

    Returns:
        ``(pod, choice)``: the fitted POD and a dict with the basis, rank, the held-out energy
        reached and each candidate's figures (for ``train.json`` and the printed line).
    """
    if not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy}")
    D = hr_train.shape[1] * patch_size * patch_size
    kinds = ["shared", "local"] if basis == "auto" else [basis]
    if basis == "auto" and hr_train.shape[0] < D:
        kinds = ["shared"]
    candidates = {}
    for kind in kinds:
        full = PatchPOD(patch_size, stride, rank=None, energy=None, basis=kind).fit(
            hr_train, progress=False, offsets=offsets and kind == "shared")
        shares = held_out_energy(full, hr_val)
        if rank is not None:
            r = min(int(rank), full.rank)
        else:
            r = next((i + 1 for i, e in enumerate(shares) if e >= energy - 1e-12), full.rank)
        candidates[kind] = {"rank": r, "held_out_energy": shares[r - 1], "pod": full}
    best = preferred(candidates, energy, fixed_rank=rank is not None)
    chosen = candidates[best]
    pod = chosen["pod"].truncated(chosen["rank"])
    choice = {"basis": best, "rank": chosen["rank"], "patch_size": pod.patch_size, "stride": pod.stride,
              "energy_target": float(energy), "held_out_energy": chosen["held_out_energy"],
              "candidates": {k: {"rank": v["rank"], "held_out_energy": v["held_out_energy"]}
                             for k, v in candidates.items()},
              "rule": "fewest modes reaching the energy target on the validation fields"
                      + ("" if len(kinds) > 1 or basis != "auto" else f" (local skipped: fewer than D = {D} fields)")}
    return pod, choice


def preferred(candidates: dict, energy: float, fixed_rank: bool = False) -> str:
    """The winning kind among ``{kind: {"rank", "held_out_energy"}}``.

    A basis that reaches the target beats one that does not; then fewer modes; on a tie the
    shared basis (its eigenvalues, hence the token scaling, are estimated from every location's
    patches, a local basis's from N fields only). With a fixed rank: the higher held-out energy.
    """
    def order(kind):
        c = candidates[kind]
        if fixed_rank:
            return (-c["held_out_energy"], kind != "shared")
        return (c["held_out_energy"] < energy - 1e-12, c["rank"], kind != "shared")

    return min(candidates, key=order)


def describe(choice: dict) -> str:
    """One line for the command's output."""
    others = ", ".join(f"{k} needs r = {v['rank']}" for k, v in choice["candidates"].items() if k != choice["basis"])
    reached = choice["held_out_energy"] >= choice["energy_target"] - 1e-12
    verdict = ">=" if reached else "< (not reached: all modes kept)"
    return (f"POD: {choice['basis']} basis, p = {choice['patch_size']}, r = {choice['rank']} (held-out energy "
            f"{choice['held_out_energy']:.4f} {verdict} {choice['energy_target']}" + (f"; {others}" if others else "")
            + ")")


__all__ = ["held_out_energy", "select_pod", "preferred", "describe"]
