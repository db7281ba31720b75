"""What an export bought: the report (JSON, Markdown, PNG plots).

No Lightning here. ``report.json`` has stable keys (``REPORT_VERSION`` changes when they do):

- ``version``, ``model`` (class name);
- ``before`` / ``after``: ``params``, ``nonzero_params``, ``macs``, ``sparse_macs`` (non-zero
  weights only), ``dense_bytes``, ``sparse_bytes`` (bitmap format), ``compressed_bytes`` (zlib of
  the weights), and, where an ONNX file was measured,
  ``onnx_bytes``, ``ort_accuracy`` (``after``; ``before`` only when it is the baseline),
  ``ort_latency_ms`` (``before`` is the model as ``fit`` started: the sizes and latency are compared with it);
- ``baseline``: what the accuracy is compared with, ``{source, ort_accuracy, candidates: {source: accuracy}}``
  (the most accurate candidate; ``None`` without one or without an ONNX file): the distillation teacher, the
  model as fit started or after its first epoch, a given model or checkpoint — never an untrained model;
- ``files``: ``{format: {path, bytes}}`` (``onnx_int8`` also ``weights``: ``int8`` or ``uint8``, and
  ``weights_reason``, see :mod:`lightning_compress.deploy.cpu`);
- ``verification``: ``{format: {sqnr_db, relative_error, max_abs_diff, top1_agreement, decisive_flips,
  criterion, passed}}`` (int8 also ``sqnr_vs_float_db``, ``fake_quant_sqnr_vs_float_db`` and ``layers``:
  the layer-by-layer comparison, see :mod:`lightning_compress.deploy.verify`; fp32 also
  ``file_vs_float64_db``, ``float32_vs_float64_db``, ``float64_decisive_flips`` and ``ill_conditioned``
  where the SQNR rule failed and the model was run in float64);
- ``structure``: ``physical`` (channels removed), ``removed_channels``, ``reason`` (why not);
- ``layers``: one row per Conv/Linear layer: ``name``, ``sparsity``, ``rank`` (low-rank factors),
  ``weight_bits``, ``scales`` (``observed``, ``learned``, or ``learned weights`` / ``learned activations``
  where only some step sizes learn) and ``observed_batches`` (the batches its activation ranges were observed
  on: calibration batches, or QAT steps) for fake-quantised layers, ``None`` for the others; ``stored_bits``
  (the bits a weight takes in ``model.int8.onnx``: 4 or 2 where packed, 8 otherwise; ``None`` without an
  int8 file or for a float layer);
- ``calibration`` (post-training quantisation only, :mod:`lightning_compress.app.quantize`): ``batches``,
  ``samples``, ``scales``, ``weight_bits``, ``equalized_pairs`` / ``equalization_skipped`` /
  ``equalization_max_change`` / ``clipped_pairs`` (``None`` without equalisation), ``bias_corrected``
  (``{layer: largest correction}``), ``bias_uncorrected``, ``float_layers``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.layers import select_layers, weight_of
from lightning_compress.core.low_rank import LowRank
from lightning_compress.core.quantization import (
    INPUT_QUANT,
    OUTPUT_QUANT,
    quantized_layers,
    scale_kinds,
    weight_quantizer,
)
from lightning_compress.deploy.measure import summarize
from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of, require

REPORT_VERSION = 2  # 2: ``baseline``; ``before.ort_accuracy`` only when the model as fit started is the baseline
ACCURACY = ("ort_accuracy", "int8_ort_accuracy")  # compared with the baseline, not with ``before``
BASELINE_NAMES = {"teacher": "the distillation teacher", "start": "the model as fit started",
                  "first_epoch": "the model after its first epoch", "given": "the baseline model given"}  # fmt: skip


def model_figures(model: nn.Module, example_input: Tensor) -> dict[str, float]:
    """:func:`~lightning_compress.deploy.measure.summarize` of ``model`` (MACs for one example), as floats."""
    figures = {k: float(v) for k, v in summarize(model, example_input[:1]).items()}
    figures["nonzero_params"] = figures.pop("nonzero")
    return figures


def layer_rows(model: nn.Module, storage: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per Conv/Linear layer: sparsity (from the tensors), low-rank factor rank, weight bits, how its scales
    were set, on how many batches its ranges were observed, and, given the int8 file's ``storage``
    (:func:`lightning_compress.deploy.packing.read_storage`), the bits its weights take in that file."""
    packed = dict(storage["packed"]) if storage else {}
    quantized = quantized_layers(model)
    first_factors = {f"{name}.0" for name, m in model.named_modules() if isinstance(m, LowRank)}
    rows = []
    for name, layer in select_layers(model).items():
        weight = weight_of(layer).detach()
        row: dict[str, Any] = {"name": name, "sparsity": float((weight == 0).float().mean())}
        row["rank"] = int(weight.shape[0]) if name in first_factors else None  # the factorisation's (input) rank
        row["weight_bits"] = int(weight_quantizer(layer).bits) if name in quantized else None
        row["scales"] = scale_kinds(layer) if name in quantized else None
        row["observed_batches"] = _observed(layer) if name in quantized else None
        in_file = storage is not None and name in quantized and bool(weight_quantizer(layer).enabled)
        row["stored_bits"] = packed.get(name, 8) if in_file else None  # a layer a plan kept float is float there
        rows.append(row)
    return rows


