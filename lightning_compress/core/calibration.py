"""BatchNorm recalibration: running statistics recomputed from data, nothing else changed.

No Lightning here. After channels are removed, weights are factorised or a model is built from
scratch, the BatchNorms' running statistics describe a model that no longer exists; in eval mode that
shrinks (or blows up) every activation layer after layer. :func:`recalibrate_batchnorm` recomputes
them as the plain average over a few batches, with gradients off, every other module in eval mode
(dropout, and the QAT observers, which observe only in training mode, are left alone) and each
module's mode restored afterwards.

Example::

    recalibrate_batchnorm(model, [images[i : i + 32] for i in range(0, 128, 32)])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> int:
    """Recompute every BatchNorm's running mean and variance over ``batches``; return how many BatchNorms.

    Args:
        model: the model (changed in place: running statistics only).
        batches: model inputs (or whatever ``forward`` takes).
        forward: ``(model, batch) -> output`` (default ``model(batch)``).
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    try:
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
    finally:
        for norm in norms:
            norm.momentum = momenta[norm]
        for module, training in modes.items():
            module.train(training)
    return len(norms)
