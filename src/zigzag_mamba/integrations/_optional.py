"""Optional packages: imported only by the integration that needs them, with a clear message."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(package: str, extra: str, what: str) -> ModuleType:
    """``import package``, or an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs {package}, which is not installed: "
            f"pip install 'zigzag-mamba[{extra}]'  (or: pip install {package})"
        ) from exc
