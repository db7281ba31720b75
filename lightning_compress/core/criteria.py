"""Pruning criteria: what a weight or an output channel is worth, beyond its magnitude.

No Lightning here. Each criterion turns a layer's weight (and, for some, its gradients over training steps or
its BatchNorm) into importance scores that :func:`lightning_compress.core.pruning.compute_masks` ranks in
place of the magnitudes (``importance=``): the highest are kept.

- ``magnitude`` (the default): ``|w|`` per weight, the L1 / L2 norm of each output channel's filter.
- ``taylor`` (Molchanov et al. 2019, first order): the change of the loss were a weight removed, estimated
  from gradients: ``(g * w)**2`` per weight, ``(sum over the filter of g * w)**2`` per output channel, averaged
  over the training steps since the last mask update (:class:`Accumulator`).
- ``fpgm`` (He et al. 2019, channels): filters near the geometric median of their layer's filters are the
  ones the others can stand in for: each filter scores the sum of its Euclidean distances to every other
  filter of the layer, and the smallest sums are pruned first.
- ``slimming`` (Liu et al. 2017, channels): an L1 penalty on the BatchNorm scales ``gamma`` during training
  (:func:`slimming_penalty_` adds its subgradient, ``strength * sign(gamma)``), then channels rank by
  ``|gamma|`` of the BatchNorm that normalises them.
- ``movement`` (Sanh et al. 2020, weights): ``S = -sum_t g_t * w_t`` accumulated over every step of the fit:
  weights that training moves away from zero score high, those it pulls toward zero low, whatever their
  magnitude now (for fine-tuning pretrained weights, where magnitude reflects pre-training).

Example::

    >>> fpgm_scores(torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]))
    tensor([4., 3., 5.])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_compress.errors import config_error, did_you_mean, one_of

CRITERIA = ("magnitude", "taylor", "fpgm", "slimming", "movement")
CHANNEL_ONLY = ("fpgm", "slimming")  # scores of output channels
WEIGHT_ONLY = ("movement",)  # signed scores of single weights
FROM_GRADIENTS = ("taylor", "movement")  # accumulated over training steps (:class:`Accumulator`)
SLIMMING_STRENGTH = 1e-4  # the L1 strength on gamma of Liu et al.'s CIFAR experiments


def check_criterion(criterion: Any, kind: str, pattern: str | None = None) -> str:
    """``criterion`` if it names a criterion that works with a pattern of ``kind`` (``unstructured``, ``channel``,
    ``n:m``; ``pattern`` is how the messages name it).

    Raises:
        CompressionConfigError: an unknown criterion (with a did-you-mean), or one that does not rank what
            ``pattern`` prunes.
    """
    if criterion not in CRITERIA:
        raise config_error("criterion", one_of(CRITERIA), criterion, did_you_mean(str(criterion), CRITERIA))
    pattern = pattern or kind
    if criterion == "magnitude":
        return criterion
    if kind not in ("unstructured", "channel"):
        raise config_error("criterion", f"'magnitude' with pattern '{pattern}' (N:M groups rank by magnitude)",
                           criterion)  # fmt: skip
    if criterion in CHANNEL_ONLY and kind != "channel":
        raise config_error("criterion", f"used with pattern 'channel' ({criterion} ranks output channels)", criterion)
    if criterion in WEIGHT_ONLY and kind != "unstructured":
        raise config_error("criterion", f"used with pattern 'unstructured' ({criterion} ranks single weights)",
                           criterion)  # fmt: skip
    return str(criterion)


def fpgm_scores(weight: Tensor) -> Tensor:
    """FPGM: for each output channel, the sum of the Euclidean distances of its filter to every filter of the
    layer (He et al. 2019, the approximation of the paper's eq. 6: the filter with the smallest sum is nearest
    the geometric median). Shape ``(out_channels,)``."""
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    return torch.cdist(flat, flat).sum(1).float()


def taylor_step(weight: Tensor, grad: Tensor, channel: bool) -> Tensor:
    """One step's first-order Taylor importance (Molchanov et al. 2019): ``(g * w)**2`` per weight, or for each
    output channel the square of the sum of ``g * w`` over its filter."""
    product = (grad.detach() * weight.detach()).double()
    if channel:
        return product.reshape(product.shape[0], -1).sum(1).square()
    return product.square()


def movement_step(weight: Tensor, grad: Tensor) -> Tensor:
    """One step's contribution to the movement score (Sanh et al. 2020): ``-g * w`` per weight."""
    return -(grad.detach() * weight.detach()).double()


def slimming_scores(gamma: Tensor) -> Tensor:
    """Network slimming's channel scores: ``|gamma|`` of the BatchNorm that normalises the channels."""
    return gamma.detach().abs().float()


@torch.no_grad()
def slimming_penalty_(gamma: Tensor, strength: float = SLIMMING_STRENGTH) -> None:
    """Add the subgradient of ``strength * sum |gamma|`` to ``gamma``'s gradient, in place (before the
    optimizer step): the sparsity-inducing L1 term of Liu et al. 2017, without changing the training loss."""
    if gamma.grad is not None:
        gamma.grad.add_(torch.sign(gamma), alpha=strength)


class Accumulator:
    """The running importance of a gradient criterion, per layer: ``taylor`` averages its steps since the last
    :meth:`reset` (each mask update starts afresh), ``movement`` sums every step of the fit.

    :meth:`state_dict` / :meth:`load_state_dict` carry it through checkpoints; every DDP rank sees the same
    averaged gradients and weights, so the sums agree (the masks are also broadcast from rank 0).
    """

    def __init__(self, criterion: str, channel: bool) -> None:
        if criterion not in FROM_GRADIENTS:
            raise config_error("criterion", one_of(FROM_GRADIENTS), criterion)
        self.criterion, self.channel = criterion, channel
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}  # the steps that reached each layer (a frozen or unused one: none)
        self.steps = 0

    def add(self, weights: Mapping[str, tuple[Tensor, Tensor | None]]) -> None:
        """Add one step: ``{layer: (weight, its gradient)}`` (a layer without a gradient adds nothing)."""
        for name, (weight, grad) in weights.items():
            if grad is None:
                continue
            taylor = self.criterion == "taylor"
            step = taylor_step(weight, grad, self.channel) if taylor else movement_step(weight, grad)
            step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)  # a step mixed precision skips adds 0
            total = self.sums.get(name)
            self.sums[name] = step if total is None else total.add_(step)
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1

    def scores(self) -> dict[str, Tensor]:
        """``{layer: scores}`` (float32): the mean over the steps for ``taylor``, the sum for ``movement``."""
        if self.criterion == "taylor":
            return {name: (total / max(1, self.counts.get(name, 1))).float() for name, total in self.sums.items()}
        return {name: total.float() for name, total in self.sums.items()}

    def reset(self) -> None:
        """Start a new averaging window (``taylor``; ``movement`` keeps its sums for the whole fit)."""
        if self.criterion == "taylor":
            self.sums, self.counts, self.steps = {}, {}, 0

    def state_dict(self) -> dict[str, Any]:
        sums = {n: t.cpu() for n, t in self.sums.items()}
        return {"criterion": self.criterion, "steps": self.steps, "counts": dict(self.counts), "sums": sums}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        self.steps = int(state.get("steps", 0))
        self.sums = {name: t.to(device=device, dtype=torch.float64) for name, t in state.get("sums", {}).items()}
        self.counts = {name: int(n) for name, n in state.get("counts", {n: self.steps for n in self.sums}).items()}
