"""Does an exported file reproduce its model? ONNX Runtime against PyTorch, by criteria that hold at any depth.

No Lightning here. A failure raises :class:`~lightning_compress.errors.ExportVerificationError`.

- **fp32** (:func:`verify_fp32`): the file's logits against the (physically smaller) float model's:
  signal-to-noise ratio at least :data:`FP32_MIN_SQNR_DB` (a relative RMS error of 1e-4; float
  rounding gives 110-150 dB on the zoo) and no flipped top-1 on a *decisive* sample (one whose
  margin between its two best classes is more than twice that row's largest difference). The
  maximum absolute difference is reported; it is not a criterion, because it grows with the output's
  scale and with depth. Some models are *ill-conditioned in float32*: PyTorch's own float32 output is
  that far from the same model in float64 (torchvision's ``efficientnet_v2_s`` two steps from random
  init: logits ~1e5, 12 dB), and no float32 runtime can match it to 80 dB. When the rule fails and a
  float64 run of the model is at hand, the file passes if its error against float64 is at most
  :data:`FP32_ROUNDING_FACTOR` times PyTorch float32's own (and no sample decisive at that scale flips);
  the report then holds both figures, and the model's own float32 SQNR is stated as the reason.
- **int8** (:func:`verify_int8`): layer by layer. One ONNX Runtime run (integer kernels) exposes every
  tensor the file quantises (every quantised layer's input and output); the PyTorch int8 model the file
  was exported from is then run with each of those tensors *replaced by ONNX Runtime's*, so every
  segment is compared on the same input and rounding differences cannot accumulate. A correct file
  differs by at most one quantisation step (1.00 on the zoo); a wrong scale, a lost bias or misplaced
  channels put 1-100% of a layer's elements 3-255 steps apart. Criterion: at most
  :data:`INT8_MAX_OFF_SHARE` of any layer's elements (and of the logits) more than one step apart. Every
  operation of the file lies between two compared tensors (or between the last one and the logits), so
  this covers the whole graph. A failure names the first layer where the file and the model part ways.
  End-to-end figures (against the fake-quant model, and both against the float model) are reported, not
  required: in deep untrained networks one-step differences grow chaotically (a 53-layer MNASNet: 11 dB
  at the logits from layers that each agree to one step; torchvision's ``maxvit_t``: 17.2 dB against the
  float model where the fake-quant model has 24.9 dB, with every one of its quantised tensors within one
  step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.deploy import cpu
from lightning_compress.errors import ExportVerificationError, require

FP32_MIN_SQNR_DB = 80.0
FP32_ROUNDING_FACTOR = 2.0  # an ill-conditioned model's file: its RMS error against float64, over PyTorch float32's
INT8_MAX_OFF_SHARE = 0.001
QUANTIZERS = ("input_quant", "output_quant")  # a quantised layer's children, by which the export names its scales


def sqnr_db(output: np.ndarray, reference: np.ndarray) -> float:
    """Signal-to-noise ratio of ``output`` against ``reference`` (logits, ``(batch, classes)``), in dB.

    The signal is the reference around each row's mean (a shift of a row's logits changes no
    prediction); the noise is the whole difference. Infinite for identical outputs.
    """
    signal = reference - reference.mean(axis=1, keepdims=True) if reference.ndim > 1 else reference
    noise = float(np.square(output.astype(np.float64) - reference).sum())
    power = float(np.square(signal.astype(np.float64)).sum())
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(power, 1e-300) / noise)


def compare(output: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Figures of ``output`` against ``reference``: max |difference|, SQNR, relative RMS error, top-1 agreement,
    and the top-1 flips on decisive samples (margin above twice the row's largest difference)."""
    diff = np.abs(output.astype(np.float64) - reference)
    sqnr = sqnr_db(output, reference)
    flips = 0
    if reference.ndim == 2 and reference.shape[1] > 1:
        ordered = np.sort(reference, axis=1)
        decisive = (ordered[:, -1] - ordered[:, -2]) > 2 * diff.max(axis=1)
        flips = int((decisive & (output.argmax(1) != reference.argmax(1))).sum())
        agreement = float((output.argmax(1) == reference.argmax(1)).mean())
    else:
        agreement = 1.0
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "sqnr_db": round(sqnr, 2) if math.isfinite(sqnr) else None,  # None: identical (JSON has no inf)
        "relative_error": 0.0 if not math.isfinite(sqnr) else 10 ** (-sqnr / 20),
        "top1_agreement": agreement,
        "decisive_flips": flips,
    }


