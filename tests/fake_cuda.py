"""CUDA tensors on a CPU-only torch, for placement tests: ``FakeTensorMode``.

Under ``FakeTensorMode`` tensors carry a device and a shape but no data, and any op that mixes
a CPU tensor (other than a 0-dim scalar) with a CUDA one raises ``FakeTensorDeviceMismatchError``
— exactly the bug a user with a GPU would hit first.

Two things a CPU-only build cannot do even with fake tensors, and how these tests handle them:

- ``Tensor.to("cuda")``, Python indexing (``x[i]``, ``x[a:b]``, ``x[idx] = v``), ``~x`` and the
  ``new_*`` factories fail in their hand-written Python bindings, before dispatch (CUDA
  initialisation, CUDA's device guard). On a CUDA build
  they succeed and dispatch to ``aten._to_copy``, views, ``aten.index``/``index_put_``,
  ``aten.bitwise_not`` and ``aten.new_*``;
  ``fake_cuda()`` routes them there (a view's sizes and strides come from a meta twin).
- Autograd aborts the process when it records a CUDA leaf (the engine needs CUDA's device
  guard). So under fake CUDA only forward passes run, and the training step's backward is
  replaced by gradients on each parameter's own device; the complete step, backward included,
  is checked on the ``meta`` device instead (``test_placement.py``), where autograd works and a
  CPU tensor is an error too.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode

__all__ = ["FakeTensorDeviceMismatchError", "fake_cuda", "devices_of"]


def _to(original):
    def to(self, *args, **kwargs):
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type != "cuda":
            return original(self, *args, **kwargs)
        if device == self.device and (dtype is None or dtype == self.dtype):
            return self
        return torch.ops.aten._to_copy.default(self, dtype=dtype or self.dtype, device=device,
                                               non_blocking=non_blocking)

    return to


def _is_fake_cuda(t) -> bool:
    return isinstance(t, FakeTensor) and t.device.type == "cuda"


def _split_index(index):
    index = index if isinstance(index, tuple) else (index,)
    return index, any(isinstance(i, torch.Tensor) and i.dim() > 0 for i in index)


def _view(self, index):
    """Basic indexing (ints, slices, None, Ellipsis) as the view a CUDA build returns."""
    twin = torch.empty_strided(self.size(), self.stride(), dtype=self.dtype, device="meta")[index]
    out = torch.ops.aten.as_strided.default(self, twin.size(), twin.stride(),
                                            self.storage_offset() + twin.storage_offset())
    return out


def _tensor_indices(self, index):
    """``x[idx]``/``x[:, idx]``: full slices and index tensors only (what the model layer uses)."""
    out = []
    for i in index:
        if isinstance(i, torch.Tensor):
            out.append(i)
        elif i == slice(None):
            out.append(None)
        else:
            raise NotImplementedError(f"fake_cuda: mixed advanced index {index!r}")
    return out


def _getitem(original):
    def getitem(self, index):
        if not _is_fake_cuda(self):
            return original(self, index)
        parts, advanced = _split_index(index)
        if advanced:
            return torch.ops.aten.index.Tensor(self, _tensor_indices(self, parts))
        return _view(self, parts)

    return getitem


def _setitem(original):
    def setitem(self, index, value):
        if not _is_fake_cuda(self):
            return original(self, index, value)
        parts, advanced = _split_index(index)
        if not isinstance(value, torch.Tensor):
            value = torch.full((), value, dtype=self.dtype, device=self.device)
        if advanced:
            torch.ops.aten.index_put_.default(self, _tensor_indices(self, parts), value)
        else:
            _view(self, parts).copy_(value)

    return setitem


def _aten(original, op):
    """A method whose binding takes CUDA's device guard, dispatched to its aten op on fake CUDA."""
    def method(self, *args, **kwargs):
        return op(self, *args, **kwargs) if _is_fake_cuda(self) else original(self, *args, **kwargs)

    return method


def _new(original, op, with_value=False):
    def method(self, *args, dtype=None, device=None, requires_grad=False, **kwargs):
        if not _is_fake_cuda(self):
            return original(self, *args, dtype=dtype, device=device, requires_grad=requires_grad, **kwargs)
        size = args[0] if len(args) == 1 + with_value and isinstance(args[0], (tuple, list, torch.Size)) else (
            args[:-1] if with_value else args)
        extra = (args[-1],) if with_value else ()
        return op(self, list(size), *extra, dtype=dtype or self.dtype, device=device or self.device)

    return method


_PATCHES = {
    "to": _to,
    "__getitem__": _getitem,
    "__setitem__": _setitem,
    "__invert__": lambda f: _aten(f, torch.ops.aten.bitwise_not.default),
    "new_empty": lambda f: _new(f, torch.ops.aten.new_empty.default),
    "new_zeros": lambda f: _new(f, torch.ops.aten.new_zeros.default),
    "new_ones": lambda f: _new(f, torch.ops.aten.new_ones.default),
    "new_full": lambda f: _new(f, torch.ops.aten.new_full.default, with_value=True),
}


@contextlib.contextmanager
def fake_cuda():
    """A ``FakeTensorMode`` in which ``.to("cuda")`` works on a CPU-only torch (see the module doc).

    Real tensors made before the block (a model built on the CPU) may enter it; they become
    fake CPU tensors, so a forgotten one mixed with CUDA tensors raises the mismatch error.
    """
    originals = {name: getattr(torch.Tensor, name) for name in _PATCHES}
    for name, patch in _PATCHES.items():
        setattr(torch.Tensor, name, patch(originals[name]))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def devices_of(*objects) -> set[str]:
    """Device types of every tensor in the given tensors, modules, optimisers and containers."""
    found: set[str] = set()

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            found.add(obj.device.type)
        elif isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                visit(state)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for o in objects:
        visit(o)
    return found