def _observed(layer: nn.Module) -> int:
    """How many batches the layer's activation ranges saw (an input that another quantiser covers sees none)."""
    return max(int(getattr(layer, attr).updates) for attr in (INPUT_QUANT, OUTPUT_QUANT))


def markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the before/after table, the files and their verification, the per-layer table."""
    before, after = report["before"], report["after"]
    keys = [k for k in before if k in after and k not in ACCURACY]
    lines = [f"# Compression report: {report['model']}", "", "| figure | before | after | ratio |", "|---|---|---|---|"]
    for key in keys:
        ratio = after[key] / before[key] if before[key] else float("nan")
        lines.append(f"| {key} | {before[key]:,.4g} | {after[key]:,.4g} | {ratio:.3f} |")
    lines += ["", *accuracy_lines(report)]
    lines += [
        "", "| file | bytes | SQNR dB (ORT vs PyTorch) | max abs diff | top-1 agreement |", "|---|---|---|---|---|"
    ]  # fmt: skip
    for fmt, entry in report["files"].items():
        check = report["verification"].get(fmt, {})
        sqnr = ("∞" if check.get("sqnr_db") is None else f"{check['sqnr_db']:.1f}") if check else "—"
        diff = f"{check['max_abs_diff']:.3g}" if check else "—"
        agree = f"{check['top1_agreement']:.3f}" if check else "—"
        lines.append(f"| {Path(entry['path']).name} | {entry['bytes']:,} | {sqnr} | {diff} | {agree} |")
    for fmt, check in report["verification"].items():
        if check.get("criterion"):
            lines += ["", f"`{fmt}` verified by: {check['criterion']}."]
        if check.get("ill_conditioned"):
            lines.append(
                f"The model is ill-conditioned in float32: PyTorch's own float32 output is "
                f"{check['float32_vs_float64_db']} dB SQNR from the same model in float64, the file's "
                f"{check['file_vs_float64_db']} dB."
            )
        if check.get("layers"):
            layers = check["layers"]
            lines.append(
                f"Layer by layer: {layers['compared']} quantised tensors compared; the most different is "
                f"{layers['worst']} ({layers['worst_off_share']:.2%} of elements more than one step apart)."
            )
    calibration = report.get("calibration")
    if calibration:
        pairs = calibration["equalized_pairs"]
        lines += ["", f"Post-training quantisation: ranges observed on {calibration['batches']} batches "
                  f"({calibration['samples']} samples); cross-layer equalisation: "
                  f"{'off' if pairs is None else f'{len(pairs)} pairs'}; bias correction: "
                  f"{len(calibration['bias_corrected'])} layers."]  # fmt: skip
    structure = report["structure"]
    lines += ["", f"Channels removed physically: {structure['physical']}"]
    if structure.get("reason"):
        lines.append(f"Masks kept: {structure['reason']}")
    lines += ["", "| layer | sparsity | rank | weight bits | scales (batches observed) |", "|---|---|---|---|---|"]
    for row in report["layers"]:
        rank = row["rank"] if row["rank"] is not None else "—"
        bits = row["weight_bits"] if row["weight_bits"] is not None else "—"
        if row.get("stored_bits") is not None and row["weight_bits"] is not None and row["weight_bits"] < 8:
            bits = f"{bits}, packed" if row["stored_bits"] < 8 else f"{bits}, stored as int8"
        scales = f"{row['scales']} ({row['observed_batches']})" if row.get("scales") else "—"
        lines.append(f"| {row['name']} | {row['sparsity']:.3f} | {rank} | {bits} | {scales} |")
    return "\n".join(lines) + "\n"


def baseline_name(baseline: Mapping[str, Any]) -> str:
    """How the report names a baseline's source (a checkpoint by its file name)."""
    return BASELINE_NAMES.get(baseline["source"], str(baseline["source"]))


