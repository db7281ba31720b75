"""What an export bought: the report (JSON, Markdown, PNG plots).

No Lightning here. ``report.json`` has stable keys (``REPORT_VERSION`` changes when they do):

- ``version``, ``model`` (class name);
- ``before`` / ``after``: ``params``, ``nonzero_params``, ``macs``, ``sparse_macs`` (non-zero
  weights only), ``dense_bytes``, ``sparse_bytes`` (bitmap format), ``compressed_bytes`` (zlib of
  the weights), and, where an ONNX file was measured,
  ``onnx_bytes``, ``ort_accuracy``, ``ort_latency_ms`` (``before`` is the model as ``fit`` started);
- ``files``: ``{format: {path, bytes}}``;
- ``verification``: ``{format: {sqnr_db, relative_error, max_abs_diff, top1_agreement, decisive_flips,
  criterion, passed}}`` (int8 also ``sqnr_vs_float_db``, ``fake_quant_sqnr_vs_float_db`` and ``layers``:
  the layer-by-layer comparison, see :mod:`lightning_compress.deploy.verify`);
- ``structure``: ``physical`` (channels removed), ``removed_channels``, ``reason`` (why not);
- ``layers``: one row per Conv/Linear layer: ``name``, ``sparsity``, ``rank`` (low-rank factors),
  ``weight_bits`` (fake-quantised layers).
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
from lightning_compress.core.quantization import quantized_layers, weight_quantizer
from lightning_compress.deploy.measure import summarize
from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of, require

REPORT_VERSION = 1


def model_figures(model: nn.Module, example_input: Tensor) -> dict[str, float]:
    """:func:`~lightning_compress.deploy.measure.summarize` of ``model`` (MACs for one example), as floats."""
    figures = {k: float(v) for k, v in summarize(model, example_input[:1]).items()}
    figures["nonzero_params"] = figures.pop("nonzero")
    return figures


def layer_rows(model: nn.Module) -> list[dict[str, Any]]:
    """Per Conv/Linear layer: sparsity (from the tensors), low-rank factor rank, weight bits."""
    quantized = quantized_layers(model)
    first_factors = {f"{name}.0" for name, m in model.named_modules() if isinstance(m, LowRank)}
    rows = []
    for name, layer in select_layers(model).items():
        weight = weight_of(layer).detach()
        row: dict[str, Any] = {"name": name, "sparsity": float((weight == 0).float().mean())}
        row["rank"] = int(weight.shape[0]) if name in first_factors else None  # the factorisation's (input) rank
        row["weight_bits"] = int(weight_quantizer(layer).bits) if name in quantized else None
        rows.append(row)
    return rows


def markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the before/after table, the files and their verification, the per-layer table."""
    before, after = report["before"], report["after"]
    keys = [k for k in before if k in after]
    lines = [f"# Compression report: {report['model']}", "", "| figure | before | after | ratio |", "|---|---|---|---|"]
    for key in keys:
        ratio = after[key] / before[key] if before[key] else float("nan")
        lines.append(f"| {key} | {before[key]:,.4g} | {after[key]:,.4g} | {ratio:.3f} |")
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
        if check.get("layers"):
            layers = check["layers"]
            lines.append(
                f"Layer by layer: {layers['compared']} quantised tensors compared; the most different is "
                f"{layers['worst']} ({layers['worst_off_share']:.2%} of elements more than one step apart)."
            )
    structure = report["structure"]
    lines += ["", f"Channels removed physically: {structure['physical']}"]
    if structure.get("reason"):
        lines.append(f"Masks kept: {structure['reason']}")
    lines += ["", "| layer | sparsity | rank | weight bits |", "|---|---|---|---|"]
    for row in report["layers"]:
        rank = row["rank"] if row["rank"] is not None else "—"
        bits = row["weight_bits"] if row["weight_bits"] is not None else "—"
        lines.append(f"| {row['name']} | {row['sparsity']:.3f} | {rank} | {bits} |")
    return "\n".join(lines) + "\n"


def plots(report: Mapping[str, Any], folder: Path) -> list[Path]:
    """``layers.png`` (per-layer sparsity, ranks and bits) and ``before_after.png``; needs matplotlib."""
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
    ax.set_title("per layer: sparsity (bars), rank and weight bits (labels)")
    paths = [save(fig, ax, "layers.png", "sparsity", 90)]
    keys = [k for k in report["before"] if k in report["after"] and report["before"][k]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(keys, [report["after"][k] / report["before"][k] for k in keys], color="tab:green")
    ax.axhline(1.0, color="grey", linewidth=1)
    paths.append(save(fig, ax, "before_after.png", "after / before", 45))
    return paths


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
