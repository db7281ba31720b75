"""ONNX export: fp32, and int8 QDQ from QAT state that ONNX Runtime runs with integer kernels.

No Lightning here. The int8 path builds an inference copy of the model (:func:`int8_copy`:
BatchNorms folded into the quantised Conv weights, fake quantisation with constant scales), exports
it with ``torch.onnx.export``, then rewrites the graph so that the file stores what a runtime needs and no more:

- every ``QuantizeLinear`` of a constant weight becomes an int8 initializer read by its
  ``DequantizeLinear`` (the float weight is dropped: the file is about a quarter of fp32);
- every float bias of a Conv/Gemm between quantised input and weight becomes int32 with scale
  ``input_scale * weight_scale`` behind a ``DequantizeLinear``, the form ONNX Runtime's QDQ
  fusion needs to run ``QLinearConv``/``QGemm``.
- where this CPU needs it (:mod:`lightning_compress.deploy.cpu`), the int8 weights are stored as
  uint8 with zero point 128: the same values, which ONNX Runtime computes exactly without VNNI;
- weights of 4 bits or fewer are stored packed, unpacked by ONNX Runtime once at load
  (:mod:`lightning_compress.deploy.packing`): a w4a8 file is about half a w8a8 one.

Files are written atomically (a temporary name, then a rename).

Example::

    export_onnx(model, torch.zeros(1, 1, 28, 28), "model.int8.onnx", int8=True)
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.core import quantization as q
from lightning_compress.core.distillation import logits_of
from lightning_compress.core.layers import weight_of
from lightning_compress.core.pruning import fold_masks
from lightning_compress.core.surgery import swap_modules, unpatched_copy
from lightning_compress.deploy import packing
from lightning_compress.deploy.cpu import WeightType, resolve_weight_type
from lightning_compress.deploy.folder import umask
from lightning_compress.deploy.shrink import kept_channels, remove_zero_channels
from lightning_compress.deploy.torchlib import torchlib_once
from lightning_compress.errors import CompressionConfigError, OptionalModule, require

if TYPE_CHECKING:
    import onnx
    from onnx import helper, numpy_helper
else:  # the `export` extra: imported when an ONNX file is written, not with the package
    onnx = OptionalModule("onnx", "export", "the ONNX export")
    helper = OptionalModule("onnx.helper", "export", "the ONNX export")
    numpy_helper = OptionalModule("onnx.numpy_helper", "export", "the ONNX export")

OPSET = 18


@torch.no_grad()
def _fold_bn_into(layer: nn.Module, bn: nn.Module, weight: Tensor) -> tuple[Tensor, Tensor]:
    # The exact factor, 0 where gamma was pruned to 0: such a channel outputs beta alone (training's
    # `bn_fold_factor` uses 1 there only to keep the weight's quantisation scale finite).
    factor = torch.rsqrt(cast(Tensor, bn.running_var) + cast(float, bn.eps))
    if bn.weight is not None:
        factor = factor * cast(Tensor, bn.weight)
    mean, beta = cast(Tensor, bn.running_mean), bn.bias
    bias = layer.bias if layer.bias is not None else torch.zeros_like(mean)
    folded_bias = (cast(Tensor, bias) - mean) * factor + (cast(Tensor, beta) if beta is not None else 0.0)
    return weight * factor.reshape(-1, *([1] * (weight.dim() - 1))), folded_bias


@dataclass(frozen=True)
class LayerQuant:
    """What the int8 export needs of one fake-quantised layer, read off the model as trained.

    Attributes:
        bits: weight bits.
        weight_scale: the symmetric scale(s) of the (BatchNorm-folded, masked) weight as trained: one
            per output channel (in the original numbering) or one.
        bn: the name of the BatchNorm folded into the weight, if any.
        input_qdq: the input's fixed-range quantiser, or ``None`` where its input is already quantised
            (:func:`~lightning_compress.core.quantization.covered_inputs`).
        output_qdq: the output's, or ``None`` where the next layer's input range serves it.
        output_at: the module whose output ``output_qdq`` quantises where that is not the layer (the end of its
            tail of ReLU / pooling modules, :func:`~lightning_compress.core.quantization.tail_modules`).
    """

    bits: int
    weight_scale: Tensor
    bn: str | None
    input_qdq: nn.Module | None
    output_qdq: nn.Module | None
    output_at: str | None = None


@dataclass(frozen=True)
class SumQuant:
    """What the int8 export needs of one quantised residual sum (see
    :func:`~lightning_compress.core.quantization.quantize_sums`): its fixed-range quantiser."""

    qdq: nn.Module


@torch.no_grad()
def int8_plan(model: nn.Module, fp32: nn.Module, example_input: Tensor) -> dict[str, LayerQuant | SumQuant]:
    """``{layer: LayerQuant}`` for every fake-quantised layer of ``model``, and ``{module: SumQuant}`` for every
    quantised residual sum.

    Args:
        model: the trained model with its QAT state.
        fp32: its :func:`float_copy` before any channel removal (same module names; the weights to scale).
        example_input: a batch for the model's analysis (which output ranges are shared).

    Raises:
        CompressionConfigError: the model has no enabled fake quantisation, or an observer never saw data.
    """
    layers = q.quantized_layers(model)
    if not layers or not any(bool(q.weight_quantizer(m).enabled) for m in layers.values()):
        raise CompressionConfigError(
            "int8 export needs QAT state: this model has no enabled fake quantisation. "
            "HINT: train with QuantizationAwareTraining, or export with int8=False"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = example_input.to(device)
    shared = set(q.shared_range_layers(model, example))  # as the QAT callback did on its first batch
    covered = set(q.covered_inputs(model, example))
    tails = q.tail_modules(model, example)
    names = {id(m): n for n, m in model.named_modules()}
    plan: dict[str, LayerQuant | SumQuant] = {}
    for name, layer in layers.items():
        quant = q.weight_quantizer(layer)
        if not bool(quant.enabled):  # left in float (never reached by forward): float in the file too
            continue
        inputs, outputs = getattr(layer, q.INPUT_QUANT), getattr(layer, q.OUTPUT_QUANT)
        bypass = outputs.bypass or name in shared
        covers = name not in covered
        for attr, observer, needed in ((q.INPUT_QUANT, inputs, covers), (q.OUTPUT_QUANT, outputs, not bypass)):
            if needed and not observer.initialised:
                raise CompressionConfigError(f"activation observer {name}.{attr} never saw data: cannot export int8")
        bn = names[id(quant.bn)] if quant.bn is not None else None
        plain = fp32.get_submodule(name)
        weight = weight_of(plain).detach()
        if bn is not None:
            weight = _fold_bn_into(plain, fp32.get_submodule(bn), weight)[0]
        scale = quant.scales(weight).cpu()  # max|w| / qmax of the folded weight, or the learned step sizes
        input_qdq = inputs.constant() if covers else None
        output_qdq = None if bypass else outputs.constant()
        plan[name] = LayerQuant(quant.bits, scale, bn, input_qdq, output_qdq, tails.get(name))
    for name, module in q.quantized_sums(model).items():
        quantizer = getattr(module, q.SUM_QUANT)
        if not bool(quantizer.enabled):
            continue
        if not quantizer.initialised:
            raise CompressionConfigError(f"activation observer {name}.{q.SUM_QUANT} never saw data: cannot export int8")
        plan[name] = SumQuant(quantizer.constant())
    return plan


@torch.no_grad()
def apply_int8(
    fp32: nn.Module, plan: Mapping[str, LayerQuant | SumQuant], removed: Mapping[str, list[int]] | None = None
) -> nn.Module:
    """Turn a :func:`float_copy` (possibly with channels removed) into the model an int8 QDQ export needs, in place.

    Folded BatchNorms become ``Identity`` (their effect moves into the layer's weight and bias),
    weights are snapped to the grid of their trained scales with constant Q/DQ, and activations are
    quantised with the observers' constant ranges.

    Args:
        fp32: the float copy (CPU).
        plan: from :func:`int8_plan`, made before any channel removal.
        removed: ``{layer: removed output-channel indices}`` of a physical channel removal
            (``info["removed_indices"]`` of :func:`~lightning_compress.deploy.shrink.remove_zero_channels`).
    """
    removed = removed or {}
    for name, spec in plan.items():
        if isinstance(spec, SumQuant):
            q.set_sum_quantizer(fp32.get_submodule(name), copy.deepcopy(spec.qdq))
            continue
        layer = fp32.get_submodule(name)
        weight = weight_of(layer).detach().clone()
        if spec.bn is not None:  # the BatchNorm's effect moves into the layer
            weight, bias = _fold_bn_into(layer, fp32.get_submodule(spec.bn), weight)
            layer.bias = nn.Parameter(bias)
            swap_modules(fp32, {spec.bn: nn.Identity()})
        scale = spec.weight_scale
        if scale.numel() > 1:  # the kept output channels' trained scales: their integers do not change
            scale = scale[kept_channels(scale.numel(), removed.get(name, []))]
        if scale.numel() not in (1, weight.shape[0]):
            raise RuntimeError(f"int8 export: {name} has {weight.shape[0]} output channels but {scale.numel()} scales")
        layer.weight = nn.Parameter(q.fake_quant_weight(weight, scale, spec.bits))  # on the grid
        _constant_weight_qdq(layer, scale)
        q.set_input_quantizer(layer, nn.Identity() if spec.input_qdq is None else copy.deepcopy(spec.input_qdq))
        output = nn.Identity() if spec.output_qdq is None else copy.deepcopy(spec.output_qdq)
        q.set_output_quantizer(layer, fp32.get_submodule(spec.output_at) if spec.output_at else layer, output)
    return fp32


def _constant_weight_qdq(layer: nn.Module, scale: Tensor) -> None:
    zero = torch.zeros(scale.numel(), dtype=torch.int8)
    parametrize.register_parametrization(layer, "weight", q.ConstantQDQ(scale, zero, axis=0))


def int8_copy(model: nn.Module, example_input: Tensor, physical: bool = False) -> nn.Module:
    """A copy of ``model`` ready to export as int8 QDQ (:func:`int8_plan` + :func:`apply_int8`, one deep copy).

    With ``physical``, whole zero output channels are removed first, as the fp32 export does; a model
    Torch-Pruning cannot trace keeps them, with a warning.
    """
    fp32 = float_copy(model).cpu()
    plan = int8_plan(model, fp32, example_input)
    removed: dict[str, list[int]] = {}
    if physical:
        _, info = remove_zero_channels(fp32, example_input.cpu(), inplace=True)
        if not info["traced"]:
            warnings.warn(f"int8 export keeps its zero channels: {info['reason']}", stacklevel=2)
            if not info["intact"]:
                fp32 = float_copy(model).cpu()
        removed = info["removed_indices"]
    return apply_int8(fp32, plan, removed)


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with masks folded and fake quantisation removed (fp32 export).

    The copy leaves out what this package patched onto the instance for a fit (distillation's
    ``training_step`` wrapper, see :func:`lightning_compress.core.surgery.unpatched_copy`); every
    attribute of the user's own is copied.
    """
    export = unpatched_copy(model).eval()
    fold_masks(export)
    return q.strip(export)


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def _constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    inits = _initializers(graph)
    if name in inits:
        return numpy_helper.to_array(inits[name])
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _consumers(graph: onnx.GraphProto, name: str) -> Iterator[onnx.NodeProto]:
    return (node for node in graph.node if name in node.input)


def fold_weight_quantizers(model: onnx.ModelProto) -> int:
    """Replace ``QuantizeLinear(constant float)`` by a constant int8 tensor; return how many."""
    graph = model.graph
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        values = _constant_value(graph, node.input[0])
        if values is None:
            continue
        scale = _constant_value(graph, node.input[1])
        zero = _constant_value(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * values.ndim
        if scale.size > 1:
            shape[axis] = -1
        zero_arr = np.zeros_like(scale, dtype=np.int8) if zero is None else zero
        ints = np.round(values / scale.reshape(shape)) + zero_arr.astype(np.float32).reshape(shape)
        dtype = np.uint8 if zero is not None and zero.dtype == np.uint8 else np.int8
        info = np.iinfo(dtype)
        tensor = numpy_helper.from_array(np.clip(ints, info.min, info.max).astype(dtype), node.output[0] + "_int8")
        graph.initializer.append(tensor)
        for consumer in _consumers(graph, node.output[0]):
            for i, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[i] = tensor.name
        graph.node.remove(node)
        folded += 1
    _drop_unused(graph)
    return folded


def store_weights_unsigned(model: onnx.ModelProto) -> int:
    """Store every int8 weight initializer (:func:`fold_weight_quantizers`' ``*_int8``) as uint8 with zero
    point 128, the same dequantised values; return how many. Run after :func:`quantize_biases` (which reads
    the int8 weights)."""
    graph = model.graph
    inits = _initializers(graph)
    shifted = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_int8") or node.input[0] not in inits:
            continue
        weights = numpy_helper.to_array(inits[node.input[0]])
        if weights.dtype != np.int8:
            continue
        if len(node.input) >= 3 and node.input[2]:
            zero = _constant_value(graph, node.input[2])
            if zero is None or zero.dtype != np.int8:  # never silently left int8: that file would saturate
                raise ValueError(f"{node.name}: int8 weights {node.input[0]!r} without a constant int8 zero point")
            name = node.input[2] + "_u8"
        else:  # no zero point: 0, shaped like the scale (one per channel where the scale is)
            scale = _constant_value(graph, node.input[1])
            zero = np.zeros(scale.shape if scale is not None else (), np.int8)
            name = node.input[0] + "_zero_point_u8"
        unsigned = (weights.astype(np.int16) + 128).astype(np.uint8)
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(unsigned, node.input[0]))
        # a zero point of its own: one tensor may be shared with a consumer that stays signed
        if name not in inits:
            inits[name] = numpy_helper.from_array((zero.astype(np.int16) + 128).astype(np.uint8), name)
            graph.initializer.append(inits[name])
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        shifted += 1
    _drop_unused(graph)
    return shifted


BIAS_STEPS = 2**30  # the largest |bias / scale| an int32 bias is given (headroom below 2**31)


def _widen_dead_channels(
    graph: onnx.GraphProto, w_dq: onnx.NodeProto, w_scale: np.ndarray, bias: np.ndarray, x_scale: float
) -> np.ndarray:
    """Per-channel weight scales made large enough for the bias where the channel's int8 weights are all 0.

    A pruned output channel keeps its bias, but its weight scale is ~0, so ``bias / (x_scale * w_scale)``
    overflows int32. Its weights are zero at any scale, so the scale can grow until the bias fits.
    """
    weights = _constant_value(graph, w_dq.input[0])
    inits = _initializers(graph)
    if weights is None or w_scale.size != bias.size or w_scale.size == 1 or w_dq.input[1] not in inits:
        return w_scale
    axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
    needed = np.abs(bias.astype(np.float64)) / (max(x_scale, 1e-30) * BIAS_STEPS)
    widened = w_scale.astype(np.float32).reshape(-1).copy()
    changed = False
    for channel in np.nonzero(widened < needed)[0]:
        if not np.take(weights, channel, axis=axis).any():
            widened[channel] = np.float32(needed[channel] * 1.01)
            changed = True
    if changed:
        inits[w_dq.input[1]].CopyFrom(numpy_helper.from_array(widened.reshape(w_scale.shape), w_dq.input[1]))
    return widened.reshape(w_scale.shape)


def quantize_biases(model: onnx.ModelProto) -> int:
    """Give every Conv/Gemm with quantised input and weight an int32 bias behind a DequantizeLinear."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    done = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
        bias = _constant_value(graph, node.input[2])
        if bias is None or x_dq is None or w_dq is None:
            continue
        if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        x_scale, w_scale = _constant_value(graph, x_dq.input[1]), _constant_value(graph, w_dq.input[1])
        if x_scale is None or w_scale is None:
            continue
        w_scale = _widen_dead_channels(graph, w_dq, w_scale, bias, float(x_scale.reshape(-1)[0]))
        scale = (x_scale.astype(np.float32) * w_scale.astype(np.float32)).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32) if scale.size == 1 else scale
        steps = np.divide(bias, scale, out=np.zeros_like(bias, dtype=np.float64), where=scale > 0)
        ints = np.clip(np.round(steps), -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[2]
        graph.initializer.extend(
            [
                numpy_helper.from_array(ints, base + "_int32"),
                numpy_helper.from_array(scale.astype(np.float32), base + "_int32_scale"),
            ]
        )  # zero point omitted: 0
        dq = helper.make_node("DequantizeLinear", [base + "_int32", base + "_int32_scale"], [base + "_dq"], axis=0)
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = base + "_dq"
        done += 1
    _drop_unused(graph)
    return done


def _drop_unused(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    for node in list(graph.node):
        if node.op_type == "Constant" and node.output[0] not in used:
            graph.node.remove(node)


def _qdq_to_onnx(x: Any, scale: Any, zero_point: Any, axis: int, qmin: int, qmax: int) -> Any:
    op = require("onnxscript", "export", "the int8 ONNX export").opset18
    quantised = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    return op.DequantizeLinear(quantised, scale, zero_point, axis=axis)


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node source metadata and intermediate shapes (a deployed file needs neither)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    del model.graph.metadata_props[:]


@contextlib.contextmanager
def out_of_place(model: nn.Module) -> Iterator[None]:
    """Activations with ``inplace=True`` (torchvision's ReLU, ReLU6, Hardswish, SiLU) run out of place while
    the model is exported, then get their flag back: the same function, and torch's exporter decomposes each
    in-place op at a cost (MobileNetV2: 58 of 97 s of decomposition were in-place activations)."""
    flagged: list[Any] = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for module in flagged:
        module.inplace = False
    try:
        yield
    finally:
        for module in flagged:
            module.inplace = True


def _to_onnx(model: nn.Module, example_input: Tensor) -> onnx.ModelProto:
    with (
        torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), out_of_place(model),
        torchlib_once(),
    ):  # fmt: skip
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example_input,),
            dynamo=True,
            opset_version=OPSET,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
            input_names=["input"],
            output_names=["logits"],
            custom_translation_table={torch.ops.lightning_compress.qdq.default: _qdq_to_onnx},
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def _packed(proto: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """``proto`` with its narrow weights packed where ONNX Runtime unpacks them at load; else as it was (a
    warning says why). Either way the file's metadata says what it stores (layer names without ``prefix``)."""
    packed_proto = copy.deepcopy(proto)
    packed = packing.pack_weights(packed_proto)
    if not packed:
        packing.set_storage(proto, packing.describe_storage({}))
        return proto
    reason = packing.unfolded_reason(packed_proto)
    if reason is None:
        packing.set_storage(packed_proto, packing.describe_storage(packed, prefix=prefix))
        return packed_proto
    warnings.warn(f"the int8 file stores its {len(packed)} narrow weight tensors as int8: {reason}", stacklevel=3)
    packing.set_storage(proto, packing.describe_storage({}, reason))
    return proto


LogitsFn = Callable[[Any], Tensor]


def pick_logits(output: Any, logits_fn: LogitsFn | None = None) -> Tensor:
    """The logits in a model's output: ``logits_fn(output)``, or by the rule distillation uses (a tensor,
    a ``logits`` key or attribute, a tuple's first element; see
    :func:`lightning_compress.core.distillation.logits_of`)."""
    return logits_fn(output) if logits_fn is not None else logits_of(output, "model")


class LogitsOnly(nn.Module):
    """``model`` with its output reduced to the logits, for a model whose ``forward`` returns a tuple,
    a dict or a dataclass: the exported file has one output, ``logits``."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.logits_fn = logits_fn

    def forward(self, x: Tensor) -> Tensor:
        return pick_logits(self.model(x), self.logits_fn)


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike[str],
    int8: bool = False,
    physical: bool = False,
    logits_fn: LogitsFn | None = None,
    int8_weights: WeightType = "auto",
    pack_weights: bool = True,
) -> Path:
    """Export ``model`` to ONNX at ``path`` (batch dimension dynamic), atomically.

    Args:
        model: the model (pruning masks and QAT state are handled; the model itself is not changed).
        example_input: one input batch (its batch size does not matter).
        path: the file to write.
        int8: write an int8 QDQ model from the model's QAT state (weights stored as int8);
            otherwise an fp32 model with fake quantisation switched off.
        physical: with ``int8``, remove whole zero output channels (the fp32 path gets a model
            already shrunk by :func:`lightning_compress.deploy.shrink.remove_zero_channels`).
        logits_fn: ``output -> logits`` for a ``forward`` that returns more than the logits (default
            :func:`pick_logits`' rule); the file's one output is the logits.
        int8_weights: how the int8 file stores its weights: ``int8``, ``uint8`` (zero point 128, exact in
            ONNX Runtime on every CPU), or ``auto`` (by this CPU; see :mod:`lightning_compress.deploy.cpu`).
        pack_weights: with ``int8``, store weights of 4 bits or fewer packed where this ONNX Runtime unpacks
            them at load (:mod:`lightning_compress.deploy.packing`; otherwise int8 storage, with a warning
            saying why); the file's metadata ``lightning_compress.weight_storage`` says which layers are packed.

    Returns:
        The path written.

    Raises:
        CompressionConfigError: ``int8=True`` on a model without QAT state; the folder cannot be written.
    """
    prepared = int8_copy(model, example_input, physical) if int8 else float_copy(model)
    return write_onnx(prepared, example_input, path, int8, logits_fn, int8_weights, pack_weights)


def write_onnx(
    prepared: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike[str],
    int8: bool = False,
    logits_fn: LogitsFn | None = None,
    int8_weights: WeightType = "auto",
    pack_weights: bool = True,
) -> Path:
    """Export a model already prepared (:func:`float_copy`, :func:`int8_copy`) to ONNX at ``path``, atomically.

    ``prepared`` is exported on the CPU and left there, in eval mode, without gradients; its input keeps
    the example's dtype (token ids stay integers) and its one output is the logits (:class:`LogitsOnly`
    where ``forward`` returns more); ``int8_weights`` and ``pack_weights`` as in :func:`export_onnx`.

    Raises:
        CompressionConfigError: the folder cannot be written.
    """
    for module in ("onnx", "onnxscript"):  # torch's exporter imports onnxscript: say which extra it is
        require(module, "export", "the ONNX export")
    weight_type = resolve_weight_type(int8_weights)[0]
    path = Path(path)
    export: nn.Module = prepared.cpu().eval().requires_grad_(False)
    example = example_input.detach().cpu()
    with torch.no_grad():
        if logits_fn is not None or not isinstance(export(example), Tensor):
            export = LogitsOnly(export, logits_fn)
    proto = _to_onnx(export, example)
    if int8:
        fold_weight_quantizers(proto)
        quantize_biases(proto)
        if weight_type == "uint8":
            store_weights_unsigned(proto)
        if pack_weights:
            proto = _packed(proto, "model." if isinstance(export, LogitsOnly) else "")
    strip_debug_info(proto)
    onnx.checker.check_model(proto)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise CompressionConfigError(f"cannot write the ONNX file {str(path)!r}: {err}") from None
    os.close(handle)
    try:
        onnx.save(proto, tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp made it 0600: the mode any other file gets
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
