"""Every op as another codebase would use it: ``torch.ops.podiff.<name>``, called directly with
the positional arguments another codebase would pass, matches the float64 reference (and the
Python function, which adds only argument checks, returns the same), ``torch.library.opcheck``
passes, and the Python function compiles with ``torch.compile(fullgraph=True)`` (no graph breaks),
forward and, where the op is differentiable, backward, matching eager.

``patch_stats`` returns a ``PatchStats`` object and validates its input data-dependently (NaN and
Inf outside the mask), so it is the registered op ``torch.ops.podiff.patch_stats`` that compiles."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from utils import orthonormal

import podiff_kernels as pk
from podiff_kernels import reference as ref
from podiff_kernels.ops.eigh import fix_signs

OPS = torch.ops.podiff
B, C, H, W, P, S = 2, 3, 11, 13, 3, 2  # odd sizes: nH = 5, nW = 6
L = ((H - P) // S + 1) * ((W - P) // S + 1)
D, R = C * P * P, 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    a = rnd(B, L, R, R)
    return {
        "x": rnd(B, C, H, W), "basis": orthonormal(D, R, seed=seed), "local_basis": orthonormal(D, R, L, seed=seed + 1),
        "mean": rnd(D), "coeffs": rnd(B, L, R), "var": rnd(B, L, R).square(), "cov": a @ a.transpose(-1, -2) / R,
        "samples": rnd(7, B, L, R), "spd": (lambda m: m @ m.mT)(rnd(4, 6, 6)),
        "mask": torch.rand(B, C, H, W, generator=g) > 0.3,
    }


@dataclass
class Case:
    name: str  # the torch.ops.podiff name
    function: Callable  # the public Python function, on the inputs dict
    args: Callable  # the same call's positional arguments for torch.ops.podiff.<name>
    grads: tuple = ()  # input names the output is differentiable in
    reference: Callable | None = None  # the float64 oracle's answer, comparable with the op's outputs

    def op(self, inputs):
        return getattr(OPS, self.name)(*self.args(inputs))


CASES = [
    Case("patch_encode", lambda i: pk.patch_encode(i["x"], i["basis"], i["mean"], P, S),
         lambda i: (i["x"], i["basis"], i["mean"], P, S), ("x", "basis", "mean"),
         lambda i: ref.patch_encode(i["x"], i["basis"], i["mean"], P, S)),
    Case("patch_encode", lambda i: pk.patch_encode(i["x"], i["local_basis"], None, P, S),
         lambda i: (i["x"], i["local_basis"], None, P, S), ("x", "local_basis"),
         lambda i: ref.patch_encode(i["x"], i["local_basis"], None, P, S)),
    Case("patch_encode_masked", lambda i: pk.patch_encode(i["x"], i["basis"], i["mean"], P, S, mask=i["mask"]),
         lambda i: (i["x"], i["mask"], i["basis"], i["mean"], P, S, 1e-3), ("x", "basis", "mean"),
         lambda i: ref.patch_encode_masked(i["x"], i["mask"], i["basis"], i["mean"], P, S, 1e-3)),
    Case("patch_decode", lambda i: pk.patch_decode(i["coeffs"], i["basis"], i["mean"], (H, W), P, S),
         lambda i: (i["coeffs"], i["basis"], i["mean"], H, W, P, S), ("coeffs", "basis", "mean"),
         lambda i: ref.patch_decode(i["coeffs"], i["basis"], i["mean"], (H, W), P, S)),
    Case("patch_correlate", lambda i: pk.patch_correlate(i["x"], i["coeffs"], P, S, local=True),
         lambda i: (i["x"], i["coeffs"], P, S, True), (),
         lambda i: ref.patch_correlate(i["x"], i["coeffs"], P, S, local=True)),
    Case("propagate_variance", lambda i: pk.propagate_variance(i["var"], i["basis"], (H, W), P, S),
         lambda i: (i["var"], i["basis"], H, W, P, S), ("var", "basis"),
         lambda i: ref.propagate_variance(i["var"], i["basis"], (H, W), P, S)),
    Case("propagate_variance", lambda i: pk.propagate_variance(i["cov"], i["local_basis"], (H, W), P, S),
         lambda i: (i["cov"], i["local_basis"], H, W, P, S), ("cov", "local_basis"),
         lambda i: ref.propagate_variance(i["cov"], i["local_basis"], (H, W), P, S)),
    Case("decode_moments", lambda i: pk.decode_moments(i["coeffs"], i["cov"], i["basis"], i["mean"], (H, W), P, S),
         lambda i: (i["coeffs"], i["cov"], i["basis"], i["mean"], H, W, P, S), (),
         lambda i: (ref.patch_decode(i["coeffs"], i["basis"], i["mean"], (H, W), P, S),
                    ref.propagate_variance(i["cov"], i["basis"], (H, W), P, S))),
    Case("ensemble_moments", lambda i: pk.ensemble_moments(i["samples"]), lambda i: (i["samples"], False), (),
         lambda i: ref.variance.ensemble_moments(i["samples"])),
    Case("ensemble_moments", lambda i: pk.ensemble_moments(i["samples"], diagonal=True),
         lambda i: (i["samples"], True), (), lambda i: ref.variance.ensemble_moments(i["samples"], diagonal=True)),
    Case("batched_eigh", lambda i: pk.batched_eigh(i["spd"]), lambda i: (i["spd"],), (),
         lambda i: _eigh_reference(i["spd"])),
    # patch_stats' Python function returns a PatchStats and checks its data; the op compiles.
    Case("patch_stats", lambda i: OPS.patch_stats(i["x"], None, P, S, True, 1 << 20),
         lambda i: (i["x"], None, P, S, True, 1 << 20), (),
         lambda i: ref.patch_stats.patch_stats(i["x"], None, P, S, True)),
]


def _eigh_reference(a):
    w, v = ref.eigh.batched_eigh(a)  # descending; the op's sign rule applied to compare vectors
    return w, fix_signs(v)

IDS = [f"{c.name}-{k}" for k, c in enumerate(CASES)]


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_every_registered_op_is_covered():
    registered = {n for n in dir(OPS) if not n.startswith("_") and n != "name"}
    assert registered == {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_op_matches_the_reference_and_the_function(case):
    inputs = _inputs()
    got = _flat(case.op(inputs))
    expected = _flat(case.reference(inputs))
    if case.name == "patch_stats":  # compact (count, mean) against the reference's pairwise [G, D, D] form
        count, mean, m2 = got
        got = [ref.patch_stats.covariance(count.expand_as(m2), m2), mean.expand_as(m2).diagonal(dim1=1, dim2=2)]
        expected = [ref.patch_stats.covariance(expected[0], expected[2]), expected[1].diagonal(dim1=1, dim2=2)]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=False):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-10, atol=1e-10)
    if case.name != "patch_stats":  # the function returns a PatchStats there
        for a, b in zip(_flat(case.function(inputs)), got, strict=False):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_opcheck(case):
    inputs = _inputs(1)
    for k in case.grads:
        inputs[k] = inputs[k].requires_grad_()
    torch.library.opcheck(getattr(OPS, case.name).default, case.args(inputs))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiles_fullgraph_and_matches_eager(case):
    torch._dynamo.reset()
    inputs = _inputs(2)
    compiled = torch.compile(case.function, fullgraph=True, backend="aot_eager")
    eager_out, compiled_out = _flat(case.function(inputs)), _flat(compiled(inputs))
    for a, b in zip(eager_out, compiled_out, strict=False):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    if not case.grads:
        return
    leaves = {k: inputs[k].clone().requires_grad_() for k in case.grads}

    def loss(fn):
        out = fn({**inputs, **leaves})
        return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in _flat(out))

    eager_grads = torch.autograd.grad(loss(case.function), list(leaves.values()))
    compiled_grads = torch.autograd.grad(loss(compiled), list(leaves.values()))
    for name, a, b in zip(leaves, eager_grads, compiled_grads, strict=False):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
