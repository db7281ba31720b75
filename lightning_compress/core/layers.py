"""Which layers the techniques work on: the one Conv/Linear type list, selection by name, the stored weight.

No Lightning here. Pruning, quantisation, low-rank factorisation, the model analysis and the
export all select layers through :func:`select_layers` and read weights through :func:`weight_of`,
so a layer under fake quantisation (a parametrized ``weight``) is seen the same way by all of them.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> list(select_layers(model))
    ['0', '2']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Internal:
    """Marks a module this package attaches to a model (a fake quantiser): no layer of the user's model.

    The model analysis, signatures and layer selection look past such modules.
    """


def is_internal(name: str, module: nn.Module) -> bool:
    """Whether ``module`` (named ``name`` in its model) is this package's or a parametrization container."""
    return isinstance(module, Internal) or ".parametrizations" in f".{name}"


def bn_fold_factor(bn: nn.Module) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` of a BatchNorm: what folding multiplies each output channel by."""
    var = cast(Tensor, bn.running_var)
    factor = torch.rsqrt(var + cast(float, bn.eps))
    if bn.weight is not None:
        factor = factor * cast(Tensor, bn.weight)
    # A zero factor (gamma pruned to 0) would divide by zero: that channel is quantised unfolded.
    return torch.where(factor.abs() < 1e-12, torch.ones_like(factor), factor)


def weight_of(module: nn.Module) -> Tensor:
    """The ``weight`` parameter of a Conv/Linear module: the stored one, also under a parametrization
    (e.g. fake quantisation), where ``module.weight`` is computed from it. For an
    ``nn.MultiheadAttention``, its packed query/key/value projection ``in_proj_weight``."""
    if isinstance(module, nn.MultiheadAttention):
        return cast(Tensor, module.in_proj_weight)
    if parametrize.is_parametrized(module, "weight"):
        return cast(Tensor, module.parametrizations.weight.original)  # type: ignore[union-attr]
    return cast(Tensor, module.weight)


UNSUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ATTENTION_READS_WEIGHT = "nn.MultiheadAttention reads its weight directly instead of calling it"


def attention_internals(model: nn.Module) -> dict[str, str]:
    """``{name: why}`` of the Conv/Linear layers inside an ``nn.MultiheadAttention`` (its ``out_proj``).

    Attention reads their ``weight`` directly (``F.multi_head_attention_forward``), so a technique that
    hooks the layer's call (fake quantisation) or replaces the module (low-rank) cannot reach them;
    masks on the weight (unstructured, N:M pruning) still work.
    """
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child, layer in module.named_modules():
                if child and isinstance(layer, LAYER_TYPES):
                    found[f"{name}.{child}" if name else child] = ATTENTION_READS_WEIGHT
    return found


ATTENTION_IN_FLOAT = (
    "nn.MultiheadAttention's query/key/value projection (`in_proj_weight`, a bare parameter) and its "
    "attention products run inside F.multi_head_attention_forward, which fake quantisation does not reach"
)


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the ``nn.MultiheadAttention`` modules of ``model`` (their own projection is left in float)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]


def attention_projections(model: nn.Module) -> dict[str, nn.Module]:
    """The ``nn.MultiheadAttention`` modules whose query/key/value projection is one packed parameter
    (``in_proj_weight``, shape ``(3 * embed_dim, embed_dim)``, used like a Linear weight): unstructured and
    N:M pruning mask it in place (attention reads it directly, so nothing else can reach it)."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None
    }  # fmt: skip


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names of the layers no technique handles yet (transposed convolutions): reported, left as they are."""
    return [name for name, module in model.named_modules() if isinstance(module, UNSUPPORTED_TYPES)]


def shared_weights(model: nn.Module) -> dict[str, str]:
    """``{name: why}`` of the Conv/Linear layers whose weight is shared: a module registered under several
    names, or a weight tied to another module's (a technique that changes one would untie them)."""
    names_of: dict[int, list[str]] = {}
    layers: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        weight = weight_of(module) if isinstance(module, LAYER_TYPES) else getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            names_of.setdefault(id(weight), []).append(name)
            if isinstance(module, LAYER_TYPES):
                layers.add(name)
    return {
        name: f"its weight is shared with {[other for other in names if other != name]}"
        for names in names_of.values() if len(names) > 1 for name in names if name in layers
    }  # fmt: skip


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches any of the ``fnmatch`` patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def follow_replaced(patterns: Sequence[str] | None, model: nn.Module, replaced: Iterable[str]) -> list[str] | None:
    """``include`` patterns after modules were replaced (a layer factorised into ``<name>.0``, ``<name>.1``):
    the patterns that still match a Conv/Linear layer, plus ``<name>.*`` for every replaced module a pattern
    named, so a selection by name follows the layer into its replacement. ``None`` stays ``None``."""
    if patterns is None:
        return None
    names = [name for name, module in model.named_modules() if isinstance(module, LAYER_TYPES)]
    kept = [p for p in patterns if any(fnmatch.fnmatchcase(name, p) for name in names)]
    followed = [f"{old}.*" for old in replaced if matches(old, patterns)]
    return list(dict.fromkeys(kept + [p for p in followed if any(fnmatch.fnmatchcase(n, p) for n in names)]))


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = LAYER_TYPES,
) -> dict[str, nn.Module]:
    """Pick layers by qualified name.

    Args:
        model: the model.
        include: ``fnmatch`` patterns of module names (``"features.*"``); ``None`` selects every
            layer of ``types``. Each pattern must match at least one such layer.
        exclude: patterns of names to leave alone.
        types: the module types to select from (default every Conv and Linear).

    Returns:
        ``{qualified name: module}`` in registration order.

    Raises:
        CompressionConfigError: an ``include`` pattern matches no layer of ``types``.
    """
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, types)}
    if include is not None:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
                hint = did_you_mean(pattern, candidates) or f"prunable layers are {sorted(candidates)[:12]}"
                raise config_error("include", "patterns that match Conv/Linear module names", pattern, hint)
        candidates = {n: m for n, m in candidates.items() if matches(n, include)}
    if exclude:
        candidates = {n: m for n, m in candidates.items() if not matches(n, exclude)}
    return candidates


V = TypeVar("V")


def per_layer(
    setting: str,
    values: Mapping[str, V],
    layers: Iterable[str],
    strict: bool = True,
    left_out: tuple[Iterable[str], str] = ((), ""),
) -> dict[str, V]:
    """Resolve a per-layer setting (``{pattern: value}``, e.g. ``layer_sparsity={"net.fc": 0.3}``) to the layers.

    A key is a layer's qualified name or an ``fnmatch`` pattern (``"net.layer4.*"``). Every layer a key
    matches takes its value; a layer that two keys give different values is an error, not a silent choice.

    Args:
        setting: the argument's name, for messages (``layer_sparsity``).
        values: ``{name or pattern: value}``.
        layers: the names of the layers the setting may reach.
        strict: a key that matches none of ``layers`` is an error (set ``False`` where layers come and go,
            e.g. after a module is replaced mid-fit).
        left_out: ``(names, why)``: layers of the model the setting cannot reach and why, for the message
            of a key that names one of them (``"MagnitudePruning leaves them out; name them in include"``).

    Returns:
        ``{layer: value}`` for the layers some key matches.

    Raises:
        CompressionConfigError: a key matches no layer (with the nearest name and the layers there are), or
            two keys give one layer different values.
    """
    names = list(layers)
    resolved: dict[str, V] = {}
    source: dict[str, str] = {}
    for key, value in values.items():
        hit = [name for name in names if name == key or fnmatch.fnmatchcase(name, key)]
        if not hit and strict:
            outside = [name for name in left_out[0] if name == key or fnmatch.fnmatchcase(name, key)]
            if outside:
                raise CompressionConfigError(f"`{setting}[{key!r}]` names {outside[:6]}, which {left_out[1]}")
            hint = did_you_mean(key, names) or f"the layers it may name are {names[:12]}"
            raise config_error(f"{setting}[{key!r}]", "a name or pattern of a selected layer", key, hint)
        for name in hit:
            if name in resolved and resolved[name] != value:
                raise CompressionConfigError(
                    f"`{setting}` gives layer {name!r} two values: {resolved[name]!r} by {source[name]!r} and "
                    f"{value!r} by {key!r}. HINT: make the patterns disjoint or give them the same value"
                )
            resolved[name], source[name] = value, key
    return resolved
