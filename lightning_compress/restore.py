"""``restore``: rebuild a compressed model from a plain checkpoint, in a fresh process.

No pickled modules: the structure is read off the state dict's keys and shapes (factorised layers,
pruning masks, fake quantisation), the quantisation settings and BatchNorm pairs off the QAT
callback's state when the file is a Lightning checkpoint.

Example::

    model = restore(MyModule(), "epoch=9-step=1250.ckpt")   # your class, fresh instance
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_compress import low_rank, quantization
from lightning_compress.errors import CompressionConfigError
from lightning_compress.pruning import BIAS_MASK, WEIGHT_MASK, attach_masks

ModelT = TypeVar("ModelT", bound=nn.Module)
QAT_STATE = "QuantizationAwareTraining"


def read_checkpoint(checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    """A checkpoint file read with ``weights_only=True`` (or the mapping itself).

    Raises:
        CompressionConfigError: no such file, or not a checkpoint.
    """
    if isinstance(checkpoint, Mapping):
        return checkpoint
    try:
        loaded = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    except Exception as error:  # missing file, not a checkpoint, unsafe pickle: name the file and the cause
        raise CompressionConfigError(
            f"cannot read the checkpoint {str(checkpoint)!r}: {type(error).__name__}: {str(error)[:300]}"
        ) from error
    if not isinstance(loaded, Mapping):
        kind = type(loaded).__name__
        raise CompressionConfigError(f"the checkpoint {str(checkpoint)!r} holds a {kind}, not a state dict")
    return loaded


def _qat_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith(QAT_STATE) and isinstance(state, Mapping):
            return state
    return {}


def restore(
    model: ModelT,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    strict: bool = True,
    quant_config: quantization.QuantConfig | None = None,
) -> ModelT:
    """Rebuild every compressed structure ``checkpoint`` holds into ``model`` and load its weights.

    Args:
        model: a fresh instance of the class that was trained (a ``LightningModule`` for a Lightning
            checkpoint, or the module whose ``state_dict`` was saved).
        checkpoint: a Lightning checkpoint or a plain state-dict file (read with ``weights_only=True``),
            or an already loaded one.
        strict: as in ``load_state_dict``.
        quant_config: the fake-quantisation settings; default the QAT callback's from the checkpoint,
            else 8-bit per-channel.

    Returns:
        ``model``, changed in place: factorised layers, pruning masks and fake quantisation as trained.

    Raises:
        CompressionConfigError: an unreadable file, or weights that do not fit ``model``.
    """
    loaded = read_checkpoint(checkpoint)
    state = loaded.get("state_dict", loaded)
    low_rank.rebuild(model, state)
    modules = dict(model.named_modules())

    def has(name: str, key: str) -> bool:
        return f"{name}.{key}" in state if name else key in state

    for with_bias in (False, True):
        masked = {n: m for n, m in modules.items() if has(n, WEIGHT_MASK) and has(n, BIAS_MASK) == with_bias}
        attach_masks(masked, with_bias=with_bias)
    quantized = sorted(n for n in modules if has(n, "parametrizations.weight.original"))
    if quantized:
        qat = _qat_state(loaded)
        config = quant_config or quantization.QuantConfig.from_dict(qat.get("config") or {})
        quantization.attach(model, config, include=quantized)
        quantization.link_batchnorms(model, dict(qat.get("bn_pairs", {})))
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        cause = str(error)[:600].strip().rstrip(".")
        raise CompressionConfigError(
            f"the checkpoint's weights do not fit {type(model).__name__}: {cause}. HINT: pass a fresh instance of "
            "the class that was trained, built with the same arguments"
        ) from error
    return model
