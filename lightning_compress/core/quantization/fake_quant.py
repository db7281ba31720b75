"""Fake-quantisation ops and modules: symmetric per-channel weights, affine per-tensor activations.

No Lightning, and nothing from torch's deprecated eager/FX quantisation package: the arithmetic of torch's
core fake-quant ops (``torch.fake_quantize_per_channel_affine`` / ``..._per_tensor_affine``, straight-through
gradients) in vectorised tensor ops with the parameters kept on the device, and the phases (enabled, observing,
learning) read from Python copies of their buffers, so a training step reads nothing back from the device; the
export turns them into ONNX ``QuantizeLinear``/``DequantizeLinear``.

- :class:`WeightFakeQuant` parametrizes a Conv/Linear ``weight``: symmetric, 2-8 bits, zero point
  0 (a weight pruned to zero stays exactly zero); with a BatchNorm it quantises the *folded* weight
  ``w * gamma / sqrt(running_var + eps)`` and divides the scale back out (Jacob et al. 2018);
- :class:`ActivationFakeQuant` quantises an activation per tensor (affine, unsigned) with a
  min/max or moving-average observer;
- with ``learned=True`` both hold their step size(s) as a parameter trained by gradient descent once
  :meth:`~WeightFakeQuant.start_learning` has set it from the observed value (LSQ, Esser et al. 2020:
  the straight-through estimator for the input, the step size's gradient scaled by
  ``1 / sqrt(elements * qmax)``; the values and gradients of torch's ``_fake_quantize_learnable_*`` ops);
- :class:`ConstantQDQ` / :func:`qdq` are the export-time fixed-range versions that become ONNX Q/DQ.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_compress.core.layers import BN_TYPES, Internal, bn_fold_factor

__all__ = [
    "BN_TYPES", "ActivationFakeQuant", "ConstantQDQ", "WeightFakeQuant", "bn_fold_factor", "fake_quant_weight", "qdq",
    "weight_qmax", "weight_scale",
]  # fmt: skip


WARMED_UP = 10**6  # the update count of an observer whose checkpoint predates the count: at the full decay
MIN_WEIGHT_STEP_SHARE = 0.01  # a learned weight step is at least this share of max|w| / qmax
MIN_STEP = 1e-8  # a learned step size is kept at least this large (gradient descent may push it through zero)


def weight_qmax(bits: int) -> int:
    """The largest integer of a symmetric ``bits``-bit weight: ``2**(bits-1) - 1``."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: Tensor, bits: int, per_channel: bool) -> Tensor:
    """Symmetric scale(s) ``max|w| / qmax`` (per output channel: shape ``(out,)``), never zero."""
    w = weight.detach()
    if per_channel:  # max and min along a dim: 5x faster on CPU than abs + amax, 20x than aminmax(dim=)
        flat = w.flatten(1)
        amax = torch.maximum(flat.amax(1), flat.amin(1).neg_())
    else:
        low, high = torch.aminmax(w)
        amax = torch.maximum(-low, high).reshape(1)
    return (amax / weight_qmax(bits)).clamp_min(1e-12).float()


def weight_range(bits: int) -> tuple[int, int]:
    """The integer range weights of ``bits`` bits are rounded into: int8's ``[-128, 127]`` at 8 bits (the
    ONNX-legal range), ``±qmax`` below (4 bits: ``[-7, 7]``, what the 4-bit storage holds)."""
    qmax = weight_qmax(bits)
    return (-128, 127) if bits == 8 else (-qmax, qmax)


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """One value (shape ``(1,)``) as is; one per output channel reshaped to broadcast along ``like``'s dim 0."""
    return values if values.numel() == 1 else values.reshape((-1,) + (1,) * (like.dim() - 1))


