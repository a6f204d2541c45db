"""File safety: every file podiff writes is whole or absent, and every file it reads says what it is.

- ``atomic_write(path, write)``: ``write(tmp)`` beside ``path``, fsync, rename over it.
- ``atomic_directory(path)``: a folder filled beside ``path`` and renamed over it when complete.
- ``write_json(path, obj)``: a JSON document, atomically.
- ``save_tensors(path, tensors, format, **meta)`` / ``load_tensors(path, format, what)``: one
  safetensors file whose metadata holds ``{"format": format, **meta}`` as JSON under the key
  ``"podiff"``; loading checks the file exists, is readable and holds that format, and raises
  ``FileNotFoundError`` / ``ValueError`` naming the file otherwise.

>>> import tempfile, torch, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
>>> save_tensors(path, {"w": torch.ones(2)}, "example.Format", alpha=0.5)
>>> tensors, meta = load_tensors(path, "example.Format", "example file")
>>> tensors["w"].tolist(), meta["alpha"]
([1.0, 1.0], 0.5)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def atomic_write(path: str | os.PathLike, write) -> None:
    """Calls ``write(tmp_path)``, fsyncs, then renames over ``path``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yields a new folder beside ``path`` to fill; on success it replaces ``path`` (removing what
    was there), on failure it is removed: the folder at ``path`` is the old one or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """``obj`` as a JSON document at ``path``, atomically."""
    text = json.dumps(obj, indent=indent)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], format: str, **meta) -> None:
    """Tensors (moved to CPU, made contiguous) and JSON metadata in one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"podiff": json.dumps({"format": format, **meta})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_tensors(path: str | os.PathLike, format: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` from a file written by ``save_tensors`` with this ``format``.

    ``what`` names the object in errors ("no PatchPOD file at …"). A missing file is a
    ``FileNotFoundError``; a truncated, corrupted or foreign file a ``ValueError``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers / sizes
        raise ValueError(f"{path} is not a readable {what} (truncated or corrupted?): {exc}") from None
    try:
        meta = json.loads(header["podiff"])
    except (KeyError, json.JSONDecodeError, TypeError):
        raise ValueError(f"{path} is a safetensors file but not a {what} (no podiff metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != format:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path} holds {found!r}, not a {format}")
    return tensors, meta


__all__ = ["atomic_write", "atomic_directory", "write_json", "save_tensors", "load_tensors"]
