"""Step time of each callback vs plain training on CUDA: resnet18 at 224x224 on synthetic data.

Arms (same model, data, optimizer and seed; arms interleaved over ``--rounds`` so clock and thermal
drift hit every arm alike):
  plain         -- no callback (the baseline)
  pruning       -- MagnitudePruning(0.9), an update every few steps (masks applied after each step)
  qat           -- QuantizationAwareTraining(start_epoch=0): fake-quantised weights and activations
  distillation  -- KnowledgeDistillation(teacher=resnet34): the teacher's forward added to each step
  low_rank      -- LowRankFactorization(epoch=0, ratio=0.5) on layer3/layer4 and fc
  all           -- low-rank + pruning + QAT + distillation together
Each arm: a ``Trainer(max_steps=warmup + steps)`` on one GPU with ``precision`` (default bf16-mixed);
the step time is the median of the last ``steps`` steps (CUDA-synchronised), and the table prints
each arm's median over rounds as a ratio to ``plain``. Nothing is exported (export is a CPU/ORT
step measured in benchmarks/structured_export.py).

Run where a GPU exists: ``.venv/bin/python benchmarks/gpu.py`` (about 3 minutes on an H200).
Without CUDA it says so and exits with status 0: CI never needs a GPU. ``--accelerator cpu --size 32``
only smoke-tests the script (the tests do); its CPU ratios are not this benchmark's claim.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from common import RESULTS, markdown, save
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    ClassificationModule,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)

ARMS = ("plain", "pruning", "qat", "distillation", "low_rank", "all")


class StepTimer(pl.Callback):
    """CUDA-synchronised wall time of every training step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        _synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        _synchronize()
        self.times.append(time.perf_counter() - self._start)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def callbacks(arm: str, teacher: torch.nn.Module) -> list[pl.Callback]:
    made: dict[str, pl.Callback] = {
        "low_rank": LowRankFactorization(epoch=0, ratio=0.5, include=["model.layer3.*.conv*", "model.layer4.*.conv*"]),
        "pruning": MagnitudePruning(final_sparsity=0.9, end_epoch=1, update_frequency=5),
        "qat": QuantizationAwareTraining(start_epoch=0),
        "distillation": KnowledgeDistillation(teacher),
    }
    if arm == "plain":
        return []
    if arm == "all":
        return [made["low_rank"], made["pruning"], made["qat"], made["distillation"]]
    return [made[arm]]


def step_time(arm: str, data: DataLoader, teacher: torch.nn.Module, args: argparse.Namespace) -> float:
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule("resnet18", num_classes=1000, in_channels=3, lr=0.01, optimizer="sgd")
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=args.warmup + args.steps,
        callbacks=[*callbacks(arm, teacher), timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, data)
    return statistics.median(timer.times[args.warmup :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per arm and round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotune, observers)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--out", default=str(RESULTS), help="folder for gpu.json")
    parser.add_argument("--accelerator", default="cuda", help="cpu only to smoke-test this script (tests do)")
    args = parser.parse_args()
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing measured (it runs where a GPU exists).")
        return
    generator = torch.Generator().manual_seed(0)
    n = args.batch * (args.warmup + args.steps)
    images = torch.randn(n, 3, args.size, args.size, generator=generator)
    labels = torch.randint(0, 1000, (n,), generator=generator)
    data = DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=False, pin_memory=True)
    teacher = ClassificationModule("resnet34", num_classes=1000, in_channels=3)
    times: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for round_ in range(args.rounds):
        for arm in args.arms:  # interleaved
            times[arm].append(step_time(arm, data, teacher, args))
            print(f"round {round_} {arm}: {times[arm][-1] * 1e3:.1f} ms/step", flush=True)
    base = statistics.median(times["plain"]) if "plain" in times else float("nan")
    rows = [
        [arm, f"{statistics.median(t) * 1e3:.1f}", f"{statistics.median(t) / base:.2f}"] for arm, t in times.items()
    ]
    device = torch.cuda.get_device_name() if args.accelerator == "cuda" else args.accelerator
    print(f"resnet18 {args.size}x{args.size}, batch {args.batch}, {args.precision}, {device}")
    print(markdown(["arm", "ms / step", "ratio vs plain"], rows))
    save("gpu", {"args": vars(args), "device": device, "times": times}, Path(args.out))


if __name__ == "__main__":
    main()
