"""Per-layer sensitivity: how much the validation loss and accuracy move when one layer alone is compressed.

No Lightning here. Each :class:`Setting` says what one technique would do to one layer's weight:
unstructured ``sparsity`` (the smallest magnitudes zeroed), ``channels`` (that fraction of output channels
zeroed, the weakest by L1 norm), ``low_rank`` (the weight replaced by its best approximation of the rank a
factorisation keeping that fraction of its parameters has) or ``bits`` (the weight on a symmetric
per-channel grid of that width). :func:`compressed_weight` computes it in the weight's own shape, so
:func:`sensitivity` can put it in place, evaluate a bounded number of batches and put the original back:
no module is replaced, no training happens, the model is unchanged afterwards.

Example::

    >>> table = sensitivity(model, ["fc1"], [Setting("sparsity", 0.9)], batches)
    >>> table.delta("fc1", Setting("sparsity", 0.9))["loss"]   # the loss increase, >= 0 usually
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.layers import LAYER_TYPES, weight_of
from lightning_compress.core.quantization import fake_quant_weight, weight_scale
from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of

KINDS = ("sparsity", "channels", "low_rank", "bits")
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, order=True)
class Setting:
    """One technique's setting for one layer: ``kind`` (see :data:`KINDS`) and its ``value`` (a fraction
    pruned for ``sparsity`` / ``channels``, the kept parameter ratio for ``low_rank``, the bits for ``bits``)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise config_error("setting kind", one_of(KINDS), self.kind, did_you_mean(str(self.kind), KINDS))
        value = self.value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise config_error(f"{self.kind} setting", "a number", value)
        if self.kind == "bits" and (value != int(value) or not 2 <= value <= 8):
            raise config_error("bits setting", "an integer from 2 to 8", value)
        if self.kind != "bits" and not 0 < value < 1:
            raise config_error(f"{self.kind} setting", "in (0, 1)", value)

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``"sparsity=0.9"``, ``"channels=0.5"``, ``"low_rank=0.25"`` or ``"bits=4"``."""
        kind, sep, value = str(text).partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or math.isnan(number):
            raise config_error("setting", "KIND=VALUE with KIND " + one_of(KINDS), text)
        return cls(kind.strip(), int(number) if kind.strip() == "bits" else number)

    def __str__(self) -> str:
        value = int(self.value) if self.kind == "bits" else self.value
        return f"{self.kind}={value}"


def low_rank_rank(weight: Tensor, ratio: float) -> int:
    """The rank of a two-factor factorisation of ``weight`` (``(out, fan_in)``) keeping at most ``ratio`` of
    its parameters, at least 1: ``floor(ratio * out * fan_in / (out + fan_in))``."""
    out, fan_in = weight.shape[0], weight[0].numel()
    return max(1, min(out, fan_in, int(ratio * out * fan_in // (out + fan_in))))


@torch.no_grad()
def compressed_weight(weight: Tensor, setting: Setting) -> Tensor:
    """``weight`` as ``setting`` leaves it, in its own shape and dtype (see the module docstring)."""
    w = weight.detach()
    if setting.kind == "sparsity":
        flat = w.abs().reshape(-1)
        keep = flat.numel() - round(setting.value * flat.numel())
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if keep > 0:
            mask[torch.topk(flat, keep, sorted=False).indices] = True
        return (w.reshape(-1) * mask).reshape(w.shape)
    if setting.kind == "channels":
        norms = w.reshape(w.shape[0], -1).abs().sum(1)
        pruned = min(w.shape[0] - 1, round(setting.value * w.shape[0]))
        mask = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
        if pruned > 0:
            mask[torch.topk(norms, pruned, largest=False).indices] = False
        return w * mask.reshape(-1, *([1] * (w.dim() - 1)))
    if setting.kind == "low_rank":
        matrix = w.reshape(w.shape[0], -1).double()
        rank = low_rank_rank(w, setting.value)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(w.shape).to(w.dtype)
    bits = int(setting.value)
    return fake_quant_weight(w, weight_scale(w, bits, True), bits)


def _channel_mask(weight: Tensor, compressed: Tensor) -> Tensor:
    return compressed.reshape(compressed.shape[0], -1).abs().sum(1) != 0 if weight.dim() > 1 else compressed != 0


@dataclass
class Sensitivity:
    """What :func:`sensitivity` measured: the dense model's ``baseline`` (``loss``, ``accuracy``) and, per layer
    and setting, the model's figures with only that layer compressed. ``batches`` and ``samples`` say how much
    validation data each figure comes from; ``key`` identifies weights, settings and data (for a cache)."""

    baseline: dict[str, float]
    results: dict[str, dict[str, dict[str, float]]]
    batches: int
    samples: int
    key: str = ""
    params: dict[str, int] = field(default_factory=dict)

    def delta(self, layer: str, setting: Setting | str) -> dict[str, float]:
        """``{"loss": increase, "accuracy": change}`` of ``layer`` at ``setting`` against the baseline."""
        got = self.results[layer][str(setting)]
        return {"loss": got["loss"] - self.baseline["loss"], "accuracy": got["accuracy"] - self.baseline["accuracy"]}

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "results": self.results, "batches": self.batches,
                "samples": self.samples, "key": self.key, "params": self.params}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        return cls(dict(data["baseline"]), {k: dict(v) for k, v in data["results"].items()}, int(data["batches"]),
                   int(data["samples"]), str(data.get("key", "")), dict(data.get("params", {})))  # fmt: skip


def fingerprint(model: nn.Module, layers: Iterable[str], settings: Iterable[Setting], batches: Sequence[Any]) -> str:
    """A hash of the selected layers' weights, the settings and the data: equal keys mean equal measurements."""
    digest = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in layers:
        digest.update(name.encode())
        digest.update(weight_of(modules[name]).detach().cpu().float().numpy().tobytes())
    digest.update(",".join(map(str, settings)).encode())
    for x, y in batches:
        digest.update(x.detach().cpu().float().numpy().tobytes()[:4096])
        digest.update(y.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], loss_fn: LossFn = F.cross_entropy,
             logits_fn: Callable[[Any], Tensor] | None = None) -> dict[str, float]:  # fmt: skip
    """Mean ``loss`` (sample-weighted) and top-1 ``accuracy`` of ``model`` as it is (call ``eval()``) on ``batches``."""
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        output = model(x)
        logits = logits_fn(output) if logits_fn is not None else output
        total_loss += float(loss_fn(logits, y)) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    if count == 0:
        raise CompressionConfigError("sensitivity needs at least one validation batch with samples")
    return {"loss": total_loss / count, "accuracy": correct / count}


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    layers: Sequence[str],
    settings: Sequence[Setting],
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: LossFn = F.cross_entropy,
    logits_fn: Callable[[Any], Tensor] | None = None,
    applicable: Callable[[str, nn.Module, Setting], bool] | None = None,
    bn_pairs: Mapping[str, str] | None = None,
) -> Sensitivity:
    """For each layer and setting, the validation loss and accuracy with only that layer compressed.

    The model runs in eval mode (BatchNorm on its running statistics, no recalibration) under
    ``torch.no_grad``; each compressed weight is put in place and the original put back, so ``model`` is
    the same afterwards (its mode too).

    Args:
        model: the (trained, dense) model.
        layers: the Conv/Linear layers to analyse, by name.
        settings: the settings to try on every layer.
        batches: validation ``(input, label)`` batches; each figure is measured on all of them (bound the
            cost by passing a few).
        loss_fn: ``(logits, labels) -> loss``.
        logits_fn: ``output -> logits`` for a ``forward`` that returns more than the logits.
        applicable: ``(name, layer, setting) -> bool``; settings it refuses for a layer are not measured.
        bn_pairs: ``{layer: BatchNorm}`` (see :func:`lightning_compress.core.graph.find_bn_pairs`): a pruned
            channel's BatchNorm is zeroed too, as channel pruning masks it, so the channel outputs 0, not beta.

    Raises:
        CompressionConfigError: a name that is no Conv/Linear layer of ``model``, or no batch.
    """
    modules = dict(model.named_modules())
    for name in layers:
        if not isinstance(modules.get(name), LAYER_TYPES):
            choices = [n for n, m in modules.items() if isinstance(m, LAYER_TYPES)]
            hint = did_you_mean(name, choices) or f"layers are {choices[:12]}"
            raise config_error("sensitivity layer", "a Conv/Linear layer of the model", name, hint)
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        baseline = evaluate(model, batches, loss_fn, logits_fn)
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name in layers:
            layer = modules[name]
            weight = weight_of(layer)
            bias = getattr(layer, "bias", None)
            original = weight.detach().clone()
            results[name] = {}
            for setting in settings:
                if applicable is not None and not applicable(name, layer, setting):
                    continue
                compressed = compressed_weight(original, setting)
                zeroed: list[tuple[Tensor, Tensor]] = []  # (tensor, its original) to put back
                keep = torch.ones(())
                if setting.kind == "channels":
                    keep = _channel_mask(original, compressed)
                    bn = modules.get((bn_pairs or {}).get(name, ""))
                    affine = [bias] + ([bn.weight, bn.bias] if bn is not None and hasattr(bn, "weight") else [])
                    zeroed = [(t, t.detach().clone()) for t in affine if isinstance(t, Tensor)]
                weight.copy_(compressed)
                for tensor, value in zeroed:
                    tensor.copy_(value * keep.to(value.dtype))
                results[name][str(setting)] = evaluate(model, batches, loss_fn, logits_fn)
                weight.copy_(original)
                for tensor, value in zeroed:
                    tensor.copy_(value)
    finally:
        model.train(was_training)
    samples = sum(len(y) for _, y in batches)
    params = {name: int(weight_of(modules[name]).numel()) for name in layers}
    key = fingerprint(model, layers, settings, batches)
    return Sensitivity(baseline, results, len(batches), samples, key, params)