def _fails(message: str) -> ExportVerificationError:
    return ExportVerificationError(message)


def verify_fp32(
    output: np.ndarray, reference: Tensor, name: str, precise: Callable[[], Tensor | None] | None = None
) -> dict[str, Any]:
    """Check an fp32 file's output against the float model's.

    Args:
        output: the file's logits.
        reference: the PyTorch float32 model's logits on the same input.
        name: the file, for messages.
        precise: called only when the SQNR rule fails: the same model's logits computed in float64
            (``None`` where the model cannot run in float64). Tells an ill-conditioned model (PyTorch's
            own float32 output that far from float64) from a wrong file.

    Raises:
        ExportVerificationError: SQNR below :data:`FP32_MIN_SQNR_DB` or a decisive sample's top-1
            flipped, and (where ``precise`` is given) an error against float64 more than
            :data:`FP32_ROUNDING_FACTOR` times PyTorch float32's own.
    """
    ours = _numpy(reference)
    result = compare(output, ours)
    sqnr = math.inf if result["sqnr_db"] is None else result["sqnr_db"]
    result["criterion"] = f"SQNR >= {FP32_MIN_SQNR_DB:g} dB and no decisive top-1 flip"
    result["passed"] = bool(sqnr >= FP32_MIN_SQNR_DB and result["decisive_flips"] == 0)
    exact = precise() if precise is not None and not result["passed"] else None
    conditioning = ""
    if exact is not None:
        result.update(_against_float64(output, ours, exact.detach().double().cpu().numpy()))
        conditioning = (
            f"; against the model in float64 the file's SQNR is {_db(result['file_vs_float64_db'])} and PyTorch "
            f"float32's own {_db(result['float32_vs_float64_db'])} (the file may be at most "
            f"{FP32_ROUNDING_FACTOR:g}x as far)"
        )
    if not result["passed"]:
        raise _fails(
            f"{name}: ONNX Runtime's output differs from the PyTorch model's: SQNR {sqnr:.1f} dB (at least "
            f"{FP32_MIN_SQNR_DB:g}), relative error {result['relative_error']:.3g}, max |difference| "
            f"{result['max_abs_diff']:.3g}, {result['decisive_flips']} decisive top-1 flips, top-1 agreement "
            f"{result['top1_agreement']:.3f}{conditioning}"
        )
    return result


def _against_float64(output: np.ndarray, ours: np.ndarray, exact: np.ndarray) -> dict[str, Any]:
    """The ill-conditioned-model rule: the file against float64 next to PyTorch float32 against float64."""
    theirs_db, ours_db = sqnr_db(output, exact), sqnr_db(ours, exact)
    noise = float(np.sqrt(np.square(output.astype(np.float64) - exact).sum()))
    rounding = float(np.sqrt(np.square(ours.astype(np.float64) - exact).sum()))
    flips = 0
    if exact.ndim == 2 and exact.shape[1] > 1:  # decisive at the scale float32 rounding itself reaches
        spread = np.maximum(np.abs(output - exact).max(axis=1), np.abs(ours - exact).max(axis=1))
        ordered = np.sort(exact, axis=1)
        decisive = (ordered[:, -1] - ordered[:, -2]) > 2 * spread
        flips = int((decisive & (output.argmax(1) != exact.argmax(1))).sum())
    passed = noise <= FP32_ROUNDING_FACTOR * rounding and flips == 0
    return {
        "file_vs_float64_db": round(theirs_db, 2) if math.isfinite(theirs_db) else None,
        "float32_vs_float64_db": round(ours_db, 2) if math.isfinite(ours_db) else None,
        "float64_decisive_flips": flips,
        "criterion": (
            f"SQNR >= {FP32_MIN_SQNR_DB:g} dB and no decisive top-1 flip, or, where PyTorch's own float32 "
            f"output is that far from float64 (an ill-conditioned model), an error against float64 at most "
            f"{FP32_ROUNDING_FACTOR:g}x PyTorch float32's and no decisive flip there"
        ),
        "passed": bool(passed),
        "ill_conditioned": bool(passed),
    }


