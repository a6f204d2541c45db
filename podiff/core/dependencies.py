"""Optional packages: ``require`` imports one or says, in one line, which extra installs it.

>>> require("math", "arithmetic").sqrt(4.0)
2.0
"""

from __future__ import annotations

import importlib
import importlib.util


class MissingDependency(ImportError):
    """An optional package is missing; the message says which extra installs it."""


def require(module: str, purpose: str, extra: str = "data"):
    """``module`` imported, or ``MissingDependency`` naming ``purpose`` and ``pip install 'podiff[extra]'``."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(f"{purpose} needs the '{module}' package: pip install 'podiff[{extra}]'")
    return importlib.import_module(module)


__all__ = ["MissingDependency", "require"]
