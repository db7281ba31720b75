"""What a model costs, counted from its tensors: parameters, non-zeros, bytes and MACs.

Example::

    >>> model = torch.nn.Linear(100, 10)
    >>> count_parameters(model)
    1010
    >>> summarize(model, torch.zeros(1, 100))["macs"]
    1000
"""

from __future__ import annotations

import io
import math
import statistics
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.layers import weight_of
from lightning_compress.core.pruning import BIAS_MASK, WEIGHT_MASK
from lightning_compress.errors import require

_MASK_BUFFERS = (WEIGHT_MASK, BIAS_MASK)


def model_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The tensors a deployed model needs: parameters and buffers, without pruning masks."""
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.rsplit(".", 1)[-1] in _MASK_BUFFERS or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def dense_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer stored densely (masks excluded)."""
    return sum(t.numel() * t.element_size() for _, t in model_tensors(model))


def sparse_bytes(model: nn.Module) -> int:
    """Bytes in a bitmap sparse format: per tensor, the non-zero values plus one bit per element.

    A tensor for which that is no saving is counted dense. This is what a sparse weight format
    (e.g. a bitmap-compressed checkpoint) really takes; see :func:`compressed_bytes` for a file.
    """
    total = 0
    for _, tensor in model_tensors(model):
        dense = tensor.numel() * tensor.element_size()
        nnz = int(torch.count_nonzero(tensor.detach()))
        total += min(dense, nnz * tensor.element_size() + math.ceil(tensor.numel() / 8))
    return total


def compressed_bytes(model: nn.Module, level: int = 9) -> int:
    """Bytes of the model's ``state_dict`` (masks excluded) saved with ``torch.save`` and zlib-compressed."""
    buffer = io.BytesIO()
    torch.save({name: t.detach().cpu() for name, t in model_tensors(model)}, buffer)
    return len(zlib.compress(buffer.getvalue(), level))


def _layer_macs(module: nn.Module, output: Tensor) -> tuple[int, int]:
    """(dense, non-zero-weight) multiply-accumulates of one Conv/Linear call."""
    weight = weight_of(module)
    nonzero = int(torch.count_nonzero(weight.detach()))
    if isinstance(module, nn.Linear):
        rows = output.numel() // output.shape[-1]  # one row per sample (and per token)
        return rows * weight.numel(), rows * nonzero
    # Conv: every weight is used once per output position of its output channel.
    positions = output.numel() // output.shape[1]
    return positions * weight.numel(), positions * nonzero


def count_macs(model: nn.Module, example_input: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``example_input``, dense and counting non-zero weights.

    Counts Conv and Linear layers (where nearly all the compute of a CNN is); normalisation,
    activations and pooling are not counted.

    Args:
        model: the model; it is run once in eval mode under ``torch.no_grad``.
        example_input: a tensor (or tuple of positional arguments) for ``model``.

    Returns:
        ``(dense_macs, sparse_macs)``.
    """
    totals = [0, 0]

    def hook(module: nn.Module, _inputs: Any, output: Tensor) -> None:
        dense, sparse = _layer_macs(module, output)
        totals[0] += dense
        totals[1] += sparse

    types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, types)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return totals[0], totals[1]


def summarize(model: nn.Module, example_input: Any | None = None) -> dict[str, int]:
    """All the figures at once: ``params``, ``nonzero``, ``dense_bytes``, ``sparse_bytes``,
    ``compressed_bytes`` and, with an ``example_input`` (batch of one), ``macs`` and ``sparse_macs``."""
    figures = {
        "params": count_parameters(model),
        "nonzero": count_nonzero(model),
        "dense_bytes": dense_bytes(model),
        "sparse_bytes": sparse_bytes(model),
        "compressed_bytes": compressed_bytes(model),
    }
    if example_input is not None:
        figures["macs"], figures["sparse_macs"] = count_macs(model, example_input)
    return figures


def ort_session(path: str | Path, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session for ``path`` (``spinning``: let idle intra-op threads spin)."""
    ort = require("onnxruntime", "export", "ONNX Runtime measurements and checks")

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_accuracy(path: str | Path, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on ``(input, label)`` batches, run by ONNX Runtime."""
    session = ort_session(path)
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in batches:
        logits = session.run(None, {name: x.detach().cpu().numpy()})[0]
        correct += int((logits.argmax(1) == y.cpu().numpy()).sum())
        total += len(y)
    return correct / total if total else 0.0


def ort_latency_ms(path: str | Path, batch: Tensor, runs: int = 30, warmup: int = 10, spinning: bool = True) -> float:
    """Median milliseconds of ``runs`` ONNX Runtime calls on ``batch`` after ``warmup`` calls.

    Only this session is alive while it runs (idle sessions' spinning threads would steal the cores).
    """
    session = ort_session(path, spinning)
    feed = {session.get_inputs()[0].name: batch.detach().cpu().numpy()}
    try:
        return median_call_ms(session, feed, runs, warmup)
    finally:
        del session


def median_call_ms(session: Any, feed: Mapping[str, Any], runs: int = 30, warmup: int = 10) -> float:
    """Median milliseconds of ``runs`` calls of an ONNX Runtime ``session`` on ``feed`` after ``warmup`` calls."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
