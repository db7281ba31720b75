"""The shared base of every compression callback, and what the callbacks share.

:class:`CompressionCallback` declares the hooks the callbacks coordinate through
(:meth:`~CompressionCallback.on_modules_replaced`, a documented no-op), the strategy check every
``setup`` runs, the once-a-step divergence check and the teardown that drops model references.
:func:`find_callback` / :func:`find_callbacks` are the one way callbacks find each other (by type,
never by name). Also here: argument checks shared by the constructors, the batch's input, whether a
process group runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.errors import CompressionConfigError, TrainingDivergedError, config_error

CallbackT = TypeVar("CallbackT", bound=Callback)


def check_names(name: str, value: Any) -> list[str] | None:
    """Validate an ``include``/``exclude`` argument: ``None``, one pattern, or a list of patterns."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise config_error(name, "a module-name pattern or a list of them (e.g. ['features.*'])", value)


def check_layer_values(name: str, value: Any, fits: Callable[[Any], bool], allowed: str) -> dict[str, Any] | None:
    """Validate a per-layer argument (``layer_sparsity``, ``ranks``, ``layer_bits``): ``None`` or a mapping of
    module names / ``fnmatch`` patterns to values that ``fits`` accepts; every bad entry is named."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise config_error(name, "a mapping of module names or patterns to values (e.g. {'net.fc': ...})", value)
    for key, entry in value.items():
        if not fits(entry):
            raise config_error(f"{name}[{key!r}]", allowed, entry)
    return dict(value)


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
    """What every callback of this package does and may be told.

    * ``setup`` of each subclass calls :func:`check_strategy` (single-device and DDP only);
    * :meth:`on_modules_replaced` is called by
      :func:`~lightning_compress.callbacks.replace.replace_modules` on every compression callback
      of the Trainer when modules of the model were replaced mid-fit (and when a checkpoint's
      factorised structure is rebuilt before its weights load);
    * the first compression callback of the Trainer stops a diverged run once a step
      (:func:`check_finite_loss`), before anything is exported;
    * ``teardown`` drops every reference to the model, so a reused callback keeps no model alive.

    Subclasses that keep state across checkpoints set ``kind`` (a stable name of the technique);
    their ``state_dict`` carries it as ``"kind"``, which is how :func:`lightning_compress.restore`
    recognises a state without relying on the class's name.
    """

    kind: str = ""
    changes_model: bool = False  # whether it changes what the model computes (and calls before_model_change first)
    _phase_epoch: int | None = None  # the training epoch whose phase was last applied (on_epoch_phase)

    def on_modules_replaced(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, replaced: dict[str, tuple[nn.Module, nn.Module]]
    ) -> None:
        """Modules of ``pl_module`` were replaced: ``replaced`` maps each name to ``(old, new)``.

        Called before the optimizers move to the new parameters. A no-op here; callbacks that keep
        references to modules (masks, quantisers, hooked layers) find them again.
        """

    def on_before_model_change(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, by: CompressionCallback
    ) -> None:
        """``by`` is about to change what ``pl_module`` computes (a mask update, fake quantisation switched on,
        layers factorised): called by :func:`before_model_change` before every such change, so first of all
        before the first one of the fit. A no-op here; ``KnowledgeDistillation(teacher="self")`` takes its copy
        of the model at the first call."""

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if find_callback(trainer, CompressionCallback) is self:  # one check (one sync) per step, however many
            check_finite_loss(trainer, outputs)

    def on_epoch_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the phase of ``trainer.current_epoch`` (QAT's start, BN / observer freezing, the low-rank
        epoch). Called once per training epoch before its first step: from ``on_train_epoch_start``, or from
        the epoch's first ``on_train_batch_start`` when Lightning entered the epoch without the former (it
        does, resuming from a step checkpoint written at an epoch's last batch). A no-op here."""

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_epoch(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._enter_epoch(trainer, pl_module)  # subclasses that override this call it first

    def _enter_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._phase_epoch != trainer.current_epoch:
            self._phase_epoch = trainer.current_epoch
            self.on_epoch_phase(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._phase_epoch = None  # the next fit (or a resumed one) enters its first epoch afresh
        # Lightning sets `callback.log = pl_module.log` (a bound method) on every callback and never
        # removes it: a callback reused for another fit would keep the last model alive.
        for name in ("log", "log_dict"):
            vars(self).pop(name, None)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A fit that ends in an exception or Ctrl-C gets `on_exception` and never `teardown`: release the
        # model (hooks, patched methods, references) on that way out too. Each `teardown` is idempotent.
        self.teardown(trainer, pl_module, "fit")


def before_model_change(trainer: Any, pl_module: pl.LightningModule, by: CompressionCallback) -> None:
    """Tell every compression callback of ``trainer`` that ``by`` is about to change ``pl_module``
    (:meth:`CompressionCallback.on_before_model_change`)."""
    for callback in find_callbacks(trainer, CompressionCallback):
        callback.on_before_model_change(trainer, pl_module, by)


def find_callbacks(trainer: Any, kind: type[CallbackT]) -> list[CallbackT]:
    """Every callback of ``trainer`` that is an instance of ``kind``, in the Trainer's order."""
    return [c for c in getattr(trainer, "callbacks", []) if isinstance(c, kind)]


def find_callback(trainer: Any, kind: type[CallbackT]) -> CallbackT | None:
    """The first callback of ``trainer`` that is an instance of ``kind``, or ``None``.

    Example::

        qat = find_callback(trainer, QuantizationAwareTraining)
    """
    found = find_callbacks(trainer, kind)
    return found[0] if found else None


def check_strategy(trainer: Any, what: str) -> None:
    """Refuse strategies that shard or wrap the parameters in ways the callbacks cannot see whole.

    Single-device and DDP (one node or several; ``ddp``, ``ddp_spawn``, ``ddp_fork``) are supported.

    Raises:
        CompressionConfigError: FSDP, DeepSpeed, model-parallel or any other strategy.
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)  # DeepSpeed subclasses DDP
    if not (ddp or isinstance(strategy, SingleDeviceStrategy)):
        raise CompressionConfigError(
            f"{what} supports Lightning's single-device and DDP strategies (on one node or several), not "
            f"{type(strategy).__name__}: it shards or wraps the parameters that masks, fake quantisation and "
            "factorisation must see whole. HINT: use strategy='ddp'"
        )


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
