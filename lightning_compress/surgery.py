"""Changing what an optimizer trains after ``configure_optimizers`` ran, without losing its place.

No Lightning here: functions take optimizers and LR schedulers. Every compression callback that
adds or replaces parameters in the middle of a run goes through this module.

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
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


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