def _db(value: float | None) -> str:
    return "inf dB" if value is None else f"{value:.1f} dB"


def quantized_tensors(proto: Any) -> dict[str, list[tuple[str, float, int]]]:
    """``{quantiser: [(tensor, scale, zero point), ...]}``: every activation an int8 export quantises, by
    the name of the quantiser module (``<layer>.input_quant`` / ``<layer>.output_quant``): the output of
    its ``QuantizeLinear``, one per call, in graph order."""
    numpy_helper = require("onnx.numpy_helper", "export", "the int8 verification")

    values = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    taps: dict[str, list[tuple[str, float, int]]] = {}
    for node in proto.graph.node:
        quantizer = node.input[1].removesuffix(".scale") if node.op_type == "QuantizeLinear" else ""
        if not quantizer.endswith(QUANTIZERS) or node.input[1] not in values:
            continue
        if len(node.input) < 3 or node.input[2] not in values:
            continue
        scale, zero = float(values[node.input[1]].reshape(-1)[0]), int(values[node.input[2]].reshape(-1)[0])
        taps.setdefault(quantizer, []).append((node.output[0], scale, zero))
    return taps


def _output_step(proto: Any) -> float | None:
    """The quantisation step of the file's output, when a ``DequantizeLinear`` produces it."""
    numpy_helper = require("onnx.numpy_helper", "export", "the int8 verification")

    values = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    output = proto.graph.output[0].name
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] == output and node.input[1] in values:
            return float(values[node.input[1]].reshape(-1)[0])
    return None


def layerwise(
    path: str | Path, prepared: nn.Module, batch: Tensor, logits: Callable[[Any], Tensor]
) -> list[dict[str, Any]]:
    """Compare an int8 file with the PyTorch model it was exported from, one quantised layer at a time.

    Args:
        path: the int8 ONNX file.
        prepared: the model exported (:func:`~lightning_compress.deploy.onnx.int8_copy` /
            :func:`~lightning_compress.deploy.onnx.apply_int8`), on the CPU.
        batch: the input.
        logits: ``output -> logits`` of ``prepared``.

    Returns:
        One row per compared tensor, in the order the model computes them (the logits last):
        ``{"layer"`` (the quantiser, e.g. ``conv2.input_quant``, or ``logits``), ``"elements", "off_share"``
        (more than one step apart), ``"max_steps"}``.
    """
    onnx = require("onnx", "export", "the int8 verification")
    ort = require("onnxruntime", "export", "the int8 verification")

    proto = onnx.load(str(path))
    taps = quantized_tensors(proto)
    for calls in taps.values():
        for tensor, _, _ in calls:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: _numpy_input(batch)}), strict=True))
    modules = dict(prepared.named_modules())
    rows: list[dict[str, Any]] = []
    hooks = []

    def substitute(layer: str, calls: list[tuple[str, float, int]]) -> Callable[..., Tensor]:
        pending = list(calls)

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            if not pending:
                return output
            tensor, scale, zero = pending.pop(0)
            theirs = (values[tensor].astype(np.float32) - zero) * scale
            rows.append(_row(layer, _numpy(output), theirs, scale))
            return torch.from_numpy(theirs).to(output.dtype)

        return hook

    for tapped, calls in taps.items():
        name = tapped if tapped in modules else tapped.removeprefix("model.")  # LogitsOnly's prefix
        if name in modules:
            hooks.append(modules[name].register_forward_hook(substitute(name, calls)))
    try:
        with torch.no_grad():
            ours = _numpy(logits(prepared(batch)))
    finally:
        for hook in hooks:
            hook.remove()
    step = _output_step(proto)
    theirs = values[names[0]]
    rows.append(_row("logits", ours, theirs, step if step else 1e-4 * max(1.0, float(np.abs(ours).max()))))
    rows[-1]["output"] = theirs  # popped by verify_int8 (compared with an uninstrumented run); not in the report
    return rows


