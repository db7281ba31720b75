"""Cross-layer equalisation (Nagel et al. 2019, "Data-free quantization through weight equalization and
bias correction"): per-channel weight ranges made equal across consecutive layers, the function unchanged.

No Lightning. For a Conv/Linear ``a`` whose output reaches the next Conv/Linear ``b`` along one path (through
its BatchNorm, then ReLU-like activations and pooling: :attr:`~lightning_compress.core.graph.ModelGraph.chains`),
scaling ``a``'s output channel ``c`` by ``m_c > 0`` and ``b``'s matching input channel by ``1 / m_c`` leaves the
model's output as it was, because ``relu(m x) = m relu(x)``. With ``r1_c`` the range of ``a``'s (BatchNorm-folded)
output channel and ``r2_c`` that of ``b``'s input column, ``m_c = sqrt(r2_c / r1_c)`` gives both the range
``sqrt(r1_c r2_c)``: per-tensor and per-channel weight quantisation then lose less on the channels a depthwise
convolution (MobileNet, EfficientNet) leaves very unequal.

Where the scale is exact, and what is done elsewhere:

- a BatchNorm right after ``a`` takes the scale on its ``weight`` and ``bias`` (``m BN(y)``, exact; a BatchNorm
  without affine parameters ends the pair);
- ``ReLU``, ``LeakyReLU``, ``PReLU``, pooling, ``Flatten`` (when ``b`` reads one feature per channel), ``Identity``
  and ``Dropout`` pass any positive scale; ``ReLU6`` / ``Hardtanh(0, t)`` clip at ``t``: a channel whose values
  reach ``t`` on the calibration batches keeps ``m_c = 1``, the others take at most ``t / max``, so the clip
  never changes a calibration value (other data may reach a shifted clip: the report names the pairs);
- anything else on the path (SiLU, GELU, a residual add, a concatenation) is no pair.

Every pair is checked after it is scaled: the model's output on a calibration batch must stay within
:data:`TOLERANCE` of the output before (a tensor also used by code the module hooks do not see, ``x + y``, shows
up here); a pair that fails is undone and reported, never kept.

Example::

    done = equalize(model, [images[i : i + 32] for i in range(0, 128, 32)])
    done.pairs   # [("features.1.conv.0.0", "features.1.conv.1"), ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from lightning_compress.core.graph import analyze
from lightning_compress.core.layers import BN_TYPES, LAYER_TYPES, bn_fold_factor, weight_of

__all__ = ["ITERATIONS", "TOLERANCE", "Equalized", "equalization_pairs", "equalize"]

ITERATIONS = 4  # passes over the pairs: each pass moves a layer between two pairs towards both
TOLERANCE = 1e-4  # the largest output change allowed, relative to the largest output value
HOMOGENEOUS = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip  # f(m x) = m f(x) for m > 0, channel by channel


@dataclass
class Pair:
    """Two layers equalised together, and what lies between them."""

    first: str
    second: str
    bn: str | None = None
    clip: str | None = None  # a ReLU6 / Hardtanh(0, t) on the way


@dataclass
class Equalized:
    """What :func:`equalize` did.

    Attributes:
        pairs: the ``(first, second)`` layers equalised.
        skipped: ``{"first -> second": why}`` for the candidate pairs left as they were.
        clipped: the pairs with a ReLU6-like clip between them (exact on the calibration batches only).
        max_change: the largest relative output change seen on the checking batch.
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    clipped: list[tuple[str, str]] = field(default_factory=list)
    max_change: float = 0.0


def equalization_pairs(model: nn.Module, example: Tensor) -> tuple[list[Pair], dict[str, str]]:
    """The layer pairs of ``model`` that a per-channel scale can pass between exactly (see the module's notes),
    and ``{"first -> second": why}`` of the chains that cannot."""
    graph = analyze(model, example)
    modules = dict(model.named_modules())
    pairs: list[Pair] = []
    skipped: dict[str, str] = {}
    for first, chain in graph.chains.items():
        second, between = chain[-1], chain[:-1]
        why, pair = _pair(modules, first, second, between, graph.bn_pairs.get(first))
        if pair is not None:
            pairs.append(pair)
        elif why:
            skipped[f"{first} -> {second}"] = why
    return pairs, skipped


