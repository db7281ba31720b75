"""Replacing modules of a model while ``lightning.Trainer`` fits it, without losing the run's place.

The plain-torch pieces are in :mod:`lightning_compress.core.surgery`; :func:`replace_modules` puts
them together for a running Trainer and tells the other compression callbacks.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch.distributed as dist
from torch import nn

from lightning_compress.callbacks.base import CompressionCallback, check_strategy, find_callbacks
from lightning_compress.core.surgery import retarget_optimizer, swap_modules


def replace_modules(
    trainer: pl.Trainer, pl_module: pl.LightningModule, replacements: Mapping[str, nn.Module]
) -> dict[str, nn.Module]:
    """Swap submodules of a running model and keep the run going; return the old modules.

    1. every rank takes rank zero's new modules (so DDP ranks stay identical);
    2. the modules are swapped in (the model's cached analysis is dropped);
    3. every compression callback's :meth:`~CompressionCallback.on_modules_replaced` is called
       (``replaced`` maps each name to ``(old, new)``): pruning masks the new layers, QAT
       fake-quantises them, distillation re-finds its layers;
    4. every optimizer trains the new parameters in place of the old
       (:func:`~lightning_compress.core.surgery.retarget_optimizer`); optimizer objects stay the
       same, so LR schedulers keep their step and base LRs;
    5. under DDP the model is wrapped again, so gradient sync covers exactly the new parameters.

    Call it between optimizer steps (e.g. ``on_train_epoch_start``).

    Raises:
        CompressionConfigError: a strategy other than single-device or DDP (e.g. FSDP, DeepSpeed).
    """
    from lightning.pytorch.strategies import DDPStrategy

    check_strategy(trainer, "replacing modules during fit")
    strategy = trainer.strategy
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for module in replacements.values():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)
    old = swap_modules(pl_module, replacements)
    replaced = {name: (old[name], new) for name, new in replacements.items()}
    notify(trainer, pl_module, replaced)  # before the optimizers: QAT's parametrizations set the parameter order
    for optimizer in trainer.optimizers:
        retarget_optimizer(optimizer, replaced)
    if isinstance(strategy, DDPStrategy) and strategy.model is not pl_module and strategy.model is not None:
        strategy.model = strategy._setup_model(pl_module)  # a fresh reducer over the new parameters
        strategy._register_ddp_hooks()
    return old


def notify(
    trainer: pl.Trainer, pl_module: pl.LightningModule, replaced: Mapping[str, tuple[nn.Module, nn.Module]]
) -> None:
    """Call :meth:`~CompressionCallback.on_modules_replaced` on every compression callback of ``trainer``."""
    for callback in find_callbacks(trainer, CompressionCallback):
        callback.on_modules_replaced(trainer, pl_module, dict(replaced))