def _row(layer: str, ours: np.ndarray, theirs: np.ndarray, step: float) -> dict[str, Any]:
    steps = np.abs(ours.astype(np.float64) - theirs) / step
    return {
        "layer": layer,
        "elements": int(steps.size),
        "off_share": float((steps > 1.5).mean()) if steps.size else 0.0,
        "max_steps": float(steps.max()) if steps.size else 0.0,
    }


def verify_int8(
    path: str | Path,
    prepared: nn.Module,
    batch: Tensor,
    fake_quant: Tensor,
    float_output: Tensor,
    logits: Callable[[Any], Tensor],
    weights: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Check an int8 file layer by layer (:func:`layerwise`) and end to end.

    Args:
        path: the int8 file.
        prepared: the PyTorch int8 model it was exported from (CPU).
        batch: the input.
        fake_quant: the trained fake-quant model's logits on ``batch`` (the end-to-end reference).
        float_output: the float model's logits on ``batch``.
        logits: ``output -> logits`` of ``prepared``.
        weights: how the file stores its weights and why (:func:`lightning_compress.deploy.cpu.resolve_weight_type`),
            for the hint when the check fails.

    Raises:
        ExportVerificationError: a layer (or the logits) has more than :data:`INT8_MAX_OFF_SHARE` of its
            elements more than one quantisation step from the model's.
    """
    rows = layerwise(path, prepared, batch, logits)
    session_output = _run(path, batch)
    # exposing the quantised tensors must not change how ONNX Runtime fuses the graph: same logits
    instrumented = float(np.abs(rows[-1].pop("output") - session_output).max())
    result = compare(session_output, _numpy(fake_quant))
    reference_float = _numpy(float_output)
    ours, theirs = sqnr_db(session_output, reference_float), sqnr_db(_numpy(fake_quant), reference_float)
    result["sqnr_vs_float_db"] = round(ours, 2) if math.isfinite(ours) else None
    result["fake_quant_sqnr_vs_float_db"] = round(theirs, 2) if math.isfinite(theirs) else None
    worst = max(rows, key=lambda row: row["off_share"])
    first = next((row for row in rows if row["off_share"] > INT8_MAX_OFF_SHARE), None)
    result["layers"] = {
        "compared": len(rows) - 1,
        "worst": worst["layer"],
        "worst_off_share": worst["off_share"],
        "max_steps": max(row["max_steps"] for row in rows),
        "first_diverging": first["layer"] if first else None,
        "instrumented_run_max_diff": instrumented,
    }
    result["criterion"] = (
        f"every quantised tensor and the logits within one quantisation step of the model's, given the "
        f"same inputs, in all but {INT8_MAX_OFF_SHARE:.1%} of elements"
    )
    result["passed"] = first is None
    if first is not None:
        where = "at the logits" if first["layer"] == "logits" else f"at {describe(first['layer'])}"
        raise _fails(
            f"{Path(path).name}: ONNX Runtime's int8 model parts ways with the "
            f"PyTorch model {where}: {first['off_share']:.1%} of {first['elements']} elements more than one "
            f"quantisation step apart (at most {INT8_MAX_OFF_SHARE:.1%}), up to {first['max_steps']:.0f} steps"
            + _saturation_hint(weights)
        )
    return result


def _saturation_hint(weights: tuple[str, str] | None) -> str:
    """Where int8 weights meet a CPU whose u8s8 kernels saturate, that is the likely cause: say so."""
    exact, why = cpu.u8s8_exact()
    if weights is None or weights[0] != "int8" or exact:
        return ""
    return (
        f". HINT: this is {why}; store the weights as uint8 (CompressionExport(int8_weights='uint8') or "
        "'auto'), which ONNX Runtime computes exactly on every CPU"
    )


def describe(quantizer: str) -> str:
    """``"the input of 'conv2'"`` for the quantiser ``conv2.input_quant`` (``output``: its output)."""
    layer, _, kind = quantizer.rpartition(".")
    return f"the {kind.removesuffix('_quant')} of {layer!r}" if kind in QUANTIZERS else repr(quantizer)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _run(path: str | Path, batch: Tensor) -> Any:
    from lightning_compress.deploy.measure import ort_session

    session = ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: _numpy_input(batch)})[0]


def _numpy_input(batch: Tensor) -> np.ndarray:
    return batch.detach().cpu().numpy()
