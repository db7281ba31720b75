"""What one forward pass on a real batch reveals about a model's dataflow, for quantisation.

No tracing of the model's code: module hooks record which module consumed which tensor (by
identity and in-place version), which works for Sequential, ResNet-style and functional-style
models alike. Two questions are answered from it:

- :func:`find_bn_pairs`: which Conv's output feeds a BatchNorm directly (those fold);
- :func:`share_ranges`: which quantised layer's output reaches the next quantised layer only
  through ReLU / MaxPool / Flatten / Identity / Dropout modules, so that one quantisation range
  serves both (one QuantizeLinear/DequantizeLinear per tensor in the exported graph).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.quantization import (
    BN_TYPES,
    OUTPUT_QUANT,
    ActivationFakeQuant,
    ConstantQDQ,
    WeightFakeQuant,
    is_attached,
    quantized_layers,
    weight_quantizer,
)

RANGE_PRESERVING_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip


@dataclass
class _Call:
    """One module call seen by :func:`_module_calls`: what it consumed (and at which in-place version)."""

    name: str
    version: int
    result: Tensor | None = None
    result_version: int = 0


def _module_calls(model: nn.Module, example: Any) -> tuple[dict[int, list[_Call]], dict[str, _Call]]:
    """One eval forward: the leaf-module calls consuming each tensor (by id), and each module's last call.

    A quantised layer counts as a leaf consuming its input before its input quantiser; outputs are
    taken after forward hooks (what the next module really receives). Tensor versions tell an
    unseen in-place change (``out += identity``) from the tensor a module returned.
    """
    consumers: dict[int, list[_Call]] = {}
    last: dict[str, _Call] = {}
    keep: list[Any] = []  # keeps tensors alive so their ids are not reused
    handles = []
    quantisers = (ActivationFakeQuant, WeightFakeQuant, ConstantQDQ)
    for name, module in model.named_modules():
        leaf = next(module.children(), None) is None or is_attached(module)
        if not leaf or isinstance(module, quantisers) or ".parametrizations." in f".{name}.":
            continue

        def before(m: nn.Module, args: tuple[Any, ...], n: str = name) -> None:
            x = args[0] if args else None
            call = _Call(n, x._version if isinstance(x, Tensor) else -1)
            if isinstance(x, Tensor):
                consumers.setdefault(id(x), []).append(call)
                keep.append(x)
            last[n] = call

        def after(m: nn.Module, args: tuple[Any, ...], out: Any, n: str = name) -> None:
            if isinstance(out, Tensor):
                last[n].result, last[n].result_version = out, out._version
                keep.append(out)

        handles.append(module.register_forward_pre_hook(before, prepend=True))
        handles.append(module.register_forward_hook(after))
    _run_eval(model, example, handles)
    return consumers, last


def _run_eval(model: nn.Module, example: Any, handles: list[Any]) -> None:
    was_training = model.training
    args = example if isinstance(example, tuple) else (example,)
    try:
        model.eval()
        # Lightning tests under inference mode; its tensors have no version counter: run normally.
        with torch.inference_mode(False), torch.no_grad():
            model(*(a.clone() if isinstance(a, Tensor) else a for a in args))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def share_ranges(model: nn.Module, example: Any) -> list[str]:
    """Bypass the output quantiser of every layer whose output reaches another quantised layer only
    through ReLU / MaxPool / Flatten / Identity / Dropout modules; return those layers' names.

    Quantisation commutes with those ops, so the next layer's input quantiser covers the tensor:
    the exported graph then has one QuantizeLinear/DequantizeLinear per tensor, which ONNX Runtime
    fuses (ReLU into the quantised Conv, MaxPool in int8) instead of requantising between layers.
    Deterministic for a given model, so training and export agree; a path through functional ops
    or with several consumers keeps its output quantiser.
    """
    layers = quantized_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    consumers, last = _module_calls(model, example)
    shared = []
    for name, layer in layers.items():
        produced = last.get(names[id(weight_quantizer(layer).bn or layer)])
        tensor, version = (produced.result, produced.result_version) if produced else (None, 0)
        followed: set[int] = set()
        while tensor is not None:
            calls = [c for c in consumers.get(id(tensor), []) if c.version == version and id(c) not in followed]
            in_place = [c for c in calls if c.result is tensor and isinstance(modules[c.name], RANGE_PRESERVING_TYPES)]
            if len(in_place) == 1:  # an in-place ReLU (one version later) or an Identity (the same tensor) goes on
                followed.add(id(in_place[0]))
                version = in_place[0].result_version
                continue
            if len(calls) != 1:
                break
            call = calls[0]
            if call.name in layers:
                getattr(layer, OUTPUT_QUANT).bypass = True
                shared.append(name)
                break
            in_range = isinstance(modules[call.name], RANGE_PRESERVING_TYPES)
            tensor, version = (call.result, call.result_version) if in_range else (None, 0)
    return shared


def find_bn_pairs(model: nn.Module, layers: Mapping[str, nn.Module], example: Any) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` for every layer whose output feeds a BatchNorm directly.

    Read off the same module calls as :func:`share_ranges` (one eval forward of ``example``): a
    BatchNorm that consumed exactly the tensor a layer returned, unchanged in place, pairs with it.
    """
    consumers, last = _module_calls(model, example)
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for name in layers:
        produced = last.get(name)
        if produced is None or produced.result is None:
            continue
        for call in consumers.get(id(produced.result), []):
            if call.version == produced.result_version and isinstance(modules[call.name], BN_TYPES):
                pairs[name] = call.name
                break
    return pairs
