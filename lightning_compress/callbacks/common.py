"""Helpers every compression callback shares: argument checks, the batch's input, distributed sync."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_compress.errors import CompressionConfigError, TrainingDivergedError, config_error


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


class CompressionCallback(Callback):
    """What every callback of this package does: refuse unsupported strategies (``check_strategy`` from
    each ``setup``), stop a diverged run before anything is exported (:func:`check_finite_loss`) and
    hold no reference to the model after ``fit``."""

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        first = next((c for c in callbacks if isinstance(c, CompressionCallback)), self)
        if first is self:  # one check (one device sync) per step, however many of ours are in the list
            check_finite_loss(trainer, outputs)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning sets `callback.log = pl_module.log` (a bound method) on every callback and never
        # removes it: a callback reused for another fit would keep the last model alive.
        for name in ("log", "log_dict"):
            vars(self).pop(name, None)


def check_finite_loss(trainer: Any, outputs: Any) -> None:
    """Stop a run whose training loss is NaN or infinite, before anything is exported.

    Raises:
        TrainingDivergedError: with the epoch, batch and what to try.
    """
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all()):
        raise TrainingDivergedError(
            f"the training loss is {float(loss.detach().float().mean())} at epoch {trainer.current_epoch}, "
            f"global step {trainer.global_step}: training stopped and nothing was exported. HINT: lower the "
            "learning rate, start quantisation or pruning later, or check the data for NaN/inf"
        )
