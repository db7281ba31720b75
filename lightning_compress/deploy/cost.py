"""What each layer costs under each compression option: parameters, MACs, bytes as stored, and the latency
ONNX Runtime measures for it on this machine at the user's batch size.

A layer's call is recorded once from a forward pass (:func:`layer_calls`: its input shape and
hyper-parameters). For each :class:`Option` (a structure: dense, ``channels`` pruned, ``low_rank``, or
unstructured ``sparsity``; and a weight width: float, or ``bits`` stored as int8) the counts are computed
(:func:`static_costs`) and the latency measured on a one-layer ONNX graph built directly (:func:`layer_graph`:
the same operators the exported file has, QDQ around an int8 layer, which ONNX Runtime runs as QLinearConv /
QGemm), so hundreds of options take seconds. Unstructured sparsity changes bytes, not time: ONNX Runtime has
no sparse kernels, so it costs the dense latency (measured once). Measurements are cached in a JSON file keyed
by the layer's call, the option, the batch size, the threads and this machine, and reused.

What the per-layer model leaves out is measured, not assumed: a plan's whole-model latency is the dense model's
minus the planned layers' dense latencies plus their planned ones, and :func:`lightning_compress.app.plan`
exports the planned model to compare.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.sensitivity import Setting, low_rank_rank
from lightning_compress.deploy.cpu import resolve_weight_type
from lightning_compress.deploy.measure import median_call_ms
from lightning_compress.errors import OptionalModule, config_error

onnx = OptionalModule("onnx", "export", "the cost model's latency measurements")
ort = OptionalModule("onnxruntime", "export", "the cost model's latency measurements")

OPSET = 17
FIGURES = ("params", "macs", "bytes", "latency_ms")


@dataclass(frozen=True)
class LayerCall:
    """One Conv2d / Linear call: what its cost depends on. ``input_shape`` has the batch dimension first."""

    kind: str  # "conv" or "linear"
    in_features: int
    out_features: int
    input_shape: tuple[int, ...]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    @property
    def fan_in(self) -> int:
        return self.in_features // self.groups * self.kernel[0] * self.kernel[1]

    def positions(self) -> int:
        """Output positions per sample (rows for a Linear: every position of its input but the last)."""
        if self.kind == "linear":
            return math.prod(self.input_shape[1:-1]) if len(self.input_shape) > 2 else 1
        h, w = self.input_shape[2], self.input_shape[3]
        sides = zip((h, w), self.padding, self.dilation, self.kernel, self.stride, strict=True)
        size = [(d + 2 * p - dl * (k - 1) - 1) // s + 1 for d, p, dl, k, s in sides]
        return size[0] * size[1]

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Option:
    """A layer's compression: ``structure`` (``None`` dense, or a :class:`Setting` of kind ``channels``,
    ``low_rank`` or ``sparsity``) and ``bits`` (``None``: float; 2-8: fake-quantised, stored as int8)."""

    structure: Setting | None = None
    bits: int | None = None

    def __str__(self) -> str:
        parts = [str(self.structure) if self.structure else "dense", f"bits={self.bits}" if self.bits else "float"]
        return ",".join(parts)


def layer_calls(model: nn.Module, example: Tensor, layers: Sequence[str] | None = None) -> dict[str, LayerCall]:
    """``{name: LayerCall}`` of the Conv2d / Linear layers ``model`` calls on ``example`` (batch dimension
    first; the model runs once in eval mode under ``torch.no_grad``)."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    wanted = set(layers) if layers is not None else set(modules)
    calls: dict[str, LayerCall] = {}
    handles = []

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in calls or not args or not isinstance(args[0], Tensor):
                return
            shape = tuple(int(d) for d in args[0].shape)
            if isinstance(module, nn.Conv2d):
                calls[name] = LayerCall(
                    "conv", module.in_channels, module.out_channels, shape, _pair(module.kernel_size),
                    _pair(module.stride), _pair(module.padding), _pair(module.dilation), module.groups,
                    module.bias is not None,
                )  # fmt: skip
            elif isinstance(module, nn.Linear):
                bias = module.bias is not None
                calls[name] = LayerCall("linear", module.in_features, module.out_features, shape, bias=bias)

        return hook

    for name, module in modules.items():
        if name in wanted:
            handles.append(module.register_forward_pre_hook(recorder(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, str):  # padding="same"/"valid": not what the cost depends on at this precision
        return (0, 0)
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _shapes(call: LayerCall, option: Option) -> list[tuple[int, int, int]]:
    """The (in, out, fan_in) of each weight the option leaves (two for low-rank)."""
    structure = option.structure
    if structure is not None and structure.kind == "channels":
        out = max(1, call.out_features - round(structure.value * call.out_features))
        return [(call.in_features, out, call.fan_in)]
    if structure is not None and structure.kind == "low_rank" and call.groups == 1:
        rank = low_rank_rank(torch.empty(call.out_features, call.fan_in), structure.value)
        return [(call.in_features, rank, call.fan_in), (rank, call.out_features, rank)]
    return [(call.in_features, call.out_features, call.fan_in)]


def static_costs(call: LayerCall, option: Option) -> dict[str, float]:
    """``params`` (non-zero weights and biases), ``macs`` (per sample, non-zero weights), ``bytes`` as stored
    (float32; one byte a weight for 5-8 bits, half a byte for 3-4, a quarter for 2, as the int8 export packs them;
    biases int32; sparse as a bitmap plus the non-zeros)."""
    shapes = _shapes(call, option)
    weights = sum(out * fan_in for _, out, fan_in in shapes)
    biases = shapes[-1][1] if call.bias else 0
    density = 1 - option.structure.value if option.structure and option.structure.kind == "sparsity" else 1.0
    nonzero = round(weights * density)
    size = (0.25 if option.bits <= 2 else 0.5 if option.bits <= 4 else 1.0) if option.bits else 4.0
    stored = nonzero * size + math.ceil(weights / 8) if density < 1 else weights * size
    stored = min(stored, weights * size) + biases * 4
    return {"params": float(nonzero + biases), "macs": float(call.positions() * nonzero), "bytes": float(stored)}


def _initializer(name: str, array: np.ndarray) -> Any:
    return onnx.numpy_helper.from_array(array, name)


def layer_graph(call: LayerCall, option: Option, batch_size: int, weight_type: str = "int8") -> Any:
    """A one-layer ONNX model of ``call`` under ``option`` at ``batch_size``: Conv / Gemm nodes as the exporter
    writes them, with QuantizeLinear / DequantizeLinear around each for an int8 option (weights per channel,
    ``weight_type`` ``int8`` or ``uint8`` with zero point 128, biases int32). Random weights: time only."""
    helper = onnx.helper
    rng = np.random.default_rng(0)
    shape = (batch_size, *call.input_shape[1:])
    if call.kind == "linear":
        rows = math.prod(call.input_shape[1:-1]) if len(call.input_shape) > 2 else 1
        shape = (batch_size * rows, call.in_features)
    nodes: list[Any] = []
    inits: list[Any] = []
    current = "x"
    quantised = option.bits is not None
    if quantised:
        inits += [_initializer("a_scale", np.array(0.02, np.float32)), _initializer("a_zero", np.array(128, np.uint8))]
        nodes += [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zero"], ["xd"])]  # fmt: skip
        current = "xd"
    parts = _shapes(call, option)
    for index, (inputs, out, _) in enumerate(parts):
        last = index == len(parts) - 1
        second = index == 1  # the 1x1 of a factorised conv, the second Linear of a factorised Linear
        groups = call.groups if not second and call.kind == "conv" else 1
        kernel = (1, 1) if second else call.kernel
        if call.kind == "conv":
            weight = rng.standard_normal((out, inputs // groups, *kernel)).astype(np.float32)
        else:
            weight = rng.standard_normal((out, inputs)).astype(np.float32)
        w_name, b_name, y_name = f"w{index}", f"b{index}", "y" if last and not quantised else f"h{index}"
        w_input = w_name
        if quantised:
            scale = np.full(out, 0.01, np.float32)
            steps = np.clip(np.round(weight / 0.01), -127, 127)
            if weight_type == "uint8":
                stored, zero = (steps + 128).astype(np.uint8), np.full(out, 128, np.uint8)
            else:
                stored, zero = steps.astype(np.int8), np.zeros(out, np.int8)
            parts_in = [f"{w_name}q", f"{w_name}s", f"{w_name}z"]
            inits += [_initializer(parts_in[0], stored), _initializer(parts_in[1], scale)]
            inits.append(_initializer(parts_in[2], zero))
            nodes.append(helper.make_node("DequantizeLinear", parts_in, [w_name], axis=0))
        else:
            inits.append(_initializer(w_name, weight))
        names = [current, w_input]
        if call.bias and last:
            if quantised:
                inits += [_initializer(f"{b_name}q", np.zeros(out, np.int32)),
                          _initializer(f"{b_name}s", np.full(out, 0.0002, np.float32))]  # fmt: skip
                nodes.append(helper.make_node("DequantizeLinear", [f"{b_name}q", f"{b_name}s"], [b_name], axis=0))
            else:
                inits.append(_initializer(b_name, np.zeros(out, np.float32)))
            names.append(b_name)
        if call.kind == "conv":
            own = (call.stride, call.padding, call.dilation)
            stride, padding, dilation = ((1, 1), (0, 0), (1, 1)) if second else own
            nodes.append(helper.make_node(
                "Conv", names, [y_name], kernel_shape=list(kernel), strides=list(stride),
                pads=[padding[0], padding[1], padding[0], padding[1]], dilations=list(dilation), group=groups,
            ))  # fmt: skip
        else:
            nodes.append(helper.make_node("Gemm", names, [y_name], transB=1))
        current = y_name
        if quantised:
            out_name = "y" if last else f"h{index}d"
            nodes.append(helper.make_node("QuantizeLinear", [current, "a_scale", "a_zero"], [f"{current}q"]))
            nodes.append(helper.make_node("DequantizeLinear", [f"{current}q", "a_scale", "a_zero"], [out_name]))
            current = out_name
    float_type = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", float_type, list(shape))],
        [helper.make_tensor_value_info("y", float_type, [f"d{i}" for i in range(len(shape))])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def time_graph(model: Any, runs: int = 20, warmup: int = 5, threads: int = 0) -> float:
    """Median milliseconds of ``runs`` ONNX Runtime calls of a one-input model (random input) after ``warmup``
    (``threads`` intra-op threads, 0: ONNX Runtime's default; spinning on, as the whole file is timed)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, as the exported file is timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    feed = {spec.name: np.random.default_rng(1).standard_normal(spec.shape).astype(np.float32)}
    return median_call_ms(session, feed, runs, warmup)


def machine() -> str:
    """What a cached latency was measured on: the CPU model, ONNX Runtime's version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} | onnxruntime {ort.__version__}"


class CostModel:
    """Per-layer costs of options, with latencies measured once and cached (``cache``: a JSON file).

    Args:
        batch_size: the batch the latencies are measured at (the user's).
        threads: ONNX Runtime intra-op threads; 0 (default) is its own default, as
            :func:`lightning_compress.deploy.measure.ort_latency_ms` times a whole file (the two must agree: the
            whole model's figure minus its layers' is what lies outside them).
        runs: timed calls per measurement (the median is kept).
        cache: where measurements are kept between runs; ``None`` keeps them in memory only.
        int8_weights: the int8 weight type as the export would store it (``auto``: by this CPU).
    """

    def __init__(self, batch_size: int, threads: int = 0, runs: int = 20,
                 cache: str | os.PathLike[str] | None = None, int8_weights: str = "auto") -> None:  # fmt: skip
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise config_error("batch_size", "a positive integer", batch_size)
        self.batch_size, self.threads, self.runs = batch_size, threads, runs
        self.weight_type = resolve_weight_type(int8_weights)[0]
        self.cache = Path(cache) if cache is not None else None
        self.where = machine()
        self._latency: dict[str, float] = {}
        self.measured = 0  # latencies measured by this instance (the rest came from the cache)
        if self.cache is not None and self.cache.is_file():
            try:
                saved = json.loads(self.cache.read_text())
                self._latency = {str(k): float(v) for k, v in saved.get("latency_ms", {}).items()}
            except (OSError, ValueError, AttributeError):
                self._latency = {}  # an unreadable cache is measured again

    @staticmethod
    def timed(option: Option) -> Option:
        """The option whose graph is timed for ``option``: sparsity runs at the dense time (no sparse kernels)
        and every width below 8 as int8 (how it is stored)."""
        sparse = option.structure is not None and option.structure.kind == "sparsity"
        return Option(None if sparse else option.structure, 8 if option.bits else None)

    def latency_ms(self, call: LayerCall, option: Option) -> float:
        """The measured milliseconds of ``call`` under ``option`` at this batch size (cached)."""
        timed = self.timed(option)
        key = f"{call.key()}|{timed}|b{self.batch_size}|t{self.threads}|{self.weight_type}|{self.where}"
        if key not in self._latency:
            graph = layer_graph(call, timed, self.batch_size, self.weight_type)
            self._latency[key] = time_graph(graph, self.runs, threads=self.threads)
            self.measured += 1
        return self._latency[key]

    def costs(self, call: LayerCall, option: Option) -> dict[str, float]:
        """``params``, ``macs``, ``bytes`` (:func:`static_costs`) and ``latency_ms`` of one option."""
        return {**static_costs(call, option), "latency_ms": self.latency_ms(call, option)}

    def table(
        self, calls: Mapping[str, LayerCall], options: Mapping[str, Sequence[Option]]
    ) -> dict[str, dict[str, dict[str, float]]]:
        """``{layer: {str(option): costs}}`` for the given options of each layer; saves the cache."""
        result = {name: {str(o): self.costs(calls[name], o) for o in options[name]} for name in options}
        self.save()
        return result

    def save(self) -> None:
        """Write the measurements to the cache file (if any)."""
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            self.cache.write_text(json.dumps({"latency_ms": self._latency}, indent=0, sort_keys=True))