def _pair(
    modules: dict[str, nn.Module], first: str, second: str, between: Sequence[str], bn: str | None
) -> tuple[str | None, Pair | None]:
    a, b = modules[first], modules[second]
    if isinstance(a, nn.modules.conv._ConvTransposeNd) or isinstance(b, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution", None
    if not isinstance(a, LAYER_TYPES) or not isinstance(b, LAYER_TYPES):
        return None, None
    channels = weight_of(a).shape[0]
    inputs = b.in_channels if isinstance(b, nn.modules.conv._ConvNd) else b.in_features
    if inputs != channels:
        return f"{second} reads {inputs} features from {channels} channels (a Flatten over positions)", None
    pair = Pair(first, second)
    for position, name in enumerate(between):
        module = modules[name]
        if isinstance(module, BN_TYPES):
            if position != 0 or name != bn:
                return f"{name} normalises after an activation", None
            if module.weight is None or module.bias is None or not module.track_running_stats:
                return f"{name} has no affine parameters or running statistics", None
            pair.bn = name
        elif isinstance(module, nn.Hardtanh):  # ReLU6 too
            if module.min_val != 0 or pair.clip is not None:
                return f"{name} clips below at {module.min_val}", None
            pair.clip = name
        elif isinstance(module, nn.PReLU) and module.num_parameters not in (1, channels):
            return f"{name} has {module.num_parameters} slopes for {channels} channels", None
        elif not isinstance(module, HOMOGENEOUS):
            return f"{name} ({type(module).__name__}) does not pass a per-channel scale", None
    return None, pair


def _first_range(modules: dict[str, nn.Module], pair: Pair) -> Tensor:
    weight = weight_of(modules[pair.first]).detach()
    if pair.bn is not None:
        weight = weight * bn_fold_factor(modules[pair.bn]).reshape(-1, *([1] * (weight.dim() - 1)))
    return weight.abs().flatten(1).amax(1)


def _columns(layer: nn.Module) -> tuple[Tensor, int]:
    """``layer``'s weight viewed as ``(groups, out per group, in per group, ...)`` and its group count."""
    weight = weight_of(layer).detach()
    groups = layer.groups if isinstance(layer, nn.modules.conv._ConvNd) else 1
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:]), groups


def _second_range(modules: dict[str, nn.Module], pair: Pair) -> Tensor:
    grouped, _ = _columns(modules[pair.second])
    # input channel c = group g, column j: g * (in per group) + j
    per_column = grouped.abs().transpose(1, 2).flatten(2).amax(2)  # (groups, in per group)
    return per_column.reshape(-1)


def _touched(modules: dict[str, nn.Module], pair: Pair) -> list[Tensor]:
    """The tensors :func:`_scale` changes."""
    owner = modules[pair.bn] if pair.bn is not None else modules[pair.first]
    first = [weight_of(owner) if pair.bn is None else cast(Tensor, owner.weight)]
    if owner.bias is not None:
        first.append(cast(Tensor, owner.bias))
    return [*first, weight_of(modules[pair.second])]


@torch.no_grad()
def _scale(modules: dict[str, nn.Module], pair: Pair, m: Tensor) -> None:
    """Output channels of ``first`` times ``m``, input channels of ``second`` divided by ``m`` (in place)."""
    a, b = modules[pair.first], modules[pair.second]
    if pair.bn is not None:
        bn = modules[pair.bn]
        cast(Tensor, bn.weight).mul_(m)
        cast(Tensor, bn.bias).mul_(m)
    else:
        weight = weight_of(a)
        weight.mul_(m.reshape(-1, *([1] * (weight.dim() - 1))))
        if a.bias is not None:
            cast(Tensor, a.bias).mul_(m)
    weight = weight_of(b)
    groups = b.groups if isinstance(b, nn.modules.conv._ConvNd) else 1
    view = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
    per_group = m.reshape(groups, 1, -1, *([1] * (weight.dim() - 2)))
    view.div_(per_group)


