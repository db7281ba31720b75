"""Fake-quantisation ops and modules: symmetric per-channel weights, affine per-tensor activations.

No Lightning, and nothing from torch's deprecated eager/FX quantisation package: built on torch's
core fake-quant ops (``torch.fake_quantize_per_channel_affine`` / ``..._per_tensor_affine``,
straight-through gradients), which export to ONNX ``QuantizeLinear``/``DequantizeLinear``.

- :class:`WeightFakeQuant` parametrizes a Conv/Linear ``weight``: symmetric, 2-8 bits, zero point
  0 (a weight pruned to zero stays exactly zero); with a BatchNorm it quantises the *folded* weight
  ``w * gamma / sqrt(running_var + eps)`` and divides the scale back out (Jacob et al. 2018);
- :class:`ActivationFakeQuant` quantises an activation per tensor (affine, unsigned) with a
  min/max or moving-average observer;
- :class:`ConstantQDQ` / :func:`qdq` are the export-time fixed-range versions that become ONNX Q/DQ.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from lightning_compress.core.layers import BN_TYPES, Internal, bn_fold_factor

__all__ = [
    "BN_TYPES", "ActivationFakeQuant", "ConstantQDQ", "WeightFakeQuant", "bn_fold_factor", "fake_quant_weight", "qdq",
    "weight_qmax", "weight_scale",
]  # fmt: skip


WARMED_UP = 10**6  # the update count of an observer whose checkpoint predates the count: at the full decay


def weight_qmax(bits: int) -> int:
    """The largest integer of a symmetric ``bits``-bit weight: ``2**(bits-1) - 1``."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: Tensor, bits: int, per_channel: bool) -> Tensor:
    """Symmetric scale(s) ``max|w| / qmax`` (per output channel: shape ``(out,)``), never zero."""
    w = weight.detach()
    amax = w.abs().flatten(1).amax(1) if per_channel else w.abs().amax().reshape(1)
    return (amax / weight_qmax(bits)).clamp_min(1e-12).float()