def _clamp_steps(steps: Tensor, zero: Tensor | None, low: int, high: int) -> Tensor:
    """``round(x / s)`` clamped so that, plus the zero point, it lies in ``[low, high]`` (a new tensor): for the
    integer-valued zero point the same numbers as clamping ``round(x / s) + zero`` and subtracting it again."""
    if zero is None:
        return steps.clamp(low, high)
    point = _broadcast(zero, steps).to(steps.dtype)
    return torch.clamp(steps, low - point, high - point)


class _FakeQuant(torch.autograd.Function):
    """``torch.fake_quantize_per_channel_affine`` (axis 0) / ``..._per_tensor_affine`` with tensor parameters, in
    vectorised elementwise ops: the same arithmetic (``round(x * (1 / scale)) + zero``, clamped, minus the zero
    point, times the scale) and the same straight-through gradient (zero where the rounded value was clipped), bit
    for bit. torch's CPU kernels for them run per element: the per-channel one took 22% of a resnet18 QAT step on
    2 cores, 2.2x the time of this one on a 512x512x3x3 weight; and the parameters stay on the device (no host
    read per call). ``zero`` ``None``: zero point 0."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero: Tensor | None, low: int, high: int) -> Tensor:
        step = _broadcast(scale, x)
        steps = torch.mul(x, 1.0 / step).round_()
        clamped = _clamp_steps(steps, zero, low, high)
        ctx.save_for_backward(clamped == steps)
        return clamped.mul_(step)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _LearnedStepFakeQuant(torch.autograd.Function):
    """LSQ fake quantisation (Esser et al. 2020) with a learned step (one, or one per output channel) in
    vectorised ops: the values of torch's ``_fake_quantize_learnable_per_{tensor,channel}_affine`` (bit for bit)
    and their gradients (the step's to float rounding: the sum runs in another order), without their host reads
    of the step and zero point on every call (``.item()``: a device sync per quantiser on CUDA), and 1.5-2x
    faster than their CPU kernels (a 512x512x3x3 weight per channel, fwd+bwd: 31-35 -> 17 ms; a 32x64x32x32
    activation: 34-36 -> 20-26 ms). The step's gradient, per element: ``round(x/s) - x/s`` inside the range,
    ``low - z`` / ``high - z`` where clipped (computed in the forward pass, where those numbers are at hand),
    summed against the upstream gradient and times ``factor``; the input's: straight through where not clipped.
    The zero point takes no gradient (a buffer here)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero: Tensor, low: int, high: int, factor: float) -> Tensor:
        step = _broadcast(scale, x)
        scaled = torch.mul(x, 1.0 / step)
        steps = torch.round(scaled)  # the integer minus the zero point
        clamped = _clamp_steps(steps, zero, low, high)
        inside = clamped == steps
        per_element = torch.where(inside, steps.sub_(scaled), clamped) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(inside, per_element)
        ctx.factor, ctx.per_tensor = factor, scale.numel() == 1
        return clamped.mul_(step).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        inside, per_element = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if per_element is not None:
            if ctx.per_tensor:
                summed = torch.dot(grad.reshape(-1).to(per_element.dtype), per_element.reshape(-1)).reshape(1)
            else:
                summed = torch.einsum("ij,ij->i", grad.flatten(1).to(per_element.dtype), per_element.flatten(1))
            grad_step = summed * ctx.factor
        return grad_x, grad_step, None, None, None, None


