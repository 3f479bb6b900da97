"""The method registry: every subpackage of ``edge_runtime/methods/`` is a method.

    from edge_runtime import methods
    methods.names()          # ["ast", "cfm", "dbrn"]: discovered, never listed by hand
    m = methods.get("cfm")   # the package's METHOD (an edge_runtime.methods.base.Method)

Discovery is by package: adding a method is adding a folder; nothing else in the product
names a method. ``get`` imports only the package's ``__init__`` (no torch; see base.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from edge_runtime.methods.base import Demo, Method  # noqa: F401  (re-exported)


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """Names of the installed methods, sorted."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and not m.name.startswith("_")))


def get(name: str) -> Method:
    """The method called ``name``; ValueError listing the known ones otherwise."""
    if name not in names():
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(names())}")
    method = importlib.import_module(f"{__name__}.{name}").METHOD
    if not isinstance(method, Method) or method.name != name:
        raise ValueError(f"edge_runtime/methods/{name}: METHOD must be a Method named {name!r}")
    return method


def demos() -> dict[str, Demo]:
    """Every demo bundle name the model store can build, over all methods."""
    return {d.name: d for n in names() for d in get(n).demos}


def default_demo() -> str:
    """The demo ``edge-run`` uses without ``--model`` (the one a method flags as default)."""
    flagged = [name for name, d in demos().items() if d.default]
    return flagged[0] if flagged else next(iter(demos()), "")


def for_manifest(manifest: dict) -> Method:
    """The method a bundle manifest was written by."""
    return get(str(manifest.get("method")))
