"""Post-training quantisation: fake quantisation attached to a trained model and calibrated on a few batches.

No Lightning, no training. :func:`calibrate` does what QAT's first steps do, without a gradient step:

1. optionally :func:`~lightning_compress.core.equalization.equalize` (cross-layer equalisation) the float model;
2. attach fake quantisation (the same quantisers QAT trains with: per-channel symmetric weights with their
   BatchNorm folded, per-tensor affine activations, ranges shared where one tensor feeds the next layer);
3. observe the activation ranges on the calibration batches (min/max by default, as ONNX Runtime's
   ``quantize_static`` does), BatchNorm statistics untouched;
4. optionally correct the bias (Nagel et al. 2019, empirical): the mean error that weight quantisation puts
   on each output channel over the calibration batches, ``E[(W_q - W) x]``, subtracted from the layer's bias
   (or, for a convolution without one, added to its BatchNorm's running mean); then the ranges are observed
   again on the corrected model.

The model that comes out is an ordinary fake-quantised model: :func:`lightning_compress.export_onnx` with
``int8=True`` writes and verifies its int8 file, :func:`lightning_compress.restore` rebuilds it from a
checkpoint holding :meth:`Calibration.state`, and QAT can go on training it.

Example::

    done = calibrate(model, [images[i : i + 32] for i in range(0, 256, 32)], equalize=True, bias_correction=True)
    export_onnx(model, images[:1], "model.int8.onnx", int8=True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_compress.core.equalization import Equalized
from lightning_compress.core.equalization import equalize as equalize_layers
from lightning_compress.core.graph import find_bn_pairs
from lightning_compress.core.layers import per_layer, select_layers
from lightning_compress.core.quantization.attachment import (
    attach,
    enable,
    freeze_observers,
    is_attached,
    leave_uncalled_in_float,
    link_batchnorms,
    move_to_tails,
    quantize_sums,
    quantized_layers,
    set_weight_bits,
    share_inputs,
    share_ranges,
    weight_bits,
    weight_quantizer,
)
from lightning_compress.core.quantization.config import QuantConfig
from lightning_compress.core.quantization.fake_quant import ActivationFakeQuant
from lightning_compress.errors import CompressionConfigError

__all__ = ["PTQ_CONFIG", "Calibration", "calibrate", "correct_bias", "observe", "reset_observers"]

PTQ_CONFIG = QuantConfig(observer="minmax")  # ranges over all calibration batches, as quantize_static's MinMax


@dataclass
class Calibration:
    """What :func:`calibrate` did, and what a checkpoint needs to rebuild the model (:meth:`state`).

    Attributes:
        config: the quantisation settings.
        layers: the quantised layers' names.
        bits: ``{layer: weight bits}``.
        bn_pairs: ``{layer: BatchNorm}`` folded.
        batches: calibration batches observed; ``samples`` their samples.
        equalized: what cross-layer equalisation did (``None``: not asked for).
        bias_corrected: ``{layer: largest absolute correction}``; ``uncorrected`` names the layers with
            neither a bias nor a BatchNorm to take one.
        float_layers: quantisable layers left in float (never called: their weight is read directly).
        sums: the modules whose residual sum is quantised (:func:`~lightning_compress.core.quantization.quantize_sums`).
    """

    config: QuantConfig
    layers: list[str]
    bits: dict[str, int]
    bn_pairs: dict[str, str]
    batches: int
    samples: int
    equalized: Equalized | None = None
    bias_corrected: dict[str, float] = field(default_factory=dict)
    uncorrected: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    sums: list[str] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        """The checkpoint state :func:`lightning_compress.restore` reads (the ``quantization`` kind)."""
        return {
            "kind": "quantization",
            "config": self.config.to_dict(),
            "bn_pairs": dict(self.bn_pairs),
            "layer_bits": dict(self.bits),
            "float_layers": list(self.float_layers),
            "calibration": {"batches": self.batches, "samples": self.samples, "scales": "observed"},
        }

    def layer_rows(self) -> list[dict[str, Any]]:
        """One row per quantised layer: bits, scale kind, calibration batches, equalisation and bias correction."""
        equalized = {n for pair in (self.equalized.pairs if self.equalized else []) for n in pair}
        return [
            {
                "layer": name,
                "weight_bits": self.bits.get(name, self.config.weight_bits),
                "scales": "observed",
                "calibration_batches": self.batches,
                "equalized": name in equalized,
                "bias_correction": self.bias_corrected.get(name),
            }
            for name in self.layers
        ]


def _inputs(batches: Sequence[Any]) -> list[Tensor]:
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise CompressionConfigError(
            "calibration needs at least one batch of model inputs (tensors, or (input, label) pairs); got "
            f"{len(inputs)} batch(es) of {sorted({type(x).__name__ for x in inputs}) or 'nothing'}"
        )
    return cast(list[Tensor], inputs)


def reset_observers(model: nn.Module) -> None:
    """Forget every observed activation range of ``model`` (the next observation starts afresh)."""
    for module in model.modules():
        if isinstance(module, ActivationFakeQuant):
            cast(Tensor, module.min_val).fill_(float("inf"))
            cast(Tensor, module.max_val).fill_(float("-inf"))
            cast(Tensor, module.updates).zero_()
            module.refresh()


@torch.no_grad()
def observe(model: nn.Module, batches: Sequence[Tensor]) -> int:
    """Run ``batches`` through ``model`` with only the activation observers in training mode (BatchNorm,
    dropout and everything else in eval mode, every module's mode restored after); return the samples seen."""
    modes = {m: m.training for m in model.modules()}
    observing = {
        q: q.flag("observing") for q in model.modules() if isinstance(q, ActivationFakeQuant)
    }  # fmt: skip
    try:
        for module in model.modules():
            module.train(isinstance(module, ActivationFakeQuant))
        freeze_observers(model, False)
        samples = 0
        for x in batches:
            model(x)
            samples += len(x)
    finally:
        for module, mode in modes.items():
            module.train(mode)
        for quantizer, was in observing.items():
            quantizer.set_flag("observing", was)
    return samples


@torch.no_grad()
def correct_bias(model: nn.Module, batches: Sequence[Tensor]) -> tuple[dict[str, float], list[str]]:
    """Empirical bias correction of every enabled fake-quantised layer of ``model``, in place.

    Over ``batches`` (eval mode), for each layer the mean over samples and positions of ``(W_q - W) x`` per
    output channel, where ``x`` is the input the layer receives in the quantised model and ``W_q`` its
    fake-quantised (BatchNorm-folded, then unfolded) weight: the shift weight quantisation adds to that channel.
    It is subtracted from the layer's bias, or added to its folded BatchNorm's running mean (the same shift,
    before normalisation). Returns ``{layer: largest absolute correction}`` and the layers with neither.
    """
    layers = {n: m for n, m in quantized_layers(model).items() if weight_quantizer(m).flag("enabled")}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)

    def hook(name: str) -> Any:
        def record(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            x = args[0]
            delta = cast(Tensor, layer.weight) - cast(Tensor, layer.parametrizations.weight.original)  # type: ignore[union-attr]
            if isinstance(layer, nn.Linear):
                error = nn.functional.linear(x, delta).reshape(-1, delta.shape[0]).sum(0)
                seen = error.new_tensor(x.numel() // x.shape[-1])
            else:
                out = layer._conv_forward(x, delta, None)  # type: ignore[operator]
                error = out.transpose(0, 1).reshape(out.shape[1], -1).sum(1)
                seen = error.new_tensor(out.numel() // out.shape[1])
            sums[name] = sums.get(name, 0) + error.double()
            counts[name] += int(seen)

        return record

    # after the input quantiser (a pre-hook registered first), before the output one: the layer's own call
    handles = [layer.register_forward_hook(hook(name), prepend=True) for name, layer in layers.items()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    corrected: dict[str, float] = {}
    uncorrected: list[str] = []
    for name, layer in layers.items():
        if name not in sums or not counts[name]:
            continue
        original = cast(Tensor, layer.parametrizations.weight.original)  # type: ignore[union-attr]
        shift = (sums[name] / counts[name]).to(original.dtype)
        bn = weight_quantizer(layer).bn
        if layer.bias is not None:
            cast(Tensor, layer.bias).sub_(shift)
        elif bn is not None and bn.running_mean is not None:
            cast(Tensor, bn.running_mean).add_(shift)
        else:
            uncorrected.append(name)
            continue
        corrected[name] = float(shift.abs().max())
    return corrected, uncorrected


def calibrate(
    model: nn.Module,
    batches: Sequence[Any],
    config: QuantConfig | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    layer_bits: Mapping[str, int] | None = None,
    equalize: bool = False,
    bias_correction: bool = False,
) -> Calibration:
    """Post-training quantisation of ``model`` in place (see the module's notes).

    Args:
        model: a trained float model (no fake quantisation attached yet).
        batches: calibration batches: model inputs, or ``(input, label)`` pairs (labels unused).
        config: the quantisation settings (default :data:`PTQ_CONFIG`: 8 bits, per channel, min/max ranges).
        include: module-name patterns to quantise (default every Conv and Linear).
        exclude: module-name patterns to keep in float.
        layer_bits: ``{name or pattern: weight bits}`` of layers with a width of their own.
        equalize: cross-layer equalisation first.
        bias_correction: correct the bias that weight quantisation shifts.

    Returns:
        What was done (:class:`Calibration`); the model is left in eval mode, quantisation enabled, ranges fixed.

    Raises:
        CompressionConfigError: no batch, fake quantisation already attached, no layer to quantise, or a
            ``layer_bits`` name that matches no quantised layer.
    """
    inputs = _inputs(batches)
    config = config or PTQ_CONFIG
    if any(is_attached(m) for m in model.modules()):
        raise CompressionConfigError(
            f"{type(model).__name__} already carries fake quantisation (from QAT or an earlier calibration): "
            "post-training calibration starts from a float model. HINT: restore the float checkpoint"
        )
    model.eval()
    example = inputs[0][:2]
    equalized = equalize_layers(model, inputs) if equalize else None
    layers = attach(model, config, include, exclude)
    others = [name for name in select_layers(model) if name not in layers]
    bits = per_layer("layer_bits", dict(layer_bits or {}), layers, left_out=(others, "left in float"))
    set_weight_bits(model, bits)
    bn_pairs = find_bn_pairs(model, layers, example) if config.fold_bn else {}
    link_batchnorms(model, bn_pairs)
    enable(model)
    floats = leave_uncalled_in_float(model, example)
    share_ranges(model, example)
    move_to_tails(model, example)
    sums = quantize_sums(model, example)
    share_inputs(model, example)
    samples = observe(model, inputs)
    done = Calibration(config, sorted(layers), weight_bits(model), bn_pairs, len(inputs), samples, equalized)
    done.float_layers, done.sums = floats, sums
    if bias_correction:
        done.bias_corrected, done.uncorrected = correct_bias(model, inputs)
        reset_observers(model)
        observe(model, inputs)
    freeze_observers(model)
    return done