class _ObservedWeightFakeQuant(torch.autograd.Function):
    """The observed-scale weight quantisation in one function: the BatchNorm factor folded in, rounded on the
    grid of ``max|w| / qmax`` (per output channel, or one), the factor divided out again: the numbers of
    :func:`fake_quant_weight` on the folded weight (the export's integers), in place on one new tensor. At that
    scale nothing clips, so the straight-through gradient is the identity (``f * 1 / f``): nothing is saved and
    the backward pass costs nothing (autograd through the three steps took three passes over every weight)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, factor: Tensor | None, bits: int, per_channel: bool) -> Tensor:
        folded = weight if factor is None else weight * factor
        step = _broadcast(weight_scale(folded, bits, per_channel), folded)
        low, high = weight_range(bits)
        quantised = torch.mul(folded, 1.0 / step).round_().clamp_(low, high).mul_(step)
        return quantised if factor is None else quantised.div_(factor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


def fake_quant_weight(weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Symmetric fake quantisation with the given scale(s) (one, or one per output channel), rounded into
    :func:`weight_range`: with the observed scale ``max|w| / qmax`` nothing clips; a learned one may clip."""
    low, high = weight_range(bits)
    scale = scale.to(weight.device)
    if weight.dtype == torch.float32 and scale.dtype == torch.float32:
        return cast(Tensor, _FakeQuant.apply(weight, scale, None, low, high))
    zero = torch.zeros(scale.numel(), dtype=torch.int32, device=weight.device)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(weight, scale, zero[0], low, high)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, low, high)


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


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``factor`` (broadcast) backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: Tensor) -> Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor, None


class _Flagged(Internal, nn.Module):
    """A quantiser whose boolean phase buffers (``FLAGS``: in checkpoints, on the model's device) have Python
    copies that ``forward`` reads: no device-to-host read per call (on CUDA a sync per quantiser per step). Set
    them with :meth:`set_flag`; :meth:`refresh` reads the buffers back (done after a state dict loads), so write
    the buffers directly only when calling it after."""

    FLAGS: tuple[str, ...] = ()

    def set_flag(self, name: str, value: bool) -> None:
        """Set the phase buffer ``name`` and its Python copy."""
        cast(Tensor, getattr(self, name)).fill_(bool(value))
        self._flags[name] = bool(value)

    def flag(self, name: str) -> bool:
        """The Python copy of the phase buffer ``name``."""
        return self._flags[name]

    def refresh(self) -> None:
        """Read the phase buffers (and whatever else a subclass copies) back into their Python copies."""
        self._flags = {name: bool(self._buffers[name]) for name in self.FLAGS if name in self._buffers}

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()


