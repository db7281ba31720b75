"""Changing a model and what its optimizers train in the middle of ``fit``, without losing the run's place.

Every compression callback that adds or replaces parameters after ``configure_optimizers`` goes
through this module. The pieces are plain functions of modules, optimizers and schedulers
(:func:`swap_modules`, :func:`retarget_optimizer`, :func:`add_param_group`);
:func:`replace_modules` puts them together for a running ``lightning.Trainer``: it swaps the
modules, moves every optimizer onto the new parameters (keeping the state of all others), keeps
the LR schedulers where they are, re-wraps DDP, and tells the other callbacks.

Example::

    >>> model, adapter = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> add_param_group(optimizer, adapter.parameters())
    1
    >>> optimizer.param_groups[1]["lr"], optimizer.param_groups[1]["momentum"]
    (0.1, 0.9)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_compress.errors import CompressionConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl

HOOK = "on_modules_replaced"  # callbacks that keep module references implement this


def add_param_group(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    schedulers: Sequence[Any] = (),
    like: int = 0,
) -> int:
    """Append a parameter group that trains like group ``like`` does now; return its index.

    The new group copies every hyper-parameter of group ``like`` as it is at this moment (the
    learning rate a scheduler has reached, momentum, betas, weight decay, ``initial_lr``), so the
    new parameters follow the run's schedule from where it stands. Each LR scheduler of
    ``optimizer`` is told about the group: every per-group list torch's schedulers keep
    (``base_lrs``, ``lr_lambdas``, ``min_lrs``, ``max_lrs``, the last LRs) gains the entry of
    group ``like``; schedulers chained in ``SequentialLR``/``ChainedScheduler`` too.

    Args:
        optimizer: the optimizer to extend.
        params: the new parameters (none may already be in ``optimizer``).
        schedulers: the LR schedulers stepping ``optimizer``.
        like: the group whose hyper-parameters the new one takes.
    """
    groups = len(optimizer.param_groups)
    template = {k: copy.deepcopy(v) for k, v in optimizer.param_groups[like].items() if k != "params"}
    optimizer.add_param_group({**template, "params": list(params)})
    for scheduler in schedulers:
        _extend_scheduler(scheduler, groups, like)
    return groups


PER_GROUP_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs")  # torch's schedulers' per-group state


def _extend_scheduler(scheduler: Any, groups: int, like: int) -> None:
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _extend_scheduler(child, groups, like)
    for name in PER_GROUP_LISTS:
        value = getattr(scheduler, name, None)
        if isinstance(value, list) and len(value) == groups:
            entry = value[like]
            value.append(entry if callable(entry) else copy.deepcopy(entry))


def swap_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each new module in place of the submodule of that name, in place; return the old ones."""
    old = {}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old[name] = getattr(parent, child)
        setattr(parent, child, new)
    return old


def retarget_optimizer(optimizer: torch.optim.Optimizer, replaced: Mapping[str, tuple[nn.Module, nn.Module]]) -> None:
    """Move ``optimizer`` from each old module's parameters to its replacement's, in place.

    The new module's parameters, in the order it lists them, take the place of the old module's
    first parameter in its group: the order a fresh ``configure_optimizers`` over
    ``self.parameters()`` of the changed model would produce, so a checkpoint's optimizer state
    loads into a run rebuilt from it. Where the old module's parameters sat in several groups (a
    decay / no-decay split), new biases go to the old bias's group and the rest to the old
    weight's. Every other parameter keeps its place and its state (momentum, Adam moments); the
    old parameters' state is dropped. A module the optimizer did not train stays out of it.
    """
    for old, new in replaced.values():
        old_ids = {id(p) for p in old.parameters()}
        where = {id(p): (gi, i) for gi, group in enumerate(optimizer.param_groups)
                 for i, p in enumerate(group["params"]) if id(p) in old_ids}  # fmt: skip
        if not where:
            continue
        placed: dict[tuple[int, int], list[nn.Parameter]] = {}
        if len({gi for gi, _ in where.values()}) == 1:
            placed[min(where.values())] = list(new.parameters())
        else:
            slots = {_kind(n): where[id(p)] for n, p in reversed(list(old.named_parameters())) if id(p) in where}
            for name, param in new.named_parameters():
                placed.setdefault(slots.get(_kind(name), min(where.values())), []).append(param)
        for gi, group in enumerate(optimizer.param_groups):
            params: list[nn.Parameter] = []
            for index, param in enumerate(group["params"]):
                params.extend(placed.get((gi, index), []))
                if id(param) in old_ids:
                    optimizer.state.pop(param, None)
                else:
                    params.append(param)
            group["params"] = params


def _kind(name: str) -> str:
    """``bias`` for a bias (also a parametrized one), else ``weight``."""
    return "bias" if name.split(".")[-1] == "bias" or name.endswith("bias.original") else "weight"


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


def replace_modules(
    trainer: pl.Trainer, pl_module: pl.LightningModule, replacements: Mapping[str, nn.Module]
) -> dict[str, nn.Module]:
    """Swap submodules of a running model and keep the run going; return the old modules.

    1. every rank takes rank zero's new modules (so DDP ranks stay identical);
    2. the modules are swapped in;
    3. every callback with an ``on_modules_replaced(trainer, pl_module, replaced)`` method is told
       (``replaced`` maps each name to ``(old, new)``): pruning masks the new layers, QAT
       fake-quantises them, distillation re-finds its layers;
    4. every optimizer trains the new parameters in place of the old (:func:`retarget_optimizer`);
       optimizer objects stay the same, so LR schedulers keep their step and base LRs;
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
    """Call ``on_modules_replaced`` on every callback of ``trainer`` that has it."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        hook = getattr(callback, HOOK, None)
        if callable(hook):
            hook(trainer, pl_module, dict(replaced))
