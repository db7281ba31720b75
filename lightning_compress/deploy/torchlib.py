"""torch's table of ATen -> ONNX functions, built once per process instead of once per export.

``torch.onnx.export(..., dynamo=True)`` starts every export by building an ``ONNXRegistry`` from onnxscript's
torchlib: about 500 functions, each re-parsed from its Python source to read its domain. For a small CNN that
is half of the export (1.3 of 2.6 s here), and an export writes up to four files (the model as fit started,
fp32, int8, a baseline). The table depends only on its arguments (the opset), so :func:`torchlib_once` builds
it once and hands each export its own copy (the exporter adds our custom ops to it).

The registry is torch's private API: :func:`torchlib_once` patches nothing where it does not look as
expected (the exports are then as slow as torch makes them, never different), and it patches only while one
of our exports runs.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_depth = 0
_built: dict[Any, Any] = {}
_original: Any = None


def _registry_class() -> Any:
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return None
    cls = getattr(_registration, "ONNXRegistry", None)
    return cls if cls is not None and isinstance(cls.__dict__.get("from_torchlib"), classmethod) else None


def _copy(registry: Any) -> Any:
    clone = copy.copy(registry)
    clone.functions = {target: list(decompositions) for target, decompositions in registry.functions.items()}
    return clone


def _cached(cls: Any, *args: Any, **kwargs: Any) -> Any:
    build = _original.__func__
    key = (cls, args, tuple(sorted(kwargs.items())))
    with _lock:
        base = _built.get(key)
    if base is None:
        base = build(cls, *args, **kwargs)
        if not isinstance(getattr(base, "functions", None), dict):  # not the registry this expects
            return base
        with _lock:
            _built.setdefault(key, base)
    return _copy(base)


@contextlib.contextmanager
def torchlib_once() -> Iterator[None]:
    """While the block runs, ``ONNXRegistry.from_torchlib`` returns a copy of a table built once."""
    global _depth, _original
    cls = _registry_class()
    if cls is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _original = cls.__dict__["from_torchlib"]
            cls.from_torchlib = classmethod(_cached)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                cls.from_torchlib = _original
