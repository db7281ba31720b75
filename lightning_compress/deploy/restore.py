"""``restore``: rebuild a compressed model from a plain checkpoint, in a fresh process.

No Lightning and no pickled modules: the structure is read off the state dict's keys and shapes
(factorised layers, pruning masks, fake quantisation), the quantisation settings, per-layer weight bits
and BatchNorm pairs off the callback state whose ``"kind"`` is ``"quantization"`` when the file is a
Lightning checkpoint.

Example::

    model = restore(MyModule(), "epoch=9-step=1250.ckpt")   # your class, fresh instance
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_compress.core import low_rank, quantization
from lightning_compress.core.pruning import BIAS_MASK, WEIGHT_MASK, attach_masks
from lightning_compress.errors import CompressionConfigError

ModelT = TypeVar("ModelT", bound=nn.Module)
KIND = "kind"  # the key a compression callback's checkpoint state names its technique under
QUANTIZATION_KIND = "quantization"


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
        cause = _cause(error, checkpoint)
        raise CompressionConfigError(f"cannot read the checkpoint {str(checkpoint)!r}: {cause}") from error
    if not isinstance(loaded, Mapping):
        kind = type(loaded).__name__
        raise CompressionConfigError(f"the checkpoint {str(checkpoint)!r} holds a {kind}, not a state dict")
    return loaded


def _cause(error: Exception, path: str | os.PathLike[str]) -> str:
    """What went wrong reading a checkpoint, in one line; for a pickle that names code, the globals it names
    first (torch's message puts them after a paragraph about ``weights_only``, or names only an opcode)."""
    text = " ".join(str(error).split())
    if isinstance(error, pickle.UnpicklingError):
        named = [name for name in pickle_globals(path) if not name.startswith(SAFE_GLOBALS)]
        if named:
            return (
                f"it names code to run ({', '.join(named[:3])}); refused: checkpoints are read with "
                "weights_only=True, never unpickled. HINT: save a plain state dict or a Lightning checkpoint"
            )
    return f"{type(error).__name__}: {text[:300]}"


SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "_codecs.encode", "numpy.")


def pickle_globals(path: str | os.PathLike[str]) -> list[str]:
    """The ``module.name`` globals a pickle (plain, or a ``torch.save`` zip's ``data.pkl``) would import, read
    with :mod:`pickletools` (nothing is executed); ``[]`` when the file cannot be read as one."""
    try:
        data = Path(path).read_bytes()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        names: list[str] = []
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle we can read: the caller says what torch said
        return []
    return list(dict.fromkeys(names))


def callback_state(checkpoint: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """The first compression callback state of ``kind`` in a Lightning checkpoint, or ``{}``.

    States carry their kind under ``"kind"``; a quantisation state written before that key existed
    is recognised by its own keys (``config`` and ``bn_pairs``).
    """
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, Mapping):
            continue
        legacy = KIND not in state and kind == QUANTIZATION_KIND and {"config", "bn_pairs"} <= set(state)
        if state.get(KIND) == kind or legacy:
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
    state = rebuild_structure(model, loaded, quant_config)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        cause = str(error)[:600].strip().rstrip(".")
        raise CompressionConfigError(
            f"the checkpoint's weights do not fit {type(model).__name__}: {cause}. HINT: pass a fresh instance of "
            "the class that was trained, built with the same arguments"
        ) from error
    return model


def rebuild_structure(
    model: nn.Module, loaded: Mapping[str, Any], quant_config: quantization.QuantConfig | None = None
) -> Mapping[str, Any]:
    """What :func:`restore` does before loading the weights: factorised layers, pruning masks and fake
    quantisation rebuilt in ``model`` from a loaded checkpoint's keys; returns its state dict. Also what
    :class:`lightning_compress.CompressedCheckpointMixin` runs in ``on_load_checkpoint``."""
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
        qat = callback_state(loaded, QUANTIZATION_KIND)
        config = quant_config or quantization.QuantConfig.from_dict(qat.get("config") or {})
        quantization.attach(model, config, include=quantized)
        quantization.set_weight_bits(model, dict(qat.get("layer_bits", {})))  # mixed precision, per layer
        quantization.keep_in_float(model, list(qat.get("float_layers", [])))  # a plan's float layers
        quantization.link_batchnorms(model, dict(qat.get("bn_pairs", {})))
    return state
