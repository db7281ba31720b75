"""Helpers every compression callback shares: argument checks, the batch's input, distributed sync."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor

from lightning_compress.errors import CompressionConfigError, config_error


def check_names(name: str, value: Any) -> list[str] | None:
    """Validate an ``include``/``exclude`` argument: ``None``, one pattern, or a list of patterns."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise config_error(name, "a module-name pattern or a list of them (e.g. ['features.*'])", value)


def is_number(value: Any) -> bool:
    """A real int or float (``True`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_epoch(name: str, value: Any, optional: bool = True) -> float | None:
    """Validate an epoch argument: a number >= 0 (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if not is_number(value) or value < 0:
        raise config_error(name, "a number >= 0" + (" or None" if optional else ""), value)
    return float(value)


def batch_input(batch: Any) -> Tensor:
    """The model input of a batch, by the documented default: the first element of a tuple or list
    batch, the ``"input"`` key of a mapping, or the batch itself when it is a tensor.

    Raises:
        CompressionConfigError: none of those holds a tensor.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping) and isinstance(batch.get("input"), Tensor):
        return batch["input"]
    raise CompressionConfigError(
        f"cannot find the model input in a batch of type {type(batch).__name__}: expected a tensor, a tuple/list "
        "whose first element is the input, or a dict with an 'input' key"
    )


def distributed() -> bool:
    """Whether a multi-process group is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
