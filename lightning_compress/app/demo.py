"""The main job: train a CNN on embedded data dense, with 90% gradual magnitude pruning, and with
pruning then QAT; export each to ONNX (int8 for QAT) and print what each bought (parameters,
non-zeros, bytes, MACs, accuracy in PyTorch and in ONNX Runtime) as a table."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress.callbacks import (
    CompressionExport,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.deploy.measure import ort_accuracy, ort_latency_ms, summarize
from lightning_compress.deploy.onnx import export_onnx
from lightning_compress.vision.data import get_datamodule
from lightning_compress.vision.module import ClassificationModule


def train(
    model: str,
    data: str,
    epochs: int,
    seed: int,
    callbacks: Sequence[pl.Callback] = (),
    **trainer_kwargs: Any,
) -> tuple[ClassificationModule, float]:
    """Train ``model`` on ``data`` for ``epochs`` with ``callbacks``; return the module and its val accuracy."""
    pl.seed_everything(seed, verbose=False)
    datamodule = get_datamodule(data, seed=seed)
    module = ClassificationModule(model, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels)
    options: dict[str, Any] = {
        "max_epochs": epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "deterministic": True,
        "accelerator": "cpu",
    }
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **options)
    trainer.fit(module, datamodule=datamodule)
    accuracy = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/acc"]
    return module, float(accuracy)


def format_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    """A Markdown table: one row per run, one column per figure."""
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, figures in rows.items():
        cells = [f"{figures[c]:.4f}" if isinstance(figures[c], float) else f"{figures[c]:,}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(
    model: str = "cnn_small", data: str = "mnist5k", epochs: int = 6, sparsity: float = 0.9, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Train dense, pruned, and pruned + QAT; export each to ONNX (int8 for QAT); print the table.

    Returns the rows: every figure counted from the tensors or measured on the exported file.
    """
    ramp_end = max(1.0, epochs * 0.6)
    qat_start = min(epochs - 1, max(math.ceil(ramp_end), epochs - 2))
    runs: dict[str, list[pl.Callback]] = {
        "dense": [],
        f"GMP {sparsity:.0%}": [MagnitudePruning(sparsity, end_epoch=ramp_end, fold_on_fit_end=True)],
        f"GMP {sparsity:.0%} + QAT int8": [
            MagnitudePruning(sparsity, end_epoch=ramp_end, fold_on_fit_end=True),
            QuantizationAwareTraining(start_epoch=qat_start),
        ],
    }
    datamodule = get_datamodule(data, seed=seed)
    datamodule.setup("fit")
    example = datamodule.example_input()
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, callbacks in runs.items():
            module, accuracy = train(model, data, epochs, seed, callbacks)
            network: nn.Module = module.model
            int8 = any(isinstance(c, QuantizationAwareTraining) for c in callbacks)
            path = export_onnx(network, example, Path(folder) / f"{len(rows)}.onnx", int8=int8)
            rows[name] = {
                **summarize(network, example),
                "onnx_bytes": path.stat().st_size,
                "val_acc": accuracy,
                "onnx_acc": ort_accuracy(path, datamodule.val_dataloader()),
            }
    columns = ["params", "nonzero", "sparse_bytes", "onnx_bytes", "sparse_macs", "val_acc", "onnx_acc"]
    print(f"\n{model} on {data}, {epochs} epochs, seed {seed}\n")
    print(format_table(rows, columns))
    return rows


def run_pipeline(
    data: str = "mnist5k", teacher_epochs: int = 6, epochs: int = 8, seed: int = 0, out: str = "demo-output"
) -> dict[str, dict[str, float]]:
    """The full pipeline (the README's main job): a dense ``cnn_wide`` teacher, then a ``cnn_small``
    student with low-rank + GMP 80% + QAT int8 + KD from that teacher, exported and verified by
    ``CompressionExport``; a dense ``cnn_small`` for reference. Prints accuracy, bytes and ORT latency, and
    keeps everything in ``out``: ``teacher.onnx``, ``dense.onnx``, ``compressed/`` (the bundle: ONNX files,
    checkpoint, report, plots) and ``results.md`` (the table).
    """
    from importlib.util import find_spec

    datamodule = get_datamodule(data, seed=seed)
    datamodule.setup("fit")
    example = datamodule.example_input(2)
    batch = next(iter(datamodule.val_dataloader()))[0][:64]
    rows: dict[str, dict[str, float]] = {}
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    student = "cnn_small: low-rank + GMP 80% + QAT int8 + KD"
    print(f"[1/3] dense teacher cnn_wide on {data}, {teacher_epochs} epochs", flush=True)
    teacher, teacher_acc = train("cnn_wide", data, teacher_epochs, seed)
    paths["dense teacher cnn_wide"] = export_onnx(teacher.model, example, target / "teacher.onnx")
    print(f"[2/3] dense cnn_small on {data}, {epochs} epochs (the reference)", flush=True)
    dense, dense_acc = train("cnn_small", data, epochs, seed)
    paths["dense cnn_small"] = export_onnx(dense.model, example, target / "dense.onnx")
    print(f"[3/3] {student} from the teacher, {epochs} epochs, exported and verified", flush=True)
    export = CompressionExport(target / "compressed", plots=find_spec("matplotlib") is not None)
    compression = [
        LowRankFactorization(epoch=1, ratio=0.5, include=["model.classifier.1"]),
        MagnitudePruning(0.8, start_epoch=1, end_epoch=max(2, epochs - 3)),
        QuantizationAwareTraining(start_epoch=max(2, epochs - 2)),
        KnowledgeDistillation(teacher),
        export,
    ]
    _, student_acc = train("cnn_small", data, epochs, seed, compression)
    paths[student] = Path(export.report["files"]["onnx_int8"]["path"])
    accuracy = [teacher_acc, dense_acc, student_acc]
    for (name, path), acc in zip(paths.items(), accuracy, strict=True):
        rows[name] = {
            "onnx_bytes": path.stat().st_size,
            "onnx_acc": ort_accuracy(path, datamodule.val_dataloader()),
            "val_acc": acc,
        }
    for name, path in paths.items():  # latency after training: one session at a time, interleaved
        rows[name]["latency_ms"] = ort_latency_ms(path, batch)
    title = f"the full pipeline on {data}: teacher {teacher_epochs} epochs, students {epochs} epochs, seed {seed}"
    table = format_table(rows, ["onnx_bytes", "val_acc", "onnx_acc", "latency_ms"])
    (target / "results.md").write_text(f"# {title}\n\n{table}\n")
    print(f"\n{title}\n\n{table}\n")
    print(f"kept in {target}/: teacher.onnx, dense.onnx, results.md and compressed/ ({', '.join(_bundle(target))})")
    return rows


def _bundle(target: Path) -> list[str]:
    return sorted(p.name for p in (target / "compressed").iterdir())