def accuracy_lines(report: Mapping[str, Any]) -> list[str]:
    """The accuracy table: the baseline, then each exported file, in ONNX Runtime on the validation data."""
    after, baseline = report["after"], report.get("baseline")
    files = zip(ACCURACY, ("model.onnx", "model.int8.onnx"), strict=True)
    rows = [(label, after[key]) for key, label in files if key in after]
    if not rows:
        return ["No validation data: no accuracy measured."]
    if not baseline:
        return ["Top-1 accuracy (ONNX Runtime): " + ", ".join(f"{n} {a:.2%}" for n, a in rows) + " (no baseline)."]
    lines = [f"Top-1 accuracy in ONNX Runtime, against {baseline_name(baseline)}:", "",
             "| model | top-1 | vs baseline |", "|---|---|---|"]
    lines.append(f"| baseline | {baseline['ort_accuracy']:.2%} | — |")
    for name, accuracy in rows:
        lines.append(f"| {name} | {accuracy:.2%} | {100 * (accuracy - baseline['ort_accuracy']):+.2f} points |")
    return lines


def plots(report: Mapping[str, Any], folder: Path) -> list[Path]:
    """``layers.png`` (per-layer sparsity, ranks and bits) and ``before_after.png`` (what each figure became, as
    a ratio on a log scale, and the accuracy against the baseline); needs matplotlib."""
    require("matplotlib", "plots", "the export's plots (or plots=False)").use("Agg")
    plt = require("matplotlib.pyplot", "plots", "the export's plots (or plots=False)")

    def save(fig: Any, ax: Any, name: str, ylabel: str, rotation: int) -> Path:
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=rotation, labelsize=7)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        return folder / name

    rows = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 4))
    ax.bar([r["name"] for r in rows], [r["sparsity"] for r in rows], color="tab:blue")
    for i, row in enumerate(rows):
        notes = [f"r={row['rank']}" if row["rank"] else "", f"{row['weight_bits']}b" if row["weight_bits"] else ""]
        ax.annotate(" ".join(n for n in notes if n), (i, row["sparsity"]), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_title(f"{report['model']} per layer: sparsity (bars), rank and weight bits (labels)")
    ax.set_xlabel("layer")
    paths = [save(fig, ax, "layers.png", "sparsity (share of zero weights)", 90)]
    before, after = report["before"], report["after"]
    keys = [k for k in before if k in after and before[k] and after[k] and k not in ACCURACY]
    ratios = [after[k] / before[k] for k in keys]
    fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    bars = ax.bar(keys, ratios, color=["tab:green" if r <= 1 else "tab:red" for r in ratios])
    ax.bar_label(bars, labels=[f"{r:.2f}×" for r in ratios], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(min([*ratios, 1.0]) / 2, max([*ratios, 1.0]) * 2)  # bars rise from well below the smallest ratio
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(plt.FuncFormatter(lambda value, _: f"{value:.2g}×"))
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_title(f"{report['model']}: after / before (the model as fit started)")
    ax.set_ylabel("after / before (log scale; < 1 is smaller or faster)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    names, values = _accuracy_bars(report)
    bars = right.bar(names, values, color=["tab:grey"] + ["tab:blue"] * (len(values) - 1))
    right.bar_label(bars, labels=[f"{v:.1%}" for v in values], fontsize=7)
    right.set_ylim(0, 1.1)
    base = report.get("baseline")
    right.set_title("top-1, ONNX Runtime" + (f"\nbaseline: {baseline_name(base)}" if base else ""), fontsize=9)
    right.set_ylabel("accuracy")
    paths.append(save(fig, right, "before_after.png", "accuracy", 30))
    return paths


def _accuracy_bars(report: Mapping[str, Any]) -> tuple[list[str], list[float]]:
    after, base = report["after"], report.get("baseline")
    names, values = (["baseline"], [base["ort_accuracy"]]) if base else ([], [])
    for key, name in zip(ACCURACY, ("fp32", "int8"), strict=True):
        if key in after:
            names.append(name)
            values.append(after[key])
    return names, values


def write(report: Mapping[str, Any], folder: Path, with_plots: bool = True) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the plots into ``folder``; return the paths."""
    paths = [folder / "report.json", folder / "report.md"]
    paths[0].write_text(json.dumps(report, indent=2, sort_keys=True))
    paths[1].write_text(markdown(report))
    if with_plots:
        paths += plots(report, folder)
    return paths


def check_formats(formats: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """Validate the ``formats`` argument."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    allowed = list(allowed)
    for fmt in formats:
        if fmt not in allowed:
            hint = did_you_mean(str(fmt), allowed)
            raise config_error("formats", f"a list of formats, each {one_of(allowed)}", fmt, hint)
    if not formats:
        raise CompressionConfigError(f"`formats` must name at least one of {allowed}, got []")
    return formats


def to_numpy(x: Tensor) -> np.ndarray:
    """A batch as ONNX Runtime takes it: floating tensors as float32, integer ones (token ids) as they are."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    return (x.detach().float() if x.is_floating_point() else x.detach()).cpu().numpy()