def fake_quant_weight(weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Symmetric fake quantisation with the given scale(s) (one, or one per output channel).

    The ONNX-legal range ``[-128, 127]`` is used for the op itself: values beyond ``±qmax`` cannot
    occur because the scale is ``max|w| / qmax`` (or the weight already lies on that grid).
    """
    qmax = weight_qmax(bits)
    low, high = (-128, 127) if bits == 8 else (-qmax, qmax)
    zero = torch.zeros(scale.numel(), dtype=torch.int32, device=weight.device)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(weight, scale.to(weight.device), zero[0], low, high)
    return torch.fake_quantize_per_channel_affine(weight, scale.to(weight.device), zero, 0, low, high)


@torch.library.custom_op("lightning_compress::qdq", mutates_args=())
def qdq(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int) -> Tensor:
    """Quantise-dequantise with constant parameters: the op an export turns into ONNX Q/DQ.

    ``zero_point``'s dtype (int8 or uint8) is the integer type of the exported tensor; a scale of
    one element is per tensor, else per ``axis``.
    """
    zero = zero_point.to(torch.int32)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero, axis, qmin, qmax)


@qdq.register_fake
def _qdq_fake(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(x)


class ConstantQDQ(Internal, nn.Module):
    """Export-time fake quantisation with constant (buffer) scale and zero point."""

    def __init__(self, scale: Tensor, zero_point: Tensor, axis: int = 0) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point)
        info = torch.iinfo(zero_point.dtype)
        self.qmin, self.qmax = info.min, info.max

    def forward(self, x: Tensor) -> Tensor:
        scale, zero_point = cast(Tensor, self.scale), cast(Tensor, self.zero_point)
        return cast(Tensor, qdq(x, scale, zero_point, self.axis, self.qmin, self.qmax))


class WeightFakeQuant(Internal, nn.Module):
    """Parametrization of a Conv/Linear ``weight``: its fake-quantised (BN-folded) value."""

    def __init__(self, bits: int, per_channel: bool) -> None:
        super().__init__()
        self.bits = bits
        self.per_channel = per_channel
        self.register_buffer("enabled", torch.tensor(False))
        self._bn: list[nn.Module] = []  # a plain list: the BatchNorm stays owned by the user's model

    @property
    def bn(self) -> nn.Module | None:
        """The BatchNorm folded into this weight, if any."""
        return self._bn[0] if self._bn else None

    def fold_factor(self, weight: Tensor) -> Tensor | None:
        """Per-channel factor broadcastable to ``weight``, or ``None`` without a BatchNorm."""
        if self.bn is None:
            return None
        return bn_fold_factor(self.bn).detach().reshape(-1, *([1] * (weight.dim() - 1)))

    def forward(self, weight: Tensor) -> Tensor:
        if not bool(self.enabled):
            return weight
        factor = self.fold_factor(weight)
        folded = weight if factor is None else weight * factor
        quantised = fake_quant_weight(folded, weight_scale(folded, self.bits, self.per_channel), self.bits)
        return quantised if factor is None else quantised / factor


class ActivationFakeQuant(Internal, nn.Module):
    """Per-tensor affine fake quantisation of an activation, with a min/max observer.

    Buffers (so checkpoints hold them): ``enabled``, ``observing``, ``min_val``, ``max_val``, ``updates``.
    The range always includes 0, so zero padding and ReLU zeros are exact. The ``ema`` observer's
    decay warms up, ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates (the rule of
    TensorFlow's ``ExponentialMovingAverage(num_updates=)``): at a constant 0.99 the range followed
    activations that grow while a model trains from scratch 1% a step, and after 6 epochs of 8 steps
    a small CNN's logits clipped in all of evaluation (observed [-1.1, 0.5], evaluated [-5.7, 3.8]).

    With ``watch`` set, evaluation-mode calls count the elements that fall outside the range
    (``clipped`` of ``seen``, on the tensor's device, not in checkpoints): ranges are observed in
    training mode, and evaluation (BatchNorm on running statistics) can put values far beyond them.
    """

    def __init__(self, bits: int = 8, observer: str = "ema", ema_decay: float = 0.99) -> None:
        super().__init__()
        self.bits = bits
        self.observer = observer
        self.ema_decay = ema_decay
        self.bypass = False  # set per process by share_ranges() / share_inputs(): another quantiser covers this tensor
        self.register_buffer("enabled", torch.tensor(False))
        self.register_buffer("observing", torch.tensor(True))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.watch = False  # count evaluation-mode clipping (set per process by watch_saturation())
        self.register_buffer("clipped", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    def initialised(self) -> bool:
        """Whether the observer has seen data."""
        return bool(torch.isfinite(cast(Tensor, self.min_val)))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the range from a batch."""
        low, high = x.detach().min().float(), x.detach().max().float()
        min_val, max_val = cast(Tensor, self.min_val), cast(Tensor, self.max_val)
        if not self.initialised:
            min_val.copy_(low)
            max_val.copy_(high)
        elif self.observer == "minmax":
            min_val.copy_(torch.minimum(min_val, low))
            max_val.copy_(torch.maximum(max_val, high))
        else:
            n = cast(Tensor, self.updates).float()
            weight = 1 - ((1 + n) / (10 + n)).clamp(max=self.ema_decay)
            min_val.lerp_(low, weight)
            max_val.lerp_(high, weight)
        cast(Tensor, self.updates).add_(1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:  # type: ignore[override]
        # a checkpoint from before the warm-up: its moving average ran at the full decay
        state_dict.setdefault(prefix + "updates", torch.tensor(WARMED_UP, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the observed range, as Python numbers (constants in an export)."""
        qmax = 2**self.bits - 1
        low = min(float(cast(Tensor, self.min_val)), 0.0)
        high = max(float(cast(Tensor, self.max_val)), 0.0)
        scale = max((high - low) / qmax, 1e-8)
        zero_point = int(min(qmax, max(0, round(-low / scale))))
        return scale, zero_point

    def constant(self) -> ConstantQDQ:
        """The fixed-range equivalent, for export."""
        scale, zero_point = self.qparams()
        return ConstantQDQ(torch.tensor(scale), torch.tensor(zero_point, dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if self.bypass or not bool(self.enabled):
            return x
        if bool(self.observing) and self.training:
            self.observe(x)
        if not self.initialised:
            return x
        scale, zero_point = self.qparams()
        if self.watch and not self.training:
            self._count_clipped(x, scale, zero_point)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 2**self.bits - 1)

    @torch.no_grad()
    def _count_clipped(self, x: Tensor, scale: float, zero_point: int) -> None:
        low, high = (-zero_point - 0.5) * scale, (2**self.bits - 1 - zero_point + 0.5) * scale
        cast(Tensor, self.clipped).add_(((x < low) | (x > high)).sum())
        cast(Tensor, self.seen).add_(x.numel())
