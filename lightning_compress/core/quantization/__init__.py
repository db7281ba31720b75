"""Quantisation-aware training core: settings, fake-quant ops, and attaching them to a model.

No Lightning, and nothing from torch's deprecated eager/FX quantisation package. Three modules:
:mod:`~lightning_compress.core.quantization.config` (:class:`QuantConfig`),
:mod:`~lightning_compress.core.quantization.fake_quant` (the ops and quantiser modules) and
:mod:`~lightning_compress.core.quantization.attachment` (putting them on a model's Conv/Linear layers
without replacing ``forward``, enabling, freezing, stripping). Every public name of the three is
importable from here.
"""

from lightning_compress.core.quantization.attachment import (
    INPUT_QUANT,
    OUTPUT_QUANT,
    attach,
    enable,
    folded_batchnorms,
    freeze_bn,
    freeze_observers,
    is_attached,
    keep_in_float,
    leave_uncalled_in_float,
    link_batchnorms,
    observer_ranges,
    quantized_layers,
    saturation,
    set_input_quantizer,
    set_output_quantizer,
    set_weight_bits,
    share_ranges,
    shared_range_layers,
    strip,
    sync_observers,
    unparametrize_weight,
    watch_saturation,
    weight_bits,
    weight_quantizer,
)
from lightning_compress.core.quantization.config import OBSERVERS, QuantConfig, check_weight_bits
from lightning_compress.core.quantization.fake_quant import (
    BN_TYPES,
    ActivationFakeQuant,
    ConstantQDQ,
    WeightFakeQuant,
    bn_fold_factor,
    fake_quant_weight,
    qdq,
    weight_qmax,
    weight_scale,
)

__all__ = [
    "BN_TYPES",
    "INPUT_QUANT",
    "OBSERVERS",
    "OUTPUT_QUANT",
    "ActivationFakeQuant",
    "ConstantQDQ",
    "QuantConfig",
    "WeightFakeQuant",
    "attach",
    "bn_fold_factor",
    "check_weight_bits",
    "enable",
    "fake_quant_weight",
    "folded_batchnorms",
    "freeze_bn",
    "freeze_observers",
    "is_attached",
    "keep_in_float",
    "leave_uncalled_in_float",
    "link_batchnorms",
    "observer_ranges",
    "qdq",
    "quantized_layers",
    "saturation",
    "set_input_quantizer",
    "set_output_quantizer",
    "set_weight_bits",
    "share_ranges",
    "shared_range_layers",
    "strip",
    "sync_observers",
    "unparametrize_weight",
    "watch_saturation",
    "weight_bits",
    "weight_qmax",
    "weight_quantizer",
    "weight_scale",
]