def _clip_peaks(model: nn.Module, modules: dict[str, nn.Module], pairs: Sequence[Pair], batches: Sequence[Tensor]
                ) -> dict[str, Tensor]:  # fmt: skip
    """``{clip module: per-channel largest input}`` over ``batches`` for the ReLU6-like clips between pairs."""
    peaks: dict[str, list[Tensor]] = {}

    def record(name: str) -> object:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach()
            peaks[name].append(x.transpose(0, 1).reshape(x.shape[1], -1).amax(1))

        return hook

    handles = []
    for pair in pairs:
        if pair.clip is not None:
            peaks[pair.clip] = []
            handles.append(modules[pair.clip].register_forward_pre_hook(record(pair.clip)))  # type: ignore[arg-type]
    try:
        if handles:
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.stack(seen).amax(0) for name, seen in peaks.items()}


@torch.no_grad()
def equalize(model: nn.Module, batches: Sequence[Tensor], iterations: int = ITERATIONS) -> Equalized:
    """Equalise the weight ranges of every pair of consecutive layers of ``model`` in place (see the module's
    notes); return what was done.

    Args:
        model: a float model (no fake quantisation attached yet), run in eval mode.
        batches: a few model inputs: the first finds the pairs and checks each change; all of them bound the
            scales across a ReLU6-like clip.
        iterations: passes over all pairs.
    """
    was_training = model.training
    model.eval()
    try:
        return _equalize(model, list(batches), iterations)
    finally:
        model.train(was_training)


def _equalize(model: nn.Module, batches: list[Tensor], iterations: int) -> Equalized:
    check = batches[0]
    pairs, skipped = equalization_pairs(model, check[:2])
    modules = dict(model.named_modules())
    done = Equalized(skipped=skipped)
    reference = model(check)
    size = float(reference.abs().max()) or 1.0
    kept = list(pairs)
    # A pair's scale m multiplies the input of the clip between its layers by m (nothing else reaches it):
    # the peaks are measured once and follow the scales.
    peaks = _clip_peaks(model, modules, pairs, batches)
    for _ in range(iterations):
        for pair in list(kept):
            r1, r2 = _first_range(modules, pair), _second_range(modules, pair)
            m = torch.where((r1 > 0) & (r2 > 0), (r2 / r1.clamp_min(1e-30)).sqrt(), torch.ones_like(r1))
            if pair.clip is not None:
                top, peak = float(cast(nn.Hardtanh, modules[pair.clip]).max_val), peaks[pair.clip]
                # a channel that reaches the clip keeps its scale; the others may grow up to it
                m = torch.where(peak >= top, torch.ones_like(m), torch.minimum(m, top / peak.clamp_min(1e-30)))
            saved = [t.detach().clone() for t in _touched(modules, pair)]
            _scale(modules, pair, m)
            change = float((model(check) - reference).abs().max()) / size
            if change > TOLERANCE:  # the function changed: something the hooks did not see uses this tensor
                for tensor, value in zip(_touched(modules, pair), saved, strict=True):
                    tensor.detach().copy_(value)  # exactly as it was
                kept.remove(pair)
                done.skipped[f"{pair.first} -> {pair.second}"] = (
                    f"scaling changed the output by {change:.2g} of its largest value (the tensor is used elsewhere)"
                )
            else:
                done.max_change = max(done.max_change, change)
                if pair.clip is not None:
                    peaks[pair.clip] = peaks[pair.clip] * m
    done.pairs = [(p.first, p.second) for p in kept]
    done.clipped = [(p.first, p.second) for p in kept if p.clip is not None]
    return done
