"""The main job: train a CNN on embedded data dense and with 90% gradual magnitude pruning, and
print what pruning bought (parameters, non-zeros, bytes, MACs, accuracy) as a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress.callbacks import MagnitudePruning
from lightning_compress.data import get_datamodule
from lightning_compress.measure import summarize
from lightning_compress.module import ClassificationModule


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
    """Train dense and pruned, print the comparison table, and return its rows."""
    pruning = MagnitudePruning(final_sparsity=sparsity, end_epoch=max(1.0, epochs * 0.6), fold_on_fit_end=True)
    rows: dict[str, dict[str, float]] = {}
    example = get_datamodule(data).example_input()
    runs: dict[str, list[pl.Callback]] = {"dense": [], f"GMP {sparsity:.0%}": [pruning]}
    for name, callbacks in runs.items():
        module, accuracy = train(model, data, epochs, seed, callbacks)
        network: nn.Module = module.model
        rows[name] = {**summarize(network, example), "val_acc": accuracy}
    columns = ["params", "nonzero", "sparse_bytes", "compressed_bytes", "sparse_macs", "val_acc"]
    print(f"\n{model} on {data}, {epochs} epochs, seed {seed}\n")
    print(format_table(rows, columns))
    return rows
