"""Quantisation-aware training core: fake quantisation of Conv/Linear weights and activations.

No Lightning, and nothing from torch's deprecated eager/FX quantisation package: built on torch's core fake-quant ops
(``torch.fake_quantize_per_channel_affine`` / ``..._per_tensor_affine``, straight-through
gradients), which export to ONNX ``QuantizeLinear``/``DequantizeLinear``.

What :func:`attach` puts on every selected layer, without replacing any ``forward``:

- a weight parametrization (:class:`WeightFakeQuant`): symmetric, per output channel by default,
  2–8 bits, zero point 0, so a weight pruned to zero stays exactly zero. When a BatchNorm follows
  the layer it quantises the *folded* weight ``w * gamma / sqrt(running_var + eps)`` and divides the
  scale back out, so training sees the quantisation error of the deployed, BN-folded weight
  (Jacob et al. 2018; BN keeps normalising with batch statistics until it is frozen);
- an input and an output :class:`ActivationFakeQuant` (per tensor, affine, unsigned), run by a
  forward pre-hook and a forward hook (on the following BatchNorm when the layer is folded), so the
  exported graph has a quantised input and output around every Conv/Linear, which ONNX Runtime
  fuses into integer kernels.

Everything is attached disabled; :func:`enable` turns it on (the callback does at ``start_epoch``),
so checkpoints have the same keys before and during QAT.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    >>> layers = attach(model, QuantConfig(weight_bits=4))
    >>> enable(model)
    >>> model(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 4, 6, 6])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of
from lightning_compress.pruning import select_layers

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
OBSERVERS = ("minmax", "ema")
INPUT_QUANT = "input_quant"
OUTPUT_QUANT = "output_quant"


@dataclass(frozen=True)
class QuantConfig:
    """How to fake-quantise.

    Args:
        weight_bits: weight bits, 2–8 (symmetric, zero point 0, range ``±(2**(bits-1) - 1)``; stored
            as int8 in an exported model).
        activation_bits: activation bits: 8 (affine, unsigned).
        per_channel: one weight scale per output channel (else one per tensor).
        observer: ``minmax`` (running min/max of all batches) or ``ema`` (moving average of each
            batch's min/max, Krishnamoorthi 2018).
        ema_decay: the moving average's decay for ``ema``.
        fold_bn: quantise Conv weights with the following BatchNorm folded in.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    observer: str = "ema"
    ema_decay: float = 0.99
    fold_bn: bool = True

    def __post_init__(self) -> None:
        bits = self.weight_bits
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
            raise config_error("weight_bits", "an integer from 2 to 8", bits)
        if self.activation_bits != 8 or isinstance(self.activation_bits, bool):
            allowed = "8 (activations are uint8 in the exported model)"
            raise config_error("activation_bits", allowed, self.activation_bits)
        if self.observer not in OBSERVERS:
            hint = did_you_mean(str(self.observer), OBSERVERS)
            raise config_error("observer", one_of(OBSERVERS), self.observer, hint)
        if not isinstance(self.ema_decay, float) or not 0.0 < self.ema_decay < 1.0:
            raise config_error("ema_decay", "a float in (0, 1)", self.ema_decay)
        for name in ("per_channel", "fold_bn"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(name, "True or False", getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Build from a plain dict; unknown keys are an error naming the known ones."""
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise config_error("quantization key", one_of(sorted(known)), key, did_you_mean(key, known))
        return cls(**data)


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


class ConstantQDQ(nn.Module):
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


def bn_fold_factor(bn: nn.Module) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` of a BatchNorm: what folding multiplies each output channel by."""
    var = cast(Tensor, bn.running_var)
    factor = torch.rsqrt(var + cast(float, bn.eps))
    if bn.weight is not None:
        factor = factor * cast(Tensor, bn.weight)
    # A zero factor (gamma pruned to 0) would divide by zero: that channel is quantised unfolded.
    return torch.where(factor.abs() < 1e-12, torch.ones_like(factor), factor)


class WeightFakeQuant(nn.Module):
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


class ActivationFakeQuant(nn.Module):
    """Per-tensor affine fake quantisation of an activation, with a min/max observer.

    Buffers (so checkpoints hold them): ``enabled``, ``observing``, ``min_val``, ``max_val``.
    The range always includes 0, so zero padding and ReLU zeros are exact.
    """

    def __init__(self, bits: int = 8, observer: str = "ema", ema_decay: float = 0.99) -> None:
        super().__init__()
        self.bits = bits
        self.observer = observer
        self.ema_decay = ema_decay
        self.bypass = False  # set per process by share_ranges(): another quantiser covers this tensor
        self.register_buffer("enabled", torch.tensor(False))
        self.register_buffer("observing", torch.tensor(True))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

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
            min_val.lerp_(low, 1 - self.ema_decay)
            max_val.lerp_(high, 1 - self.ema_decay)

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
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 2**self.bits - 1)


def _quantise_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, INPUT_QUANT)(args[0]), *args[1:])


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
        ``{name: layer}`` of the quantised layers. Idempotent: attached layers are left as they are.

    Raises:
        CompressionConfigError: no layer selected.
    """
    config = config or QuantConfig()
    layers = select_layers(model, include, exclude, QUANTIZABLE_TYPES)
    if not layers:
        raise CompressionConfigError(
            f"nothing to quantise in {type(model).__name__}: no Conv/Linear layer selected "
            f"(include={include}, exclude={exclude})"
        )
    for layer in layers.values():
        if is_attached(layer):
            continue
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant(config.weight_bits, config.per_channel))
        layer.add_module(INPUT_QUANT, ActivationFakeQuant(config.activation_bits, config.observer, config.ema_decay))
        layer.register_forward_pre_hook(_quantise_input)
        output_quant = ActivationFakeQuant(config.activation_bits, config.observer, config.ema_decay)
        set_output_quantizer(layer, layer, output_quant)
    if config.fold_bn and bn_pairs:
        link_batchnorms(model, bn_pairs)
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


def sync_observers(model: nn.Module) -> None:
    """Under ``torch.distributed``, give every rank the union of all ranks' observed ranges (one all-reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    observers = [getattr(m, a) for m in quantized_layers(model).values() for a in (INPUT_QUANT, OUTPUT_QUANT)]
    if not observers or torch.distributed.get_world_size() < 2:
        return
    bounds = torch.stack([torch.stack([-o.min_val, o.max_val]) for o in observers])
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    for observer, (neg_min, max_val) in zip(observers, bounds, strict=True):
        observer.min_val.copy_(-neg_min)
        observer.max_val.copy_(max_val)


