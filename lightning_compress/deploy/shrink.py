"""Physical channel removal: turn all-zero output channels into a smaller model.

No Lightning here. Torch-Pruning's dependency graph finds every layer coupled to a pruned channel
(the following BatchNorm, the next layer's inputs, the other branch of a residual add), so
``resnet18`` shrinks consistently. A channel is removed only where it is zero in *every* coupled
layer that produces it; where the graph cannot be traced the model is left as it is and the
reason is returned.

The dependency graph is traced once per call (:func:`lightning_compress.core.graph.dependency_graph`).

Example::

    smaller, info = remove_zero_channels(float_copy(model), example_input, inplace=True)
    info["removed_channels"], info["params_after"]
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.distillation import logits_of
from lightning_compress.core.graph import (
    TRACE_SECONDS,
    dependency_graph,
    is_depthwise,
    is_grouped,
    prune_out_fn,
    time_limit,
)
from lightning_compress.core.layers import select_layers, weight_of


def zero_channels(layer: nn.Module) -> list[int]:
    """Output channels of a Conv/Linear layer whose weights (and bias) are all exactly zero."""
    dead = weight_of(layer).detach().flatten(1).abs().sum(1) == 0
    bias = getattr(layer, "bias", None)
    if bias is not None:
        dead &= bias.detach() == 0
    return dead.nonzero().flatten().tolist()


def remove_zero_channels(
    model: nn.Module, example_input: Tensor, keep: list[str] | None = None, round_to: int = 8, inplace: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove every output channel that is zero wherever it is produced, in a copy of ``model`` (or in
    ``model`` itself with ``inplace``).

    Args:
        model: a float model with masks folded (see :func:`lightning_compress.deploy.onnx.float_copy`).
        example_input: a batch to trace the graph with.
        keep: layer names whose outputs must keep their size; default the last Conv/Linear layer
            (its outputs are the classes).
        round_to: leave each layer of at least ``8 * round_to`` channels a multiple of this many
            (some zero channels stay): ONNX Runtime's CPU kernels run counts like 53 much slower than 56.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        ``(smaller model, info)``; ``info`` has ``removed_channels`` per layer (the layer whose group
        was pruned), ``removed_indices`` (every layer whose output channels went, with their indices
        in the original numbering), ``params_before``, ``params_after``, ``traced`` and, when the
        graph could not be traced or the smaller model would not compute the same function, ``reason``
        (the returned model is then unchanged, except with ``inplace``, where ``intact`` is then ``False``
        and the caller must take a fresh copy).
    """
    original = model
    model = (model if inplace else copy.deepcopy(model)).eval()
    with torch.no_grad():
        reference = logits_of(model(example_input), "model")
    layers = select_layers(model)
    keep = list(keep) if keep is not None else list(layers)[-1:]
    before = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {
        "params_before": before, "params_after": before, "removed_channels": {}, "removed_indices": {}, "traced": True,
        "intact": True,
    }  # fmt: skip
    try:
        with time_limit(TRACE_SECONDS, "Torch-Pruning's trace"):
            graph = dependency_graph(model, example_input)
    except Exception as error:  # custom ops, data-dependent control flow, unbounded or slow: keep the masks
        info.update(traced=False, reason=f"Torch-Pruning could not trace the model: {type(error).__name__}: {error}")
        return model, info
    try:
        with time_limit(TRACE_SECONDS, "removing the zero channels"):
            _remove(model, graph, layers, keep, round_to, info)
        problem = _changed(model, example_input, reference) if info["removed_channels"] else None
    except Exception as error:  # Torch-Pruning failed half way (index bounds in grouped convs) or took too long
        problem = f"Torch-Pruning failed: {type(error).__name__}: {str(error)[:200]}"
    info["params_after"] = sum(p.numel() for p in model.parameters())
    if problem is not None:  # the dependency graph missed a coupling (grouped convs, channel shuffles)
        reason = f"removing the zero channels changed the model ({problem}); the masks are kept instead"
        info.update(traced=False, reason=reason, removed_channels={}, removed_indices={}, params_after=before)
        if inplace:
            info["intact"] = False  # `model` is changed: the caller takes a fresh copy
        else:
            model = copy.deepcopy(original).eval()
    return model, info