class WeightFakeQuant(_Flagged):
    """Parametrization of a Conv/Linear ``weight``: its fake-quantised (BN-folded) value.

    The observed scale is ``max|w| / qmax`` of the folded weight, per output channel (or one), at every
    step. With ``learned``, once :meth:`start_learning` has run (buffer ``learning``), the step is
    ``ratio x max|w| / qmax`` with ``ratio`` a parameter in ``[MIN_WEIGHT_STEP_SHARE, 1]`` (started at 1),
    trained by LSQ's gradient (Esser et al. 2020) with its update rescaled so that a step of ``ratio`` moves
    the step size as LSQ's own update would. Held relative to ``max|w|`` because a Conv before a BatchNorm is
    free to change a channel's magnitude (the BatchNorm normalises it away): in a test, weights grew ~100x
    during QAT and an absolute learned step, left behind, clipped a channel to 1/100 of its range. A ratio
    above 1 would clip nothing and only round coarser.
    """

    FLAGS = ("enabled", "learning")

    def __init__(self, bits: int, per_channel: bool, learned: bool = False, channels: int = 1) -> None:
        super().__init__()
        self.bits = bits
        self.per_channel = per_channel
        self.learned = learned
        self.register_buffer("enabled", torch.tensor(False))
        if learned:
            self.ratio = nn.Parameter(torch.ones(channels if per_channel else 1))
            self.register_buffer("learning", torch.tensor(False))
        self._bn: list[nn.Module] = []  # a plain list: the BatchNorm stays owned by the user's model
        self.refresh()

    @property
    def bn(self) -> nn.Module | None:
        """The BatchNorm folded into this weight, if any."""
        return self._bn[0] if self._bn else None

    @property
    def scale_kind(self) -> str:
        """``learned`` once the step sizes train, else ``observed``."""
        return "learned" if self.learned and self.flag("learning") else "observed"

    def fold_factor(self, weight: Tensor) -> Tensor | None:
        """Per-channel factor broadcastable to ``weight``, or ``None`` without a BatchNorm."""
        if self.bn is None:
            return None
        return bn_fold_factor(self.bn).detach().reshape(-1, *([1] * (weight.dim() - 1)))

    def folded(self, weight: Tensor) -> Tensor:
        """``weight`` with the BatchNorm folded in (``weight`` itself without one)."""
        factor = self.fold_factor(weight)
        return weight if factor is None else weight * factor

    def scales(self, folded: Tensor) -> Tensor:
        """The scale(s) this quantiser uses for ``folded`` now (detached): learned, or ``max|w| / qmax``."""
        observed = weight_scale(folded, self.bits, self.per_channel)
        if self.scale_kind == "learned":
            return (self._ratio().detach().to(observed.device) * observed).clamp_min(MIN_STEP)
        return observed

    def _ratio(self) -> Tensor:
        return self.ratio.clamp(MIN_WEIGHT_STEP_SHARE, 1.0)

    @torch.no_grad()
    def start_learning(self) -> None:
        """Start learning the step sizes from the observed ones (``ratio`` 1)."""
        if self.learned:
            self.ratio.fill_(1.0)
            self.set_flag("learning", True)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.flag("enabled"):
            return weight
        factor = self.fold_factor(weight)
        if self.scale_kind == "observed" and weight.dtype == torch.float32:
            return cast(Tensor, _ObservedWeightFakeQuant.apply(weight, factor, self.bits, self.per_channel))
        folded = weight if factor is None else weight * factor
        if self.scale_kind == "learned":
            quantised = self._learned(folded)
        else:
            quantised = fake_quant_weight(folded, weight_scale(folded, self.bits, self.per_channel), self.bits)
        return quantised if factor is None else quantised / factor

    def _learned(self, folded: Tensor) -> Tensor:
        with torch.no_grad():  # a projected gradient step: the stored ratios stay within the bounds
            self.ratio.clamp_(MIN_WEIGHT_STEP_SHARE, 1.0)
        observed = weight_scale(folded, self.bits, self.per_channel)
        # d step / d ratio = observed: rescale the ratio's gradient by 1 / observed**2 so that a step of the
        # ratio changes the step size by LSQ's own update (the step's gradient times the learning rate)
        ratio = _GradScale.apply(self.ratio, observed.square().clamp_min(MIN_STEP).reciprocal())
        step = (ratio * observed).clamp_min(MIN_STEP)
        low, high = weight_range(self.bits)
        per_scale = folded.numel() // step.numel()  # LSQ: the step's gradient scaled by 1/sqrt(N * qmax)
        grad_factor = 1.0 / math.sqrt(per_scale * weight_qmax(self.bits))
        zero = torch.zeros(step.numel(), device=folded.device)
        return cast(Tensor, _LearnedStepFakeQuant.apply(folded, step, zero, low, high, grad_factor))


