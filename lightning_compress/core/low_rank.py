"""Low-rank factorisation of Linear and Conv2d layers: truncated SVD, spatial SVD and Tucker-2.

No Lightning here: functions take a layer (or a model) and return new modules. The callback
(:class:`~lightning_compress.LowRankFactorization`) decides when, and swaps them in through
:mod:`lightning_compress.core.surgery`.

- ``Linear``: ``W ≈ (U_r Σ_r)(V_rᵀ)`` as ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.
- ``Conv2d``, ``svd`` (spatial SVD): the ``k×k`` conv to ``r`` channels (same stride, padding,
  dilation), then a ``1×1`` conv to ``out`` channels.
- ``Conv2d``, ``tucker2`` (Kim et al. 2016, HOSVD): ``1×1`` to ``r_in``, ``k×k`` from ``r_in`` to
  ``r_out``, ``1×1`` to ``out``.

The factorised layer is a :class:`LowRank` (an ``nn.Sequential``), so its structure is visible in
state-dict keys (``fc.0.weight``, ``fc.1.weight``): :func:`rebuild` recreates it in a fresh model
from those keys and shapes alone.

Example::

    >>> layer = torch.nn.Linear(64, 32)
    >>> factorised = factorize_linear(layer, rank=8)
    >>> [tuple(m.weight.shape) for m in factorised]
    [(8, 64), (32, 8)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_compress.core.attention import ProjectedAttention, expose_attention, exposed_names
from lightning_compress.core.graph import analyze
from lightning_compress.core.layers import (
    LAYER_TYPES,
    attention_internals,
    per_layer,
    select_layers,
    shared_weights,
    weight_of,
)
from lightning_compress.core.surgery import swap_modules
from lightning_compress.errors import CompressionConfigError, config_error, one_of

CONV_METHODS = ("svd", "tucker2")
RANK_FLOOR = 4  # the ratio and energy rules never choose a lower rank (capped at the layer's own rank)
MIN_FAN_IN = 32  # by default, layers with a smaller fan-in (in_features or in_channels * kh * kw) are left alone


class LowRank(nn.Sequential):
    """A factorised layer: the chain of smaller layers that replaced one Linear or Conv2d."""


@dataclass(frozen=True)
class Factorization:
    """What a layer became: ``kind`` (``linear``, ``svd``, ``tucker2``) and its ranks."""

    kind: str
    ranks: tuple[int, ...]
    params_before: int
    params_after: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ranks": list(self.ranks)}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _weight(layer: nn.Module) -> Tensor:
    """The stored float weight (under fake quantisation, the parametrization's original), in float64."""
    return weight_of(layer).detach().double()


def _matrix(layer: nn.Module) -> Tensor:
    """The layer's weight as ``(out, in * kh * kw)``."""
    weight = _weight(layer)
    return weight.reshape(weight.shape[0], -1)


def singular_values(layer: nn.Module) -> Tensor:
    """Singular values of the layer's weight matrix (``(out, in*kh*kw)``), largest first."""
    return torch.linalg.svdvals(_matrix(layer))


def rank_for(
    layer: Any, rank: int | None = None, ratio: float | None = None, energy: float | None = None,
    method: str = "svd", floor: int = RANK_FLOOR,
) -> tuple[int, ...]:  # fmt: skip
    """The rank(s) for ``layer``: fixed, by parameter ``ratio`` (largest rank whose factorisation has at
    most ``ratio`` of the layer's parameters), or by singular-value ``energy`` (smallest rank keeping
    that fraction of the sum of squared singular values). The ``ratio`` and ``energy`` rules never go
    below ``floor`` (capped at the layer's own rank): a rank-1 layer wrecks a model.

    Returns ``(r,)`` for SVD and ``(r_out, r_in)`` for Tucker-2 (the same rule on both unfoldings;
    ``ratio`` scales both ranks by the same factor).

    Raises:
        CompressionConfigError: a rank not below the layer's smallest dimension.
    """
    out_features, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    if method == "tucker2":
        return _tucker_ranks(layer, rank, ratio, energy, floor)
    full = min(out_features, fan_in)
    if rank is not None:
        if rank >= full and full > 1:
            raise config_error("rank", f"< {full} for {type(layer).__name__} {tuple(layer.weight.shape)}", rank)
        return (max(1, min(rank, full)),)
    floor = min(floor, full)
    if ratio is not None:
        budget = ratio * out_features * fan_in
        return (max(floor, min(full, int(budget // (out_features + fan_in)))),)
    assert energy is not None
    return (max(floor, _energy_rank(singular_values(layer), energy)),)


def _energy_rank(values: Tensor, energy: float) -> int:
    share = torch.cumsum(values**2, 0) / (values**2).sum().clamp_min(1e-30)
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12).item()) + 1


def _unfold(weight: Tensor, mode: int) -> Tensor:
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def _tucker_ranks(
    layer: Any, rank: int | None, ratio: float | None, energy: float | None, floor: int
) -> tuple[int, int]:
    weight = _weight(layer)
    out_c, in_c, kh, kw = weight.shape
    if rank is not None:
        if rank >= min(out_c, in_c) and min(out_c, in_c) > 1:
            raise config_error("rank", f"< {min(out_c, in_c)} for Conv2d {tuple(weight.shape)} (Tucker-2)", rank)
        return (max(1, min(rank, out_c)), max(1, min(rank, in_c)))
    floors = (min(floor, out_c), min(floor, in_c))
    if ratio is not None:
        budget, best = ratio * weight.numel(), (1, 1)
        for scale in torch.linspace(1.0, 0.0, 101).tolist():
            r_out, r_in = max(1, round(scale * out_c)), max(1, round(scale * in_c))
            if in_c * r_in + r_in * r_out * kh * kw + r_out * out_c <= budget:
                best = (r_out, r_in)
                break
        return (max(floors[0], best[0]), max(floors[1], best[1]))
    assert energy is not None
    values = [torch.linalg.svdvals(_unfold(weight, mode)) for mode in (0, 1)]
    return (max(floors[0], _energy_rank(values[0], energy)), max(floors[1], _energy_rank(values[1], energy)))


def factorize_linear(layer: nn.Linear, rank: int) -> LowRank:
    """``Linear(in, out)`` as ``Linear(in, r, bias=False)`` then ``Linear(r, out)`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(_matrix(layer), full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    _set(first.weight, root[:, None] * vh[:rank])
    _set(second.weight, u[:, :rank] * root)
    if layer.bias is not None and second.bias is not None:
        _set(second.bias, layer.bias.detach())
    return _like(LowRank(first, second), layer)


def factorize_conv_svd(layer: nn.Conv2d, rank: int) -> LowRank:
    """Spatial SVD: the ``k×k`` conv to ``rank`` channels, then a ``1×1`` conv to the outputs."""
    _check_conv(layer)
    u, s, vh = torch.linalg.svd(_matrix(layer), full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Conv2d(
        layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,  # type: ignore[arg-type]
        bias=False, padding_mode=layer.padding_mode,
    )  # fmt: skip
    second = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None)
    _set(first.weight, (root[:, None] * vh[:rank]).reshape(first.weight.shape))
    _set(second.weight, (u[:, :rank] * root).reshape(second.weight.shape))
    if layer.bias is not None and second.bias is not None:
        _set(second.bias, layer.bias.detach())
    return _like(LowRank(first, second), layer)


def factorize_conv_tucker2(layer: nn.Conv2d, ranks: tuple[int, int]) -> LowRank:
    """Tucker-2 by HOSVD (Kim et al. 2016): ``1×1`` to ``r_in``, ``k×k`` to ``r_out``, ``1×1`` to the outputs."""
    _check_conv(layer)
    r_out, r_in = ranks
    weight = _weight(layer)
    u_out = torch.linalg.svd(_unfold(weight, 0), full_matrices=False)[0][:, :r_out]
    u_in = torch.linalg.svd(_unfold(weight, 1), full_matrices=False)[0][:, :r_in]
    core = torch.einsum("oikl,or,is->rskl", weight, u_out, u_in)
    first = nn.Conv2d(layer.in_channels, r_in, 1, bias=False)
    middle = nn.Conv2d(
        r_in, r_out, layer.kernel_size, layer.stride, layer.padding, layer.dilation,  # type: ignore[arg-type]
        bias=False, padding_mode=layer.padding_mode,
    )  # fmt: skip
    last = nn.Conv2d(r_out, layer.out_channels, 1, bias=layer.bias is not None)
    _set(first.weight, u_in.T.reshape(first.weight.shape))
    _set(middle.weight, core)
    _set(last.weight, u_out.reshape(last.weight.shape))
    if layer.bias is not None and last.bias is not None:
        _set(last.bias, layer.bias.detach())
    return _like(LowRank(first, middle, last), layer)


def _check_conv(layer: nn.Conv2d) -> None:
    if layer.groups != 1:
        raise CompressionConfigError(
            f"cannot factorise a grouped or depthwise Conv2d (groups={layer.groups}): its weight is not one matrix"
        )


def _set(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _like(module: LowRank, layer: Any) -> LowRank:
    return module.to(device=layer.weight.device, dtype=layer.weight.dtype).train(layer.training)


def smallest_dimension(layer: Any) -> int:
    """``min(out, in * kh * kw)`` of a Linear/Conv2d weight: the full rank of its matrix."""
    return int(min(layer.weight.shape[0], layer.weight[0].numel()))


def skip_reason(layer: Any) -> str | None:
    """Why ``layer`` is not factorised (``None`` when it can be)."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return f"a {type(layer).__name__}: low-rank factorises Linear and Conv2d layers only"
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return "grouped or depthwise convolution"
    if not weight_of(layer).requires_grad:
        return "frozen (requires_grad=False): a factorised copy could not train back"
    if smallest_dimension(layer) < 2:
        return "a dimension of size 1"
    return None


def factorize(
    layer: nn.Module,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    conv_method: str = "svd",
) -> tuple[LowRank, Factorization]:
    """Factorise one Linear or Conv2d layer (exactly one of ``rank``, ``ratio``, ``energy``).

    Raises:
        CompressionConfigError: bad settings, or a layer that cannot be factorised.
    """
    check_settings(rank, ratio, energy, conv_method)
    if isinstance(layer, nn.Linear):
        ranks = rank_for(layer, rank, ratio, energy)
        new, kind = factorize_linear(layer, ranks[0]), "linear"
    elif isinstance(layer, nn.Conv2d):
        ranks = rank_for(layer, rank, ratio, energy, conv_method)
        if conv_method == "tucker2":
            new, kind = factorize_conv_tucker2(layer, (ranks[0], ranks[1])), "tucker2"
        else:
            new, kind = factorize_conv_svd(layer, ranks[0]), "svd"
    else:
        raise CompressionConfigError(f"cannot factorise a {type(layer).__name__}: only Linear and Conv2d layers")
    return new, Factorization(kind, ranks, _count(layer), _count(new))


def check_settings(rank: Any, ratio: Any, energy: Any, conv_method: str = "svd") -> None:
    """Validate a rank rule: exactly one of ``rank`` (int >= 1), ``ratio`` (0, 1), ``energy`` (0, 1].

    Raises:
        CompressionConfigError: none or several given, or one out of range.
    """
    given = [name for name, value in (("rank", rank), ("ratio", ratio), ("energy", energy)) if value is not None]
    if len(given) != 1:
        raise config_error("rank/ratio/energy", "exactly one of them set", given or None)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise config_error("rank", "an integer >= 1", rank)
    if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1):
        raise config_error("ratio", "a number in (0, 1)", ratio)
    if energy is not None and (not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0 < energy <= 1):
        raise config_error("energy", "a number in (0, 1]", energy)
    if conv_method not in CONV_METHODS:
        raise config_error("conv_method", one_of(CONV_METHODS), conv_method)


def plan(
    model: nn.Module,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    conv_method: str = "svd",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    example: Any = None,
    ranks: Mapping[str, int] | None = None,
) -> tuple[dict[str, tuple[LowRank, Factorization]], dict[str, str]]:
    """Factorise every selected layer of ``model`` that can be and that saves parameters.

    ``ranks`` (``{layer name or pattern: rank}``, see :func:`lightning_compress.core.layers.per_layer`) gives
    layers a rank of their own, in place of the rule; a layer named there is factorised even where the
    default selection leaves it alone (the classifier, a small fan-in), and one that cannot be (attention's
    own ``out_proj``, a shared or frozen weight, a grouped conv, a rank too high, no saving) is an error.

    With an ``example`` input, layers the forward pass never calls (their weight is read directly, as
    torchvision's Swin attention does) are left alone too: a factorised module has no ``weight``.

    The model is not changed: swap the returned modules in (:func:`lightning_compress.core.surgery.swap_modules`,
    or :func:`lightning_compress.callbacks.replace.replace_modules` during a fit).

    Returns:
        ``({name: (new module, factorization)}, {name: why it was left alone})``.

    Raises:
        CompressionConfigError: bad settings, no Linear/Conv2d layer selected, or a ``ranks`` entry that names
            no selected layer or one that cannot take it.
    """
    check_settings(rank, ratio, energy, conv_method)
    layers = {n: m for n, m in select_layers(model, include, exclude).items() if not isinstance(m, LowRank)}
    layers = {n: m for n, m in layers.items() if not any(n.startswith(f"{o}.") for o in _low_rank_names(model))}
    if not layers:
        raise CompressionConfigError(
            f"no Linear/Conv2d layer of {type(model).__name__} selected to factorise "
            f"(include={include}, exclude={exclude})"
        )
    chosen: dict[str, tuple[LowRank, Factorization]] = {}
    skipped: dict[str, str] = {}
    too_high: list[str] = []
    guards = {**attention_internals(model), **shared_weights(model)}
    if example is not None:
        called = analyze(model, example).called
        guards.update({n: "its weight is read without calling it" for n in layers if n not in called})
    fixed = per_layer("ranks", ranks or {}, layers)
    for name, value in fixed.items():
        chosen[name] = _fixed_rank(name, layers[name], value, guards.get(name), conv_method)
    if include is None:
        guards = {**default_skips(model), **guards}
    tried = 0
    for name, layer in layers.items():
        if name in fixed:
            continue
        reason = guards.get(name) or skip_reason(layer)
        tried += reason is None
        if reason is None:
            try:
                new, result = factorize(layer, rank, ratio, energy, conv_method)
            except CompressionConfigError as error:  # a fixed rank too high for this layer
                too_high.append(str(error))
                skipped[name] = f"rank {rank} is not below its smallest dimension"
                continue
            if result.params_after < result.params_before:
                chosen[name] = (new, result)
                continue
            reason = f"no saving at rank {result.ranks} ({result.params_after} >= {result.params_before} parameters)"
        skipped[name] = reason
    if not chosen and too_high and len(too_high) == tried:
        raise CompressionConfigError(f"{too_high[0]} (and every other selected layer)")
    return {name: chosen[name] for name in layers if name in chosen}, skipped


def check_ranks(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Fail early (before training) on a per-layer rank its layer cannot take: a layer that cannot be
    factorised (why is named) or a rank not below its smallest dimension. ``ranks`` holds layer names.

    Raises:
        CompressionConfigError: naming ``ranks['layer']`` and the reason.
    """
    modules = dict(model.named_modules())
    guards = {**attention_internals(model), **shared_weights(model)}
    for name, rank in ranks.items():
        layer = modules.get(name)
        if layer is None:  # created later (an attention's exposed projection)
            continue
        reason = guards.get(name) or skip_reason(layer)
        if reason is not None:
            raise CompressionConfigError(f"`ranks[{name!r}]`: {name!r} cannot be factorised: {reason}")
        if rank >= smallest_dimension(layer) > 1:
            shape = tuple(weight_of(layer).shape)
            raise config_error(f"ranks[{name!r}]", f"< {smallest_dimension(layer)} for {name!r} {shape}", rank)


def _fixed_rank(
    name: str, layer: nn.Module, rank: int, guard: str | None, conv_method: str
) -> tuple[LowRank, Factorization]:
    """``layer`` factorised at the rank ``ranks`` gives it, or the error that says why it cannot be."""
    setting = f"ranks[{name!r}]"
    reason = guard or skip_reason(layer)
    if reason is not None:
        raise CompressionConfigError(f"`{setting}`: {name!r} cannot be factorised: {reason}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise config_error(setting, "an integer >= 1", rank)
    try:
        new, result = factorize(layer, rank=rank, conv_method=conv_method)
    except CompressionConfigError as error:
        why = str(error).strip("`").replace("rank` ", "the rank ", 1)
        raise CompressionConfigError(f"`{setting}`: {why}") from None
    if result.params_after >= result.params_before:
        raise config_error(
            setting, f"a rank that saves parameters ({result.params_after} >= {result.params_before} at {rank})", rank
        )
    return new, result


def attention_to_expose(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, ProjectedAttention]:
    """``{name: ProjectedAttention}`` for the trainable ``nn.MultiheadAttention`` modules whose projections the
    selection reaches (:func:`lightning_compress.core.attention.expose_attention`): the same function with
    ``in_proj`` and ``out_proj`` as called layers, which can be factorised. Swap them in before :func:`plan`."""
    return expose_attention(model, include, exclude, trainable_only=True)


def default_skips(model: nn.Module) -> dict[str, str]:
    """``{name: why}`` of the layers the default selection (no ``include``) leaves alone: the classifier
    (the model's last Conv/Linear: its outputs are the classes) and layers of fan-in below
    :data:`MIN_FAN_IN` (first convolutions: little to save, most sensitive). Naming them in ``include``
    factorises them."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    skips = {
        name: f"fan-in {weight_of(layer)[0].numel()} < {MIN_FAN_IN}: little to save; name it in `include`"
        for name, layer in layers if weight_of(layer)[0].numel() < MIN_FAN_IN
    }  # fmt: skip
    if layers:
        skips[layers[-1][0]] = "the classifier (the last layer): its outputs are the classes; name it in `include`"
    return skips


def _low_rank_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LowRank)]


def describe(new: Any) -> Factorization:
    """The :class:`Factorization` a :class:`LowRank` module stands for (read off its layers' shapes)."""
    first, last = new[0], new[-1]
    bias = 0 if last.bias is None else last.bias.numel()
    ranks: tuple[int, ...]
    if isinstance(first, nn.Linear):
        kind, ranks = "linear", (first.out_features,)
        before = first.in_features * last.out_features + bias
    else:
        spatial = new[1] if len(new) == 3 else first
        kind = "tucker2" if len(new) == 3 else "svd"
        ranks = (new[1].out_channels, first.out_channels) if len(new) == 3 else (first.out_channels,)
        before = first.in_channels * last.out_channels * spatial.weight[0, 0].numel() + bias
    return Factorization(kind, ranks, before, _count(new))


def rebuild(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Recreate, in ``model``, every factorised layer that ``state_dict`` holds (from its keys and shapes).

    An ``nn.MultiheadAttention`` ``name`` with ``name.in_proj.*`` keys becomes a :class:`ProjectedAttention`
    first (its projections were exposed to be factorised). A layer ``name`` that is a Linear/Conv2d in
    ``model`` but has ``name.0.weight`` (or, fake-quantised, ``name.0.parametrizations.weight.original``)
    in the state dict becomes a :class:`LowRank` of the same kind and ranks, ready for ``load_state_dict``.
    Returns ``{name: (old module, new module)}``.
    """
    rebuilt: dict[str, tuple[nn.Module, nn.Module]] = {}
    modules = dict(model.named_modules())
    exposed = {name: ProjectedAttention.from_attention(modules[name]) for name in exposed_names(model, state_dict)}
    if exposed:
        old = swap_modules(model, exposed)
        rebuilt.update({name: (old[name], new) for name, new in exposed.items()})
    layer: Any
    for name, layer in select_layers(model).items():
        shapes = []
        for i in range(3):
            for key in (f"{name}.{i}.weight", f"{name}.{i}.parametrizations.weight.original"):
                if key in state_dict:
                    shapes.append(state_dict[key].shape)
        if len(shapes) < 2:
            continue
        new = _rebuilt_factors(name, cast(nn.Linear | nn.Conv2d, layer), shapes)
        swap_modules(model, {name: new})
        rebuilt[name] = (layer, new)
    return rebuilt


def _rebuilt_factors(name: str, layer: nn.Linear | nn.Conv2d, shapes: list[torch.Size]) -> LowRank:
    """The :class:`LowRank` that factor weights of ``shapes`` in a state dict describe for ``layer``.

    Raises:
        CompressionConfigError: the shapes are not factors of ``layer`` (a crafted or foreign checkpoint).
    """
    out_channels, in_channels = int(layer.weight.shape[0]), int(layer.weight.shape[1])
    ranks = [int(shape[0]) if len(shape) >= 2 else 0 for shape in shapes]
    counts = (2,) if isinstance(layer, nn.Linear) else (2, 3)
    shown = [tuple(shape) for shape in shapes]
    fits = (len(shapes) in counts and all(ranks[:-1]) and all(len(s) == layer.weight.dim() for s in shapes)
            and int(shapes[-1][0]) == out_channels and int(shapes[0][1]) == in_channels)  # fmt: skip
    if fits:
        try:
            if isinstance(layer, nn.Linear):
                return factorize_linear(layer, ranks[0])
            if len(shapes) == 2:
                return factorize_conv_svd(layer, ranks[0])
            return factorize_conv_tucker2(layer, (ranks[1], ranks[0]))
        except (RuntimeError, ValueError, IndexError):
            pass
    raise CompressionConfigError(
        f"the checkpoint's factors of {name!r} ({name}.0.weight ... shapes {shown}) do not factorise its "
        f"{type(layer).__name__} ({out_channels} x {in_channels}): not a checkpoint of this model"
    )
