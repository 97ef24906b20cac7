"""One helper for importing optional heavy packages with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from embedrt.errors import MissingDependencyError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise a MissingDependencyError that says how to install it.

    Args:
        module: the dotted module name, e.g. ``"openvino"``.
        extra: the embedrt extra that provides it, e.g. ``"openvino"``.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module!r} is not installed ({exc}); install it with: pip install 'embedrt[{extra}]'"
        ) from exc