def _remove(
    model: nn.Module, graph: Any, layers: dict[str, nn.Module], keep: list[str], round_to: int, info: dict[str, Any]
) -> None:
    names = {id(m): n for n, m in layers.items()}
    for name, layer in layers.items():
        if name in keep or is_depthwise(layer) or layer not in graph.module2node:  # it goes with its input
            continue
        idxs = set(zero_channels(layer))
        group = graph.get_pruning_group(layer, prune_out_fn(layer), idxs=sorted(idxs)) if idxs else None
        while idxs and group is not None:  # shrink to channels zero in every coupled producer
            coupled = set(idxs)
            for dep, dep_idxs in group:
                target = dep.target.module
                if id(target) in names and getattr(dep.handler, "__name__", "") == "prune_out_channels":
                    if names[id(target)] in keep:
                        coupled = set()
                    elif target is not layer:
                        coupled &= set(zero_channels(target)) & {int(i) for i in dep_idxs}
            if coupled == idxs:
                break
            idxs = coupled
            group = graph.get_pruning_group(layer, prune_out_fn(layer), idxs=sorted(idxs)) if idxs else None
        wide = _out_channels(layer) >= 8 * round_to  # narrow layers are cheap either way
        excess = (_out_channels(layer) - len(idxs)) % round_to if idxs and wide else 0
        if excess and len(idxs) > round_to - excess:
            idxs = set(sorted(idxs)[: len(idxs) - (round_to - excess)])
            group = graph.get_pruning_group(layer, prune_out_fn(layer), idxs=sorted(idxs)) if idxs else None
        elif excess:
            idxs = set()
        while idxs and group is not None:  # grouped convs reached: every one of their groups loses as many
            even = _even(group, idxs)
            if even == idxs:
                break
            idxs = even
            group = graph.get_pruning_group(layer, prune_out_fn(layer), idxs=sorted(idxs)) if idxs else None
        if idxs and group is not None and graph.check_pruning_group(group):
            for dep, dep_idxs in group:  # every producer whose outputs go, in its current numbering
                target = names.get(id(dep.target.module))
                if target is not None and getattr(dep.handler, "__name__", "") == "prune_out_channels":
                    _record(info["removed_indices"], target, [int(i) for i in dep_idxs])
            _prune(group)
            info["removed_channels"][name] = len(idxs)


def _even(group: Any, idxs: set[int]) -> set[int]:
    """The channels of ``idxs`` (the root layer's) that can go with every grouped convolution in ``group``
    keeping equal groups: in each, as many leave every group as leave the group that loses fewest."""
    even = set(idxs)
    for item in group:
        conv, handler = item.dep.target.module, getattr(item.dep.handler, "__name__", "")
        if not is_grouped(conv):
            continue
        size = (conv.in_channels if handler == "prune_in_channels" else conv.out_channels) // conv.groups
        by_group: dict[int, list[int]] = {g: [] for g in range(conv.groups)}
        for root, index in zip(item.root_idxs, item.idxs, strict=True):
            by_group[int(index) // size].append(int(root))
        fewest = min(len(members) for members in by_group.values())
        even &= {root for members in by_group.values() for root in sorted(members)[:fewest]}
    return even


def _prune(group: Any) -> None:
    """Torch-Pruning's ``group.prune()``, except for the inputs of grouped convolutions, whose weights it
    slices as if every group lost the same positions (:func:`_prune_grouped_inputs` does it per group)."""
    items = list(group)
    grouped = [i for i in items if is_grouped(i.dep.target.module) and i.dep.handler.__name__ == "prune_in_channels"]
    if not grouped:
        group.prune()
        return
    for dep, dep_idxs in items:
        if any(dep is item.dep for item in grouped):
            _prune_grouped_inputs(dep.target.module, [int(i) for i in dep_idxs])
        elif isinstance(dep.target.module, nn.Parameter):
            raise RuntimeError("a pruning group with a bare parameter and a grouped convolution is not supported")
        else:
            dep(dep_idxs)


def _prune_grouped_inputs(conv: nn.modules.conv._ConvNd, idxs: list[int]) -> None:
    """Remove input channels ``idxs`` (the same number from each group) of a grouped convolution."""
    per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    gone = set(idxs)
    rows = []
    for g in range(conv.groups):
        kept = [i - g * per_in for i in range(g * per_in, (g + 1) * per_in) if i not in gone]
        rows.append(conv.weight.data[g * per_out : (g + 1) * per_out][:, kept])
    conv.weight = nn.Parameter(torch.cat(rows), requires_grad=bool(conv.weight.requires_grad))
    conv.in_channels -= len(gone)


def _changed(model: nn.Module, example_input: Tensor, reference: Tensor) -> str | None:
    """Why the smaller model is not the same function, or ``None``: it must run and match within 1e-4 relative."""
    try:
        with torch.no_grad():
            output = logits_of(model(example_input), "model")
    except Exception as error:  # a shape mismatch left behind
        return f"it fails: {type(error).__name__}: {str(error)[:200]}"
    if output.shape != reference.shape:
        return f"its output shape is {tuple(output.shape)}, not {tuple(reference.shape)}"
    diff = float((output - reference).abs().max())
    if diff > 1e-4 * max(1.0, float(reference.abs().max())):
        return f"its outputs differ by up to {diff:.3g}"
    return None


def _record(removed: dict[str, list[int]], name: str, idxs: list[int]) -> None:
    """Add ``idxs`` (numbered after the earlier removals) to ``removed[name]`` in the original numbering."""
    earlier = sorted(removed.get(name, []))
    original = []
    for index in sorted(idxs):
        for gone in earlier:  # each earlier removal below this index shifted it down by one
            if gone <= index:
                index += 1
        original.append(index)
    removed[name] = sorted({*earlier, *original})


def kept_channels(channels: int, removed: list[int]) -> list[int]:
    """The original indices of the output channels left after removing ``removed`` of ``channels``."""
    gone = set(removed)
    return [i for i in range(channels) if i not in gone]


def _out_channels(layer: nn.Module) -> int:
    return int(weight_of(layer).shape[0])


def max_abs_diff(a: nn.Module, b: nn.Module, batch: Tensor) -> float:
    """The largest absolute difference between two models' outputs on ``batch`` (eval, no grad)."""
    with torch.no_grad():
        return float((a.eval()(batch) - b.eval()(batch)).abs().max())