class ActivationFakeQuant(_Flagged):
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

    With ``learned``, :meth:`start_learning` turns the observed range into a step-size parameter ``scale``
    (the zero point, buffer ``zero_point``, stays where the observed range put it) that gradient descent
    trains from then on (buffer ``learning``); the observer no longer runs.
    """

    FLAGS = ("enabled", "observing", "learning")

    def __init__(self, bits: int = 8, observer: str = "ema", ema_decay: float = 0.99, learned: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.observer = observer
        self.ema_decay = ema_decay
        self.learned = learned
        if learned:
            self.scale = nn.Parameter(torch.ones(1))
            self.register_buffer("zero_point", torch.zeros(1))
            self.register_buffer("learning", torch.tensor(False))
        self.bypass = False  # set per process by share_ranges() / share_inputs(): another quantiser covers this tensor
        self.register_buffer("enabled", torch.tensor(False))
        self.register_buffer("observing", torch.tensor(True))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.watch = False  # count evaluation-mode clipping (set per process by watch_saturation())
        self.register_buffer("clipped", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64), persistent=False)
        self.refresh()

    def refresh(self) -> None:
        """Read the phase buffers and whether the range is set (``min_val`` finite) back into Python copies."""
        super().refresh()
        self._initialised = bool(torch.isfinite(cast(Tensor, self.min_val)))

    @property
    def initialised(self) -> bool:
        """Whether the observer has seen data (its Python copy: :meth:`refresh` after writing ``min_val``)."""
        return self._initialised

    @property
    def scale_kind(self) -> str:
        """``learned`` once the step size trains, else ``observed``."""
        return "learned" if self.learned and self.flag("learning") else "observed"

    @torch.no_grad()
    def start_learning(self) -> bool:
        """Start the learned step size from the observed range; ``False`` (nothing changes) where the observer
        has seen no data (a bypassed quantiser) or the step size is not learned."""
        if not self.learned or not self.initialised:
            return False
        scale, zero_point = self.qparams()
        self.scale.fill_(scale)
        cast(Tensor, self.zero_point).fill_(zero_point)
        self.set_flag("learning", True)
        return True

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the range from a batch."""
        low, high = torch.aminmax(x.detach())
        low, high = low.float(), high.float()
        min_val, max_val = cast(Tensor, self.min_val), cast(Tensor, self.max_val)
        if not self.initialised:
            min_val.copy_(low)
            max_val.copy_(high)
            self._initialised = True
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
        """(scale, zero point) of the observed range, or the learned step size and its zero point, as Python
        numbers (constants in an export): the values :meth:`forward` uses."""
        scale, zero_point = self.qparam_tensors()
        return float(scale), int(zero_point)

    def qparam_tensors(self) -> tuple[Tensor, Tensor]:
        """(scale, zero point) as float32 tensors of shape ``(1,)`` on the quantiser's device, computed there (no
        host read): the observed range ``[min(min_val, 0), max(max_val, 0)]`` over ``2**bits - 1`` steps (at
        least 1e-8) and its zero point rounded into the range, or the learned step size and its zero point."""
        if self.scale_kind == "learned":
            return self.scale.detach().clamp_min(MIN_STEP), cast(Tensor, self.zero_point)
        qmax = 2**self.bits - 1
        low = cast(Tensor, self.min_val).clamp(max=0.0).reshape(1)
        high = cast(Tensor, self.max_val).clamp(min=0.0).reshape(1)
        scale = ((high - low) / qmax).clamp_min(1e-8)
        return scale, torch.round(-low / scale).clamp_(0, qmax)

    def constant(self) -> ConstantQDQ:
        """The fixed-range equivalent, for export."""
        scale, zero_point = self.qparams()
        return ConstantQDQ(torch.tensor(scale), torch.tensor(zero_point, dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if self.bypass or not self.flag("enabled"):
            return x
        if self.scale_kind == "learned":
            return self._learned(x)
        if self.flag("observing") and self.training:
            self.observe(x)
        if not self.initialised:
            return x
        scale, zero_point = self.qparam_tensors()
        if self.watch and not self.training:
            self._count_clipped(x, scale, zero_point)
        if x.dtype == torch.float32:
            return cast(Tensor, _FakeQuant.apply(x, scale, zero_point, 0, 2**self.bits - 1))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.int(), 0, 2**self.bits - 1)

    @torch.no_grad()
    def _count_clipped(self, x: Tensor, scale: Tensor, zero_point: Tensor) -> None:
        low, high = (-zero_point - 0.5) * scale, (2**self.bits - 1 - zero_point + 0.5) * scale
        cast(Tensor, self.clipped).add_(((x < low) | (x > high)).sum())
        cast(Tensor, self.seen).add_(x.numel())

    def _learned(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.scale.clamp_(min=MIN_STEP)
        qmax = 2**self.bits - 1
        zero_point = cast(Tensor, self.zero_point)
        if self.watch and not self.training:
            self._count_clipped(x, self.scale.detach(), zero_point)
        features = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()  # LSQ: per sample
        grad_factor = 1.0 / math.sqrt(features * qmax)
        return cast(Tensor, _LearnedStepFakeQuant.apply(x, self.scale, zero_point, 0, qmax, grad_factor))
