"""A trained, compressed model as deployable files, verified, with a report — written atomically.

No Lightning here: :func:`write_bundle` takes the model, the model as it was before compression,
an example batch and validation batches. :class:`~lightning_compress.CompressionExport` calls it at
the end of ``fit``; ``lightning-compress export`` calls it on a checkpoint. It makes one float copy
of the model (channels removed in place, one Torch-Pruning trace) and, for ``onnx_int8``, one more
copy of that to quantise: no more copies than formats written.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.deploy import report as rep
from lightning_compress.deploy.cpu import StoredType, WeightType, resolve_weight_type
from lightning_compress.deploy.folder import replaced
from lightning_compress.deploy.measure import ort_accuracy, ort_latency_ms, ort_session
from lightning_compress.deploy.onnx import LogitsFn, apply_int8, float_copy, int8_plan, pick_logits, write_onnx
from lightning_compress.deploy.packing import read_storage
from lightning_compress.deploy.shrink import remove_zero_channels
from lightning_compress.deploy.verify import verify_fp32, verify_int8
from lightning_compress.errors import CompressionConfigError

FORMATS = ("onnx", "onnx_int8", "checkpoint")
FILES = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx", "checkpoint": "model.ckpt"}


def write_bundle(
    model: nn.Module,
    before: nn.Module,
    folder: str | os.PathLike[str],
    example: Tensor,
    val: Sequence[tuple[Tensor, Tensor]],
    formats: Sequence[str] = ("onnx", "checkpoint"),
    checkpoint: Mapping[str, Any] | None = None,
    verify: bool = True,
    physical: bool = True,
    plots: bool = True,
    baselines: Mapping[str, nn.Module] | None = None,
    logits_fn: LogitsFn | None = None,
    int8_weights: WeightType = "auto",
    sections: Mapping[str, Any] | None = None,
    pack_weights: bool = True,
) -> dict[str, Any]:
    """Export ``model`` in ``formats`` into ``folder``, verify the ONNX files, and write the report.

    Args:
        model: the trained model (masks, fake quantisation and factorised layers as trained); it is run
            in eval mode for the checks and left in the mode it was in.
        before: the model before compression (a float copy, which the bundle exports as it is and
            leaves on the CPU in eval mode), for the before/after figures.
        folder: the output folder, replaced as a whole once the new bundle is complete and verified (see
            :mod:`lightning_compress.deploy.folder`): missing, empty, or an earlier bundle.
        example: a batch to trace with.
        val: ``(input, label)`` validation batches: the first checks the files, all give the ORT accuracy.
        formats: any of ``onnx``, ``onnx_int8`` (needs fake quantisation), ``checkpoint``.
        checkpoint: what the ``checkpoint`` file holds (default ``{"state_dict": model.state_dict()}``).
        verify: compare every ONNX file with PyTorch (see :mod:`lightning_compress.deploy.verify`: fp32
            by SQNR against the float model, int8 layer by layer against the model it was exported from).
        physical: remove whole zero output channels (see :mod:`lightning_compress.deploy.shrink`).
        plots: write the PNG plots.
        baselines: the float models the exported accuracy is compared with, by name (moved to the CPU and
            exported as they are; ``before`` itself may be one: then its accuracy is measured too); the
            report's ``baseline`` is the most accurate of them in ONNX Runtime on ``val`` (``None`` without
            candidates or validation data). Never an untrained model: any compression would look like a gain.
        logits_fn: ``output -> logits`` for a ``forward`` that returns more than the logits (default: a
            tensor, a ``logits`` key or attribute, or a tuple's first element).
        int8_weights: how the int8 file stores its weights (``auto``, ``int8``, ``uint8``; see
            :mod:`lightning_compress.deploy.cpu`); the report's ``files.onnx_int8`` says which and why.
        sections: more top-level report sections (e.g. ``calibration``, from post-training quantisation).
        pack_weights: store weights of 4 bits or fewer packed in the int8 file where ONNX Runtime unpacks them
            at load (see :mod:`lightning_compress.deploy.packing`); the report's ``files.onnx_int8.storage``
            names the packed layers and their bits, or why the file stores int8.

    Returns:
        The report (also in ``report.json``).

    Raises:
        ExportVerificationError: a file does not reproduce the model; nothing is written then.
        CompressionConfigError: ``folder`` holds files that are not a bundle's, or cannot be written.
        OSError: writing failed (a full disk); ``folder`` is left as it was.
    """
    folder = Path(folder)
    weights = resolve_weight_type(int8_weights)  # a bad value fails before any work
    _check_finite(example, val)
    was_training = model.training
    model.eval()  # the reference outputs: running statistics, observers still
    try:
        with replaced(folder) as tmp:  # the folder as a whole: the old bundle or the new one, never a mix
            settings = (
                verify, physical, plots, dict(baselines or {}), logits_fn, weights, dict(sections or {}), pack_weights
            )  # fmt: skip
            report = _bundle(model, before, tmp, example, list(val), formats, checkpoint, *settings)
            for scratch in (".before.onnx", ".baseline.onnx"):
                (tmp / scratch).unlink(missing_ok=True)
    finally:
        model.train(was_training)
    for entry in report["files"].values():
        entry["path"] = str(folder / entry["path"])
    return report


def _check_finite(example: Tensor, val: Sequence[tuple[Tensor, Tensor]]) -> None:
    """NaN or inf in the data the checks run on would read as a file that does not match PyTorch."""
    for what, x in [("the example input", example), *((f"validation batch {i}", b[0]) for i, b in enumerate(val))]:
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise CompressionConfigError(
                f"{what} holds NaN or infinite values: the export's checks and accuracy need finite inputs. "
                "HINT: clean the validation data (or pass `example_input=` a finite batch)"
            )


def _bundle(
    model: nn.Module, before: nn.Module, tmp: Path, example: Tensor, val: list[tuple[Tensor, Tensor]],
    formats: Sequence[str], checkpoint: Mapping[str, Any] | None, verify: bool, physical: bool, plots: bool,
    baselines: dict[str, nn.Module], logits_fn: LogitsFn | None, weights: tuple[StoredType, str],
    sections: dict[str, Any], pack_weights: bool,
) -> dict[str, Any]:  # fmt: skip
    batch = val[0][0] if val else example
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    fp32 = float_copy(model).cpu().eval()  # the one float copy: shrunk in place, the int8 model is built from it
    plan = int8_plan(model, fp32, example) if "onnx_int8" in formats else None  # scales before any removal
    structure: dict[str, Any] = {"physical": False, "removed_channels": {}, "reason": None}
    removed: dict[str, list[int]] = {}
    if physical:
        _, info = remove_zero_channels(fp32, example, inplace=True)  # the export's one Torch-Pruning trace
        if not info["traced"]:
            warnings.warn(f"the export keeps the pruning masks: {info['reason']}", stacklevel=2)
            structure["reason"] = info["reason"]
            if not info["intact"]:
                fp32 = float_copy(model).cpu().eval()
        elif info["removed_channels"]:
            structure.update(physical=True, removed_channels=info["removed_channels"])
            removed = info["removed_indices"]
    files: dict[str, dict[str, Any]] = {}

    def float_logits() -> Tensor:
        with torch.no_grad():
            return pick_logits(fp32(batch), logits_fn)

    def float64_logits() -> Tensor | None:
        """The float model in float64, for the ill-conditioned-model rule; None where it cannot run so."""
        wide = batch.double() if batch.is_floating_point() else batch
        try:
            with torch.no_grad():
                return pick_logits(copy.deepcopy(fp32).double()(wide), logits_fn)
        except (RuntimeError, TypeError, ValueError):  # a model with float32 hard-coded: the plain rule stands
            return None

    checks: dict[str, dict[str, Any]] = {}
    figures_before, figures_after = rep.model_figures(before, example), rep.model_figures(fp32, example)
    compared = any(f.startswith("onnx") for f in formats)  # without an ONNX file nothing is timed or scored
    if compared:
        before_file = write_onnx(before, example, tmp / ".before.onnx", logits_fn=logits_fn)
        _measure(before_file, batch, val if any(m is before for m in baselines.values()) else [], figures_before)
    if "onnx" in formats:
        path = write_onnx(fp32, example, tmp / FILES["onnx"], logits_fn=logits_fn)
        if verify:
            checks["onnx"] = verify_fp32(_run(path, batch), float_logits(), path.name, precise=float64_logits)
            if checks["onnx"].get("ill_conditioned"):
                warnings.warn(
                    f"{path.name} passes against the model in float64: the model is ill-conditioned in float32 "
                    f"(PyTorch's own float32 output is {checks['onnx']['float32_vs_float64_db']} dB SQNR from "
                    "float64), so no float32 runtime reproduces it to 80 dB",
                    stacklevel=2,
                )
        _measure(path, batch, val, figures_after)
        files["onnx"] = {"path": path.name, "bytes": path.stat().st_size}
    if plan is not None:
        int8_model = apply_int8(copy.deepcopy(fp32), plan, removed)
        path = write_onnx(int8_model, example, tmp / FILES["onnx_int8"], int8=True, logits_fn=logits_fn,
                          int8_weights=weights[0], pack_weights=pack_weights)  # fmt: skip
        if verify:
            with torch.no_grad():
                fake_quant = pick_logits(model(batch.to(device)), logits_fn).cpu()
            logits = partial(pick_logits, logits_fn=logits_fn)
            checks["onnx_int8"] = verify_int8(path, int8_model, batch, fake_quant, float_logits(), logits, weights)
        int8: dict[str, float] = {}
        _measure(path, batch, val, int8)
        figures_after.update({f"int8_{k}": v for k, v in int8.items()})
        figures_before.update({f"int8_{k}": figures_before[k] for k in int8 if k in figures_before})
        files["onnx_int8"] = {"path": path.name, "bytes": path.stat().st_size, "weights": weights[0],
                              "weights_reason": weights[1], "storage": read_storage(path)}  # fmt: skip
    if "checkpoint" in formats:
        path = tmp / FILES["checkpoint"]
        with open(path, "wb") as handle:  # through a Python file: a full disk is OSError(ENOSPC), not RuntimeError
            torch.save(dict(checkpoint) if checkpoint is not None else {"state_dict": model.state_dict()}, handle)
        files["checkpoint"] = {"path": path.name, "bytes": path.stat().st_size}
    report = {
        "version": rep.REPORT_VERSION, "model": type(model).__name__, "before": figures_before,
        "after": figures_after, "files": files, "verification": checks, "structure": structure,
        "layers": rep.layer_rows(model, files.get("onnx_int8", {}).get("storage")),
        "baseline": _baseline(baselines, before, figures_before, tmp, example, val, logits_fn) if compared else None,
        **sections,
    }  # fmt: skip
    rep.write(report, tmp, with_plots=plots)
    return report


def _baseline(
    candidates: dict[str, nn.Module], before: nn.Module, figures_before: dict[str, float], tmp: Path, example: Tensor,
    val: list[tuple[Tensor, Tensor]], logits_fn: LogitsFn | None,
) -> dict[str, Any] | None:  # fmt: skip
    """The most accurate candidate in ONNX Runtime: ``{source, ort_accuracy, candidates: {name: accuracy}}``."""
    if not candidates or not val:
        return None
    measured: dict[str, float] = {}
    for name, candidate in candidates.items():
        if candidate is before:
            measured[name] = figures_before["ort_accuracy"]
            continue
        path = write_onnx(candidate.cpu().eval(), example, tmp / ".baseline.onnx", logits_fn=logits_fn)
        measured[name] = ort_accuracy(path, val)
    source = max(measured, key=lambda name: measured[name])
    return {"source": source, "ort_accuracy": measured[source], "candidates": measured}


def _measure(path: Path, batch: Tensor, val: list[tuple[Tensor, Tensor]], into: dict[str, float]) -> None:
    into["onnx_bytes"] = float(path.stat().st_size)
    if val:
        into["ort_accuracy"] = ort_accuracy(path, val)
    into["ort_latency_ms"] = ort_latency_ms(path, batch, runs=20, warmup=5)


def _run(path: Path, batch: Tensor) -> Any:
    session = ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: rep.to_numpy(batch)})[0]
