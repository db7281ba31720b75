"""Shared pieces of the benchmark scripts: seeded training with per-epoch timing, and tables.

Every benchmark prints ratios measured in one run against a baseline or a peer, with runs of the
different arms interleaved (this machine's timing noise is about +-6%, see shared/BENCHMARKING.md).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lightning_compress.deploy.measure import ort_accuracy, ort_latency_ms
from lightning_compress.vision.data import ClassificationDataModule, MNIST5kDataModule
from lightning_compress.vision.data import get_datamodule as package_datamodule
from lightning_compress.vision.module import ClassificationModule

RESULTS = Path(__file__).parent / "results"
LAST_EPOCH_TIMES: list[float] = []


class MNIST5k32(MNIST5kDataModule):
    """mnist5k as the torchvision models take it in these benchmarks: resized to 32x32 (bilinear), the grey
    channel repeated 3 times; same split and order as ``mnist5k``."""

    in_channels = 3
    image_size = (32, 32)

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        return tuple(_resized(part) for part in super().build())  # type: ignore[return-value]


def _resized(part: Dataset[Any]) -> TensorDataset:
    images, labels = zip(*(part[i] for i in range(len(part))), strict=True)  # type: ignore[arg-type]
    x = F.interpolate(torch.stack(images), size=(32, 32), mode="bilinear", align_corners=False)
    return TensorDataset(x.repeat(1, 3, 1, 1), torch.stack(labels))


def get_datamodule(name: str, **kwargs: Any) -> ClassificationDataModule:
    """The package's data modules by name, plus ``mnist5k32`` (:class:`MNIST5k32`)."""
    return MNIST5k32(**kwargs) if name == "mnist5k32" else package_datamodule(name, **kwargs)


class EpochTimer(pl.Callback):
    """Wall-clock seconds of each training epoch (put it last so other callbacks' epoch-end work counts)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or validation; ``kwargs`` add to it."""
    options: dict[str, Any] = {
        "accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
    }  # fmt: skip
    return pl.Trainer(**{**options, **kwargs})


def fit(
    module: pl.LightningModule,
    data: str,
    epochs: int,
    seed: int,
    callbacks: Sequence[pl.Callback] = (),
    batch_size: int = 64,
) -> tuple[float, float]:
    """Train ``module`` for ``epochs`` (no validation during training); return (val accuracy, median epoch s).

    The epoch times themselves are in :data:`LAST_EPOCH_TIMES` afterwards.
    """
    pl.seed_everything(seed, verbose=False)
    datamodule = get_datamodule(data, seed=seed, batch_size=batch_size)
    timer = EpochTimer()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*callbacks, timer])
    trainer.fit(module, datamodule=datamodule)
    LAST_EPOCH_TIMES[:] = timer.times
    result = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    accuracy = result.validate(module, datamodule=datamodule, verbose=False)[0]["val/acc"]
    return float(accuracy), statistics.median(timer.times)


def new_module(model: str, data: str, seed: int, **kwargs: Any) -> ClassificationModule:
    """A freshly initialised ``ClassificationModule`` (seeded) for ``model`` on ``data``."""
    pl.seed_everything(seed, verbose=False)
    datamodule = get_datamodule(data)
    return ClassificationModule(model, datamodule.num_classes, datamodule.in_channels, **kwargs)


def prunable(module: nn.Module) -> list[nn.Module]:
    """The Conv/Linear layers every pruning arm prunes (the same set for ours and the peers)."""
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def weight_sparsity(module: nn.Module) -> float:
    """Fraction of exactly-zero Conv/Linear weights, counted from the tensors."""
    layers = prunable(module)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / sum(m.weight.numel() for m in layers)


def mean_spread(values: Sequence[float]) -> str:
    """``mean ± std`` in percent points (std 0 for a single value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(name: str, args: Any, table: str, **results: Any) -> dict[str, Any]:
    """Print ``table`` and save the run (its arguments, ``results`` and the table) as ``<args.out>/<name>.json``;
    return what was saved."""
    print(table)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, **results, "table": table}
    save(name, payload, args.out)
    return payload


def save(name: str, payload: Any, directory: Path = RESULTS) -> Path:
    """Write raw results to ``<directory>/<name>.json`` (default ``benchmarks/results``, ignored by git)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


Arm = Callable[[int], tuple[float, float, float]]


def ort_figures(
    paths: dict[str, Path], runs: int, rounds: int, spinning: Sequence[bool] = (True, False), data: str = "mnist5k"
) -> dict[str, dict[str, float]]:
    """Per file: validation accuracy on ``data``, bytes, and batch-64 latency (``latency_ms_spin1`` with
    ONNX Runtime's thread spinning on, ``latency_ms_spin0`` off).

    Latency is measured in ``rounds`` interleaved rounds (every file once per round, one session
    alive at a time), each the median of ``runs`` calls; the figure is the median over rounds.
    """
    dm = get_datamodule(data, batch_size=250)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))[0][:64]
    figures = {
        arm: {"bytes": float(p.stat().st_size), "acc": ort_accuracy(p, dm.val_dataloader())} for arm, p in paths.items()
    }
    for spin in spinning:
        samples: dict[str, list[float]] = {arm: [] for arm in paths}
        for _ in range(rounds):
            for arm, path in paths.items():
                samples[arm].append(ort_latency_ms(path, batch, runs, spinning=spin))
        for arm in paths:
            figures[arm][f"latency_ms_spin{int(spin)}"] = statistics.median(samples[arm])
    return figures
