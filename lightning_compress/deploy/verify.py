"""Does an exported file reproduce its model? ONNX Runtime's output against PyTorch's, with stated tolerances.

No Lightning here. fp32 files are checked against the (physically smaller) float model within 1e-4
relative and top-1 agreement 0.99; int8 files against the fake-quant model within
:func:`int8_tolerance` and top-1 agreement :data:`INT8_MIN_AGREEMENT`. A failure raises
:class:`~lightning_compress.errors.ExportVerificationError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor, nn

from lightning_compress.core.quantization import ActivationFakeQuant, WeightFakeQuant
from lightning_compress.errors import ExportVerificationError

FP32_MIN_AGREEMENT = 0.99


def fp32_tolerance(reference: Tensor) -> float:
    """How far ONNX Runtime's fp32 output may be from PyTorch's: 1e-4 relative to the output's scale."""
    return 1e-4 * max(1.0, float(reference.abs().max()))


def verify(
    session_outputs: np.ndarray, reference: Tensor, tolerance: float, name: str, min_agreement: float = 0.0
) -> dict[str, Any]:
    """Compare an ONNX Runtime output with the PyTorch reference; raise if it is out of tolerance.

    Raises:
        ExportVerificationError: ``max |difference| > tolerance`` or top-1 agreement below ``min_agreement``.
    """
    expected = reference.detach().float().cpu().numpy()
    diff = float(np.abs(session_outputs - expected).max())
    agreement = float((session_outputs.argmax(1) == expected.argmax(1)).mean())
    result = {"max_abs_diff": diff, "top1_agreement": agreement, "tolerance": tolerance}
    result["passed"] = bool(diff <= tolerance and agreement >= min_agreement)
    if not result["passed"]:
        raise ExportVerificationError(
            f"{name}: ONNX Runtime's output differs from the PyTorch model's: max |difference| {diff:.3g} "
            f"(tolerance {tolerance:.3g}), top-1 agreement {agreement:.3f} (at least {min_agreement})"
        )
    return result


INT8_MIN_AGREEMENT = 0.9


def int8_tolerance(model: nn.Module) -> float:
    """How far ONNX Runtime's int8 logits may be from the fake-quant model's: 2 output steps times sqrt(layers).

    The two round differently at each quantised layer (integer requantisation, int32 biases, the folded
    BatchNorm), one step at a time; those differences add up like a random walk with depth, so the
    bound grows with the square root of the number of quantised layers (2 steps for one layer).
    """
    layers = sum(1 for m in model.modules() if isinstance(m, WeightFakeQuant) and bool(m.enabled))
    return 2 * output_step(model) * max(1, layers) ** 0.5 + 1e-5


def output_step(model: nn.Module) -> float:
    """The quantisation step of the model's last output quantiser (the logits' resolution in int8)."""
    steps = []
    for quantizer in model.modules():
        if isinstance(quantizer, ActivationFakeQuant) and not quantizer.bypass:
            low, high = float(quantizer.min_val), float(quantizer.max_val)  # type: ignore[arg-type]
            if high >= low:
                steps.append((high - low) / (2**quantizer.bits - 1))
    return steps[-1] if steps else 0.0
