"""Attaching fake quantisation to a model, in place, without replacing any ``forward``.

What :func:`attach` puts on every selected Conv/Linear layer:

- a weight parametrization (:class:`~lightning_compress.core.quantization.fake_quant.WeightFakeQuant`),
  which folds the following BatchNorm once :func:`link_batchnorms` pairs them;
- an input and an output :class:`~lightning_compress.core.quantization.fake_quant.ActivationFakeQuant`,
  run by a forward pre-hook and a forward hook (on the following BatchNorm when the layer is
  folded), so the exported graph has a quantised input and output around every Conv/Linear, which
  ONNX Runtime fuses into integer kernels.

Everything is attached disabled; :func:`enable` turns it on (the callback does at ``start_epoch``),
so checkpoints have the same keys before and during QAT. :func:`share_ranges` lets one range serve
a layer's output and the next layer's input where the model analysis says they are one tensor, and
:func:`quantize_sums` quantises the residual sums (``x + f(x)``) of two quantised tensors that a block
computes in its own ``forward``, so ONNX Runtime adds them in int8 too, and :func:`share_inputs` lets a layer
whose input is already quantised (a sum, or a layer output that also goes elsewhere) read it as it is.
:func:`move_to_tails` quantises a layer's output after the ReLU / pooling modules that follow it where code
outside the modules reads it next (``F.avg_pool2d`` in a ``forward``), so ONNX Runtime runs them in int8.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    >>> layers = attach(model, QuantConfig(weight_bits=4))
    >>> enable(model)
    >>> model(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 4, 6, 6])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.core.graph import analyze
from lightning_compress.core.layers import attention_internals, select_layers, weight_of
from lightning_compress.core.quantization.config import QuantConfig, check_weight_bits
from lightning_compress.core.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant
from lightning_compress.errors import CompressionConfigError

INPUT_QUANT = "input_quant"
OUTPUT_QUANT = "output_quant"


def _quantise_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, INPUT_QUANT)(args[0]), *args[1:])


def set_input_quantizer(layer: nn.Module, quantizer: nn.Module) -> None:
    """Make ``quantizer`` (it becomes ``layer``'s ``input_quant`` child) quantise ``layer``'s input."""
    if INPUT_QUANT not in layer._modules:
        layer.register_forward_pre_hook(_quantise_input)
    layer.add_module(INPUT_QUANT, quantizer)


def _quantise_output(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    # The quantiser is the layer's child; a folded BatchNorm holds it in a list (not as a submodule),
    # which deepcopy maps to the copy's own quantiser.
    return cast(Tensor, module.__dict__[_OUTPUT_QUANT_REF][0](output))


_OUTPUT_QUANT_REF = "_lc_output_quant"


def set_output_quantizer(layer: nn.Module, owner: nn.Module, quantizer: nn.Module) -> None:
    """Make ``quantizer`` (a child of ``layer``) quantise the output of ``owner`` (``layer`` or its BatchNorm)."""
    layer.add_module(OUTPUT_QUANT, quantizer)
    if _OUTPUT_QUANT_REF not in owner.__dict__:
        owner.register_forward_hook(_quantise_output)
    owner.__dict__[_OUTPUT_QUANT_REF] = [quantizer]


SUM_QUANT = "sum_quant"


def _quantise_sum(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    return cast(Tensor, getattr(module, SUM_QUANT)(output))


def set_sum_quantizer(module: nn.Module, quantizer: nn.Module) -> None:
    """Make ``quantizer`` (it becomes ``module``'s ``sum_quant`` child) quantise ``module``'s output."""
    if SUM_QUANT not in module._modules:
        module.register_forward_hook(_quantise_sum)
    module.add_module(SUM_QUANT, quantizer)


def quantized_sums(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` whose output (a residual sum) :func:`quantize_sums` quantises."""
    return {name: m for name, m in model.named_modules() if isinstance(m._modules.get(SUM_QUANT), ActivationFakeQuant)}


_SUM_HOOK = "_lc_sum_restore"


def _restore_sum_quantizers(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """A load-state-dict pre-hook: a checkpoint holding ``<module>.sum_quant.*`` (written after
    :func:`quantize_sums`, which needs a batch) gets those quantisers back before its values load."""
    suffix = f"{SUM_QUANT}.min_val"
    template = _activation_template(module)
    for key in state_dict:
        if not (key.startswith(prefix) and key.endswith(suffix)) or template is None:
            continue
        name = key[len(prefix) : -len(suffix)].rstrip(".")
        try:
            target = module.get_submodule(name)
        except AttributeError:  # not this model's: the strict load names the key
            continue
        if SUM_QUANT not in target._modules:
            set_sum_quantizer(target, ActivationFakeQuant(template.bits, template.observer, template.ema_decay))


def _activation_template(model: nn.Module) -> ActivationFakeQuant | None:
    """An input quantiser of a quantised layer that is not kept in float (whose settings and phase a new
    activation quantiser takes), or ``None``."""
    layers = list(quantized_layers(model).values())
    live = [layer for layer in layers if not getattr(layer, UNREACHABLE, False)] or layers
    return cast(ActivationFakeQuant, getattr(live[0], INPUT_QUANT)) if live else None


def attach(
    model: nn.Module,
    config: QuantConfig | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    bn_pairs: Mapping[str, str] | None = None,
) -> dict[str, nn.Module]:
    """Attach (disabled) fake quantisation to the selected Conv/Linear layers of ``model``, in place.

    Args:
        model: the model.
        config: bits, granularity and observer.
        include: module-name patterns to quantise (default every Conv and Linear layer).
        exclude: module-name patterns to leave in float.
        bn_pairs: ``{layer: batchnorm}`` to fold (see :func:`find_bn_pairs`); ``None`` folds nothing
            now (:func:`link_batchnorms` can fold later, e.g. once a real batch is at hand).

    Returns:
        ``{name: layer}`` of the quantised layers (never the ``out_proj`` of an ``nn.MultiheadAttention``,
        which reads its weight without calling it: see
        :func:`~lightning_compress.core.layers.attention_internals`). Idempotent.

    Raises:
        CompressionConfigError: no layer selected.
    """
    config = config or QuantConfig()
    inside_attention = attention_internals(model)  # attention reads their weight without calling them
    layers = {n: m for n, m in select_layers(model, include, exclude).items() if n not in inside_attention}
    if not layers:
        raise CompressionConfigError(
            f"nothing to quantise in {type(model).__name__}: no Conv/Linear layer selected "
            f"(include={include}, exclude={exclude})"
        )
    for layer in layers.values():
        if is_attached(layer):  # e.g. restored from a calibration: observe from now on as this config says
            for attr in (INPUT_QUANT, OUTPUT_QUANT):
                quantizer = getattr(layer, attr)
                quantizer.observer, quantizer.ema_decay = config.observer, config.ema_decay
            continue
        learned = config.scales == "learned"
        channels = int(weight_of(layer).shape[0])
        weight_quant = WeightFakeQuant(config.weight_bits, config.per_channel, learned, channels)
        parametrize.register_parametrization(layer, "weight", weight_quant)
        for attr in (INPUT_QUANT, OUTPUT_QUANT):
            quantizer = ActivationFakeQuant(config.activation_bits, config.observer, config.ema_decay, learned)
            if attr == INPUT_QUANT:
                set_input_quantizer(layer, quantizer)
            else:
                set_output_quantizer(layer, layer, quantizer)
    if config.fold_bn and bn_pairs:
        link_batchnorms(model, bn_pairs)
    if _SUM_HOOK not in model.__dict__:
        model.register_load_state_dict_pre_hook(_restore_sum_quantizers)
        model.__dict__[_SUM_HOOK] = True
    return layers


def link_batchnorms(model: nn.Module, bn_pairs: Mapping[str, str]) -> int:
    """Fold each paired BatchNorm into its layer's weight quantisation (see :func:`find_bn_pairs`).

    The layer's output quantisation moves behind the BatchNorm: after folding, that is the deployed
    layer's output. Only convolutions are folded. Returns how many pairs were linked.
    """
    modules = dict(model.named_modules())
    linked = 0
    for layer_name, bn_name in bn_pairs.items():
        layer, bn = modules[layer_name], modules[bn_name]
        if not is_attached(layer) or not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        quant = weight_quantizer(layer)
        if quant.bn is bn:
            continue
        quant._bn[:] = [bn]
        _remove_hooks(layer._forward_hooks, _quantise_output)
        layer.__dict__.pop(_OUTPUT_QUANT_REF, None)
        set_output_quantizer(layer, bn, getattr(layer, OUTPUT_QUANT))
        linked += 1
    return linked


def shared_range_layers(model: nn.Module, example: Any) -> list[str]:
    """The quantised layers whose output reaches another quantised layer only through ReLU / ReLU6 / MaxPool /
    Flatten / Identity / Dropout modules (read off the model's cached analysis, see
    :mod:`lightning_compress.core.graph`): the next layer's input range can serve their output.

    Deterministic for a given model, so training and export agree; a path through functional ops
    or with several consumers keeps its output quantiser.
    """
    graph = analyze(model, example)
    layers = quantized_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    starts = {name: names[id(weight_quantizer(layer).bn or layer)] for name, layer in layers.items()}
    return [name for name, start in starts.items() if graph.reaches.get(start) in layers]


def share_ranges(model: nn.Module, example: Any) -> list[str]:
    """Bypass the output quantiser of every layer :func:`shared_range_layers` names; return those names.

    Quantisation commutes with those ops, so the next layer's input quantiser covers the tensor:
    the exported graph then has one QuantizeLinear/DequantizeLinear per tensor, which ONNX Runtime
    fuses (ReLU into the quantised Conv, MaxPool in int8) instead of requantising between layers.
    """
    shared = shared_range_layers(model, example)
    for name, layer in quantized_layers(model).items():  # again after a change (a plan keeping layers in float)
        getattr(layer, OUTPUT_QUANT).bypass = name in shared
    return shared


def _output_owners(model: nn.Module, example: Any) -> dict[str, str]:
    """``{layer: module}``: for each quantised layer not kept in float, the module whose output its output
    quantiser quantises (the layer, the BatchNorm folded into it, or the end of its tail: :func:`tail_modules`)."""
    names = {id(m): n for n, m in model.named_modules()}
    owners = {
        name: names[id(weight_quantizer(layer).bn or layer)]
        for name, layer in quantized_layers(model).items() if not getattr(layer, UNREACHABLE, False)
    }  # fmt: skip
    return {**owners, **tail_modules(model, example)}


def tail_modules(model: nn.Module, example: Any) -> dict[str, str]:
    """``{layer: module}``: the quantised layers (not kept in float) whose output passes range-preserving
    modules (ReLU, MaxPool, Flatten, ...) and then code outside the modules (:attr:`ModelGraph.tails
    <lightning_compress.core.graph.ModelGraph.tails>`, as ``F.avg_pool2d`` after a ``features`` block), with
    the last of those modules: their output is quantised there. Deterministic for a given model, like
    :func:`shared_range_layers`."""
    graph = analyze(model, example)
    names = {id(m): n for n, m in model.named_modules()}
    tails = {}
    for name, layer in quantized_layers(model).items():
        start = names[id(weight_quantizer(layer).bn or layer)]
        if start in graph.tails and not getattr(layer, UNREACHABLE, False):
            tails[name] = graph.tails[start]
    return tails


def _hook_output(model: nn.Module, layer: nn.Module, owner: nn.Module) -> None:
    """Make ``layer``'s output quantiser quantise ``owner``'s output, and no other module's."""
    quantizer = getattr(layer, OUTPUT_QUANT)
    for module in model.modules():
        held = module.__dict__.get(_OUTPUT_QUANT_REF)
        if module is not owner and held is not None and held[0] is quantizer:
            _remove_hooks(module._forward_hooks, _quantise_output)
            del module.__dict__[_OUTPUT_QUANT_REF]
    set_output_quantizer(layer, owner, quantizer)


def move_to_tails(model: nn.Module, example: Any) -> dict[str, str]:
    """Quantise the output of every layer :func:`tail_modules` names at the end of its tail (and every other
    layer's where it was: at the layer, or at its folded BatchNorm); return ``{layer: module}`` of the moved.

    The same numbers in PyTorch (those modules commute with quantisation on a grid that holds 0, and a range
    observed after a ReLU starts at 0), but the exported graph reads ``Conv -> Relu -> MaxPool -> Q``, which ONNX
    Runtime runs as one int8 convolution (the ReLU fused) and an int8 max-pool, where a Q right after the conv,
    on a range that holds its negative outputs, left the ReLU and the pooling in float behind a dequantise.
    Call it before the ranges are observed (:func:`share_ranges` and it, then :func:`quantize_sums`)."""
    tails = tail_modules(model, example)
    for name, layer in quantized_layers(model).items():
        target = model.get_submodule(tails[name]) if name in tails else weight_quantizer(layer).bn or layer
        _hook_output(model, layer, target)
    return tails


def sum_modules(model: nn.Module, example: Any) -> list[str]:
    """The modules whose output is a residual sum (:attr:`~lightning_compress.core.graph.ModelGraph.sums`) of two
    tensors that are each a quantised layer's output or such a sum: summing them in int8 costs nothing more
    (ONNX Runtime's ``QLinearAdd``), while a float sum between them costs a dequantise and a quantise.
    Deterministic for a given model, like :func:`shared_range_layers`."""
    graph = analyze(model, example)
    quantised = set(_output_owners(model, example).values())
    chosen: list[str] = []
    for name, total in graph.sums.items():  # in call order: a sum of sums follows them
        if all(set(operand) & (quantised | set(chosen)) for operand in total.operands):
            chosen.append(name)
    return chosen


def quantize_sums(model: nn.Module, example: Any) -> list[str]:
    """Quantise the output of every module :func:`sum_modules` names (an activation quantiser as the layers
    have, in their phase, attached once; one attached before to a sum no longer named is removed); return
    those modules' names.

    A block such as MobileNetV2's ``x + conv(x)`` then sums two int8 tensors into one, which ONNX Runtime runs
    as ``QLinearAdd``; :func:`share_inputs` then lets the next layer read that tensor without quantising it again.
    """
    template = _activation_template(model)
    if template is None:
        return []
    chosen = sum_modules(model, example)
    for name, module in quantized_sums(model).items():  # a summand now left in float: the sum is float again
        if name not in chosen:
            _remove_hooks(module._forward_hooks, _quantise_sum)
            delattr(module, SUM_QUANT)
    for name in chosen:
        module = model.get_submodule(name)
        if SUM_QUANT not in module._modules:
            quantizer = ActivationFakeQuant(template.bits, template.observer, template.ema_decay)
            quantizer.set_flag("enabled", template.flag("enabled"))
            quantizer.set_flag("observing", template.flag("observing"))
            set_sum_quantizer(module, quantizer.to(cast(Tensor, template.min_val).device))
    return chosen


def covered_inputs(model: nn.Module, example: Any) -> list[str]:
    """The quantised layers whose input is already a quantised tensor: exactly the output of a quantised layer
    that keeps its output quantiser (not one :func:`shared_range_layers` names) or of a quantised sum
    (:func:`quantize_sums` attached its quantiser). Their own input quantiser would quantise it a second time
    (ONNX Runtime then merges the two pairs its own way, a few steps off the model where the ranges differ)."""
    graph, layers = analyze(model, example), quantized_layers(model)
    shared = set(shared_range_layers(model, example))
    owners = {owner for name, owner in _output_owners(model, example).items() if name not in shared}
    quantised = owners | set(quantized_sums(model))
    return sorted(name for name in layers if set(graph.inputs.get(name, ())) & quantised)


def share_inputs(model: nn.Module, example: Any) -> list[str]:
    """Bypass the input quantiser of every layer :func:`covered_inputs` names (after :func:`share_ranges` and
    :func:`quantize_sums`); return those names."""
    covered = covered_inputs(model, example)
    for name, layer in quantized_layers(model).items():
        getattr(layer, INPUT_QUANT).bypass = name in covered
    return covered


def _activation_quantizers(model: nn.Module) -> list[ActivationFakeQuant]:
    """Every activation quantiser of ``model``'s layers and sums."""
    found = [getattr(m, a) for m in quantized_layers(model).values() for a in (INPUT_QUANT, OUTPUT_QUANT)]
    return found + [getattr(m, SUM_QUANT) for m in quantized_sums(model).values()]


def sync_observers(model: nn.Module) -> None:
    """Under ``torch.distributed``, give every rank the union of all ranks' observed ranges (one all-reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    observers = _activation_quantizers(model)
    if not observers or torch.distributed.get_world_size() < 2:
        return
    lows, highs = [cast(Tensor, o.min_val) for o in observers], [cast(Tensor, o.max_val) for o in observers]
    bounds = torch.stack([torch.stack([-low, high]) for low, high in zip(lows, highs, strict=True)])
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    for low, high, (neg_min, max_val) in zip(lows, highs, bounds, strict=True):
        low.copy_(-neg_min)
        high.copy_(max_val)
    for observer in observers:  # another rank's range may have set one this rank has not seen yet
        if not observer.initialised:  # (a Python flag: no device read once every range is set)
            observer.refresh()


def is_attached(layer: nn.Module) -> bool:
    """Whether ``layer`` carries this module's fake quantisation."""
    return isinstance(getattr(layer, INPUT_QUANT, None), ActivationFakeQuant)


def weight_quantizer(layer: nn.Module) -> WeightFakeQuant:
    """The :class:`WeightFakeQuant` parametrizing ``layer.weight``."""
    return cast(WeightFakeQuant, layer.parametrizations.weight[0])  # type: ignore[union-attr,index]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer of ``model`` with fake quantisation attached."""
    return {name: m for name, m in model.named_modules() if is_attached(m)}


def set_weight_bits(model: nn.Module, bits: Mapping[str, int]) -> None:
    """Give the named fake-quantised layers weight bit-widths of their own (mixed precision), in place.

    Args:
        bits: ``{layer name: bits}``, 2-8 each; layers of ``model`` that are not (or no longer) quantised
            are skipped.

    Raises:
        CompressionConfigError: a bit-width out of range, naming the layer.
    """
    layers = quantized_layers(model)
    for name, value in bits.items():
        check_weight_bits(f"layer_bits[{name!r}]", value)
        if name in layers:
            weight_quantizer(layers[name]).bits = int(value)


def weight_bits(model: nn.Module) -> dict[str, int]:
    """``{layer name: weight bits}`` of every fake-quantised layer of ``model``."""
    return {name: int(weight_quantizer(layer).bits) for name, layer in quantized_layers(model).items()}


def _layer_quantizers(layer: nn.Module) -> Iterator[WeightFakeQuant | ActivationFakeQuant]:
    yield weight_quantizer(layer)
    yield getattr(layer, INPUT_QUANT)
    yield getattr(layer, OUTPUT_QUANT)


def _remove_hooks(hooks: dict[int, Any], fn: Any) -> None:
    for key in [k for k, hook in hooks.items() if hook is fn]:
        del hooks[key]


def unparametrize_weight(layer: nn.Module, value: Tensor | None = None) -> None:
    """Make ``layer.weight`` a plain parameter again (``value``, default the stored original).

    Unlike ``torch.nn.utils.parametrize.remove_parametrizations`` this touches this instance only:
    deep copies of a parametrized module share its generated class, and removing the property
    from that class would break every copy.
    """
    original = cast(Tensor, layer.parametrizations.weight.original)  # type: ignore[union-attr]
    layer.__class__ = layer.__class__.__bases__[0]
    del layer._modules["parametrizations"]
    layer.weight = nn.Parameter((original if value is None else value).detach().clone())


def strip(model: nn.Module) -> nn.Module:
    """Remove all fake quantisation from ``model`` in place: plain float layers, original state-dict keys."""
    for module in model.modules():  # the output quantisers' hooks: on the layers, BatchNorms, tails
        if module.__dict__.pop(_OUTPUT_QUANT_REF, None) is not None:
            _remove_hooks(module._forward_hooks, _quantise_output)
    for layer in quantized_layers(model).values():
        unparametrize_weight(layer)
        _remove_hooks(layer._forward_pre_hooks, _quantise_input)
        for attr in (INPUT_QUANT, OUTPUT_QUANT):
            delattr(layer, attr)
    for module in quantized_sums(model).values():
        _remove_hooks(module._forward_hooks, _quantise_sum)
        delattr(module, SUM_QUANT)
    return model


def enable(model: nn.Module, on: bool = True) -> None:
    """Turn fake quantisation on (or off) everywhere in ``model`` (layers marked unreachable stay off)."""
    for layer in quantized_layers(model).values():
        for quantizer in _layer_quantizers(layer):
            quantizer.set_flag("enabled", on and not getattr(layer, UNREACHABLE, False))
    for module in quantized_sums(model).values():
        getattr(module, SUM_QUANT).set_flag("enabled", on)


UNREACHABLE = "_lc_unreachable"


def leave_uncalled_in_float(model: nn.Module, example: Any) -> list[str]:
    """Switch off, for good, the fake quantisation of every quantised layer the forward pass never calls
    (its weight is read directly, e.g. by torchvision's Swin attention): its input and output can never
    be observed, so it stays in float (also in the int8 export). Returns those layers' names."""
    called = analyze(model, example).called
    uncalled = [name for name in quantized_layers(model) if name not in called]
    for name in uncalled:
        layer = model.get_submodule(name)
        setattr(layer, UNREACHABLE, True)
        for quantizer in _layer_quantizers(layer):
            quantizer.set_flag("enabled", False)
    return uncalled


def keep_in_float(model: nn.Module, names: Sequence[str]) -> None:
    """Switch off, for good, the fake quantisation of the named layers (a plan keeps them in float): they stay
    float in training, where :func:`enable` skips them, and in the int8 export. Unknown names are skipped."""
    layers = quantized_layers(model)
    for name in names:
        if name in layers:
            setattr(layers[name], UNREACHABLE, True)
            for quantizer in _layer_quantizers(layers[name]):
                quantizer.set_flag("enabled", False)


def freeze_observers(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) updating the activation ranges, observed or learned (a frozen learned step size takes
    no gradient)."""
    for quantizer in _activation_quantizers(model):
        quantizer.set_flag("observing", not frozen)
        if quantizer.learned:
            quantizer.scale.requires_grad_(not frozen)


def start_learning(model: nn.Module) -> int:
    """Start every learned step size of ``model`` from its observed value: weights from their current
    (BatchNorm-folded) ``max|w| / qmax``, activations from their observed ranges (calibrate first). Those not
    learned, and activation quantisers that saw nothing (another quantiser covers their tensor), stay observed.
    Returns how many quantisers learn now."""
    started = 0
    for layer in quantized_layers(model).values():
        quant = weight_quantizer(layer)
        if quant.learned and quant.flag("enabled"):
            quant.start_learning()
            started += 1
        for attr in (INPUT_QUANT, OUTPUT_QUANT):
            quantizer = getattr(layer, attr)
            started += quantizer.flag("enabled") and not quantizer.bypass and quantizer.start_learning()
    return started


def learned_scales(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{parameter name: parameter}`` of every learned step size of ``model`` (activations' ``scale``, weights'
    ``ratio`` to ``max|w| / qmax``), whether it trains yet or not."""
    ours = {id(p) for layer in quantized_layers(model).values() for q in _layer_quantizers(layer) if q.learned
            for p in q.parameters(recurse=False)}  # fmt: skip
    return {name: param for name, param in model.named_parameters() if id(param) in ours}


def scale_kinds(layer: nn.Module) -> str:
    """How a quantised layer's scales are set: ``observed``, ``learned`` (weights and activations) or
    ``learned weights`` / ``learned activations`` where only some learn."""
    weight = weight_quantizer(layer).scale_kind == "learned"
    active = [getattr(layer, a) for a in (INPUT_QUANT, OUTPUT_QUANT) if not getattr(layer, a).bypass]
    activations = any(q.scale_kind == "learned" for q in active)
    if weight and activations:
        return "learned"
    return "learned weights" if weight else "learned activations" if activations else "observed"


def folded_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms folded into quantised weights."""
    bns = (weight_quantizer(layer).bn for layer in quantized_layers(model).values())
    return [bn for bn in bns if bn is not None]


def freeze_bn(model: nn.Module) -> None:
    """Put every folded BatchNorm in eval mode: running statistics, no more updates (idempotent)."""
    for bn in folded_batchnorms(model):
        bn.eval()


def observer_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{"<layer>.input_quant": (min, max), ...}`` of every activation observer."""
    ranges = {}
    for name, layer in quantized_layers(model).items():
        for attr in (INPUT_QUANT, OUTPUT_QUANT):
            quant = getattr(layer, attr)
            ranges[f"{name}.{attr}"] = (float(quant.min_val), float(quant.max_val))
    for name, module in quantized_sums(model).items():
        quant = getattr(module, SUM_QUANT)
        ranges[f"{name}.{SUM_QUANT}"] = (float(quant.min_val), float(quant.max_val))
    return ranges


def watch_saturation(model: nn.Module, on: bool = True) -> None:
    """Start (counts reset) or stop counting, in evaluation mode, the activations that clip at their
    observed ranges (:class:`ActivationFakeQuant`'s ``watch``); read with :func:`saturation`."""
    for module in model.modules():
        if isinstance(module, ActivationFakeQuant):
            module.watch = on
            if on:
                cast(Tensor, module.clipped).zero_()
                cast(Tensor, module.seen).zero_()


def saturation(model: nn.Module) -> dict[str, float]:
    """``{"<layer>.output_quant": share}``: the share of each quantised activation's elements outside its
    range, over the evaluation-mode calls since :func:`watch_saturation` (quantisers that saw nothing left
    out). One device-to-host copy for the whole model."""
    named = {
        f"{name}.{attr}": getattr(layer, attr)
        for name, layer in quantized_layers(model).items()
        for attr in (INPUT_QUANT, OUTPUT_QUANT)
    } | {f"{name}.{SUM_QUANT}": getattr(module, SUM_QUANT) for name, module in quantized_sums(model).items()}
    if not named:
        return {}
    device = cast(Tensor, next(iter(named.values())).seen).device
    counts = torch.stack([torch.stack([q.clipped, q.seen]).to(device) for q in named.values()]).tolist()
    return {name: clipped / seen for name, (clipped, seen) in zip(named, counts, strict=True) if seen}
