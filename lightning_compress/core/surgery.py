"""Changing a model and what its optimizers train in the middle of a run, in plain torch.

Every change of parameters after ``configure_optimizers`` goes through this module: plain
functions of modules, optimizers and schedulers (:func:`swap_modules`, :func:`retarget_optimizer`,
:func:`add_param_group`), and :class:`InstancePatch`, the one way this package sets a function on a
model instance for a while (and copies a model without those functions: :func:`unpatched_copy`).
No Lightning here: :func:`lightning_compress.callbacks.replace.replace_modules` puts the pieces
together for a running ``lightning.Trainer``.

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
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_compress.core.graph import invalidate

ModuleT = TypeVar("ModuleT", bound=nn.Module)


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
    """Put each new module in place of the submodule of that name, in place; return the old ones.

    The model's cached analysis (:mod:`lightning_compress.core.graph`) is dropped: it describes the old structure.
    """
    old = {}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old[name] = getattr(parent, child)
        setattr(parent, child, new)
    if replacements:
        invalidate(model)
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


_PATCHED: weakref.WeakKeyDictionary[nn.Module, dict[str, InstancePatch]] = weakref.WeakKeyDictionary()


class InstancePatch:
    """Set attribute ``name`` of one module instance to ``value`` between :meth:`enter` and :meth:`exit`.

    The class's own attribute (a method, usually) is untouched and comes back on :meth:`exit`;
    :func:`unpatched_copy` copies a patched module without the patch (and without what the patch's
    value holds, e.g. the callback and trainer a wrapped ``training_step`` refers to). An instance
    attribute the module had before is kept aside and put back. Idempotent both ways.

    Example::

        patch = InstancePatch("training_step", wrapped)
        patch.enter(module)      # module.training_step is `wrapped`
        patch.exit(module)       # the class's training_step again
    """

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value
        self._saved: dict[int, Any] = {}

    def enter(self, module: nn.Module) -> None:
        """Patch ``module`` (a second enter on the same module is a no-op)."""
        patches = _PATCHED.setdefault(module, {})
        if patches.get(self.name) is self:
            return
        if self.name in patches:  # another patch of the same attribute: it goes first
            patches[self.name].exit(module)
        if self.name in vars(module):
            self._saved[id(module)] = vars(module)[self.name]
        object.__setattr__(module, self.name, self.value)
        patches[self.name] = self

    def exit(self, module: nn.Module) -> None:
        """Remove the patch from ``module`` (a no-op when it is not patched by this object)."""
        patches = _PATCHED.get(module, {})
        if patches.get(self.name) is not self:
            return
        del patches[self.name]
        vars(module).pop(self.name, None)
        if id(module) in self._saved:
            object.__setattr__(module, self.name, self._saved.pop(id(module)))

    def active(self, module: nn.Module) -> bool:
        """Whether ``module`` is patched by this object now."""
        return _PATCHED.get(module, {}).get(self.name) is self


def drop_patch(module: nn.Module, name: str) -> None:
    """Remove whichever :class:`InstancePatch` of attribute ``name`` is on ``module`` (e.g. one an
    interrupted run left behind)."""
    patch = _PATCHED.get(module, {}).get(name)
    if patch is not None:
        patch.exit(module)


def unpatched_copy(module: ModuleT) -> ModuleT:
    """``copy.deepcopy(module)`` without the :class:`InstancePatch` values set on it (its own attributes,
    functions included, are copied as usual)."""
    patches = dict(_PATCHED.get(module, {}))
    for patch in patches.values():
        patch.exit(module)
    try:
        return copy.deepcopy(module)
    finally:
        for patch in patches.values():
            patch.enter(module)
