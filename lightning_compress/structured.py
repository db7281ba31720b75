"""Physical channel removal: turn all-zero output channels into a smaller model.

No Lightning here. Torch-Pruning's dependency graph finds every layer coupled to a pruned channel
(the following BatchNorm, the next layer's inputs, the other branch of a residual add), so
``resnet18`` shrinks consistently. A channel is removed only where it is zero in *every* coupled
layer that produces it; where the graph cannot be traced the model is left as it is and the
reason is returned.

Example::

    smaller, info = remove_zero_channels(float_copy(model), example_input)
    info["removed_channels"], info["params_after"]
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.pruning import select_layers, weight_of


def zero_channels(layer: nn.Module) -> list[int]:
    """Output channels of a Conv/Linear layer whose weights (and bias) are all exactly zero."""
    dead = weight_of(layer).detach().flatten(1).abs().sum(1) == 0
    bias = getattr(layer, "bias", None)
    if bias is not None:
        dead &= bias.detach() == 0
    return dead.nonzero().flatten().tolist()


def _prune_fn(layer: nn.Module) -> Any:
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


def remove_zero_channels(
    model: nn.Module, example_input: Tensor, keep: list[str] | None = None, round_to: int = 8
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove, in a copy of ``model``, every output channel that is zero wherever it is produced.

    Args:
        model: a float model with masks folded (see :func:`lightning_compress.export.float_copy`).
        example_input: a batch to trace the graph with.
        keep: layer names whose outputs must keep their size; default the last Conv/Linear layer
            (its outputs are the classes).
        round_to: leave each layer of at least ``8 * round_to`` channels a multiple of this many
            (some zero channels stay): ONNX Runtime's CPU kernels run counts like 53 much slower than 56.

    Returns:
        ``(smaller model, info)``; ``info`` has ``removed_channels`` per layer, ``params_before``,
        ``params_after``, ``traced`` and, when the graph could not be traced, ``reason`` (the
        returned model is then an unchanged copy).
    """
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    layers = select_layers(model)
    keep = list(keep) if keep is not None else list(layers)[-1:]
    before = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {"params_before": before, "params_after": before, "removed_channels": {}, "traced": True}
    try:
        with warnings.catch_warnings(), torch.enable_grad():  # the graph is traced through autograd
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception as error:  # custom ops, data-dependent control flow: keep the masks
        info.update(traced=False, reason=f"Torch-Pruning could not trace the model: {type(error).__name__}: {error}")
        return model, info
    names = {id(m): n for n, m in layers.items()}
    for name, layer in layers.items():
        if name in keep or (isinstance(layer, nn.Conv2d) and layer.groups != 1) or layer not in graph.module2node:
            continue
        idxs = set(zero_channels(layer))
        group = graph.get_pruning_group(layer, _prune_fn(layer), idxs=sorted(idxs)) if idxs else None
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
            group = graph.get_pruning_group(layer, _prune_fn(layer), idxs=sorted(idxs)) if idxs else None
        wide = _out_channels(layer) >= 8 * round_to  # narrow layers are cheap either way
        excess = (_out_channels(layer) - len(idxs)) % round_to if idxs and wide else 0
        if excess and len(idxs) > round_to - excess:
            idxs = set(sorted(idxs)[: len(idxs) - (round_to - excess)])
            group = graph.get_pruning_group(layer, _prune_fn(layer), idxs=sorted(idxs)) if idxs else None
        elif excess:
            idxs = set()
        if idxs and group is not None and graph.check_pruning_group(group):
            group.prune()
            info["removed_channels"][name] = len(idxs)
    info["params_after"] = sum(p.numel() for p in model.parameters())
    return model, info


def coupled_layers(model: nn.Module, layers: Mapping[str, nn.Module], example_input: Tensor) -> list[list[str]]:
    """Groups of ``layers`` whose output channels are one set (they feed the same residual add).

    Found with Torch-Pruning's dependency graph; a model it cannot trace has no groups (each layer
    is then pruned on its own).
    """
    import torch_pruning as tp

    was_training = model.training
    try:
        with warnings.catch_warnings():  # (Torch-Pruning traces the autograd graph: no no_grad here)
            warnings.simplefilter("ignore")
            model.eval()  # tracing runs a forward: BatchNorm statistics must not move
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception:  # untraceable: no coupling known
        return []
    finally:
        model.train(was_training)
    names = {id(m): n for n, m in layers.items()}
    parent = {n: n for n in layers}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for name, layer in layers.items():
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            continue
        if layer not in graph.module2node:  # not used by forward
            continue
        group = graph.get_pruning_group(layer, _prune_fn(layer), idxs=[0])
        for dep, _ in group:
            other = names.get(id(dep.target.module))
            if other is not None and other != name and getattr(dep.handler, "__name__", "") == "prune_out_channels":
                parent[root(other)] = root(name)
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(root(name), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _out_channels(layer: nn.Module) -> int:
    return int(weight_of(layer).shape[0])


def max_abs_diff(a: nn.Module, b: nn.Module, batch: Tensor) -> float:
    """The largest absolute difference between two models' outputs on ``batch`` (eval, no grad)."""
    with torch.no_grad():
        return float((a.eval()(batch) - b.eval()(batch)).abs().max())