def is_attached(layer: nn.Module) -> bool:
    """Whether ``layer`` carries this module's fake quantisation."""
    return isinstance(getattr(layer, INPUT_QUANT, None), ActivationFakeQuant)


def weight_quantizer(layer: nn.Module) -> WeightFakeQuant:
    """The :class:`WeightFakeQuant` parametrizing ``layer.weight``."""
    return cast(WeightFakeQuant, layer.parametrizations.weight[0])  # type: ignore[union-attr,index]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer of ``model`` with fake quantisation attached."""
    return {name: m for name, m in model.named_modules() if is_attached(m)}


def _quantizers(model: nn.Module) -> Iterator[nn.Module]:
    for layer in quantized_layers(model).values():
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
    for layer in quantized_layers(model).values():
        owner = weight_quantizer(layer).bn or layer
        unparametrize_weight(layer)
        _remove_hooks(layer._forward_pre_hooks, _quantise_input)
        _remove_hooks(owner._forward_hooks, _quantise_output)
        owner.__dict__.pop(_OUTPUT_QUANT_REF, None)
        for attr in (INPUT_QUANT, OUTPUT_QUANT):
            delattr(layer, attr)
    return model


def enable(model: nn.Module, on: bool = True) -> None:
    """Turn fake quantisation on (or off) everywhere in ``model``."""
    for quantizer in _quantizers(model):
        cast(Tensor, quantizer.enabled).fill_(on)


def freeze_observers(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) updating the activation ranges."""
    for layer in quantized_layers(model).values():
        for attr in (INPUT_QUANT, OUTPUT_QUANT):
            cast(Tensor, getattr(layer, attr).observing).fill_(not frozen)


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
    return ranges
