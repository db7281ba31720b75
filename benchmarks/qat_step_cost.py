"""What a QAT training step costs over a plain one, measured interleaved in one run.

For each round (a fresh, seeded model each): the same number of training steps on the same batches, one arm
after the other: plain fp32 training, then QuantizationAwareTraining from step 0 with observed scales (BatchNorm
folded and in training mode), with BatchNorm frozen too (``freeze_bn_epoch=0``: running statistics, so the step
does the fake quantisation and observer work only), and with learned step sizes (LSQ, BatchNorm frozen). Each
step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step and
every callback hook between); the first ``--warmup`` steps of each run (calibration, BatchNorm linking,
allocator warm-up) are left out. Printed: each arm's median step time over all rounds over the plain arm's,
and the range of the per-round ratios.

Default: torchvision ``resnet18`` from random weights on mnist5k resized to 32x32 with 3 channels, batch 32,
SGD with momentum, CPU. Run: ``.venv/bin/python benchmarks/qat_step_cost.py`` (about 4 minutes on 2 cores,
``--rounds 10`` about 6); ``--model cnn_small --data digits --rounds 1 --steps 4 --warmup 1`` is a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from common import RESULTS, get_datamodule, markdown, new_module, quiet_trainer, save

from lightning_compress import QuantizationAwareTraining

ARMS: dict[str, Any] = {
    "plain": lambda: [],
    "QAT observed": lambda: [QuantizationAwareTraining()],
    "QAT observed, BN frozen": lambda: [QuantizationAwareTraining(freeze_bn_epoch=0)],
    "QAT learned, BN frozen": lambda: [QuantizationAwareTraining(freeze_bn_epoch=0, scales="learned")],
}


class StepTimer(pl.Callback):
    """Seconds from each training batch's start to its end (put it last: every other hook is inside)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def step_times(arm: str, args: argparse.Namespace, seed: int) -> list[float]:
    module = new_module(args.model, args.data, seed, optimizer="sgd", lr=0.01)
    timer = StepTimer()
    trainer = quiet_trainer(max_steps=args.warmup + args.steps, callbacks=[*ARMS[arm](), timer])
    pl.seed_everything(seed, verbose=False)
    trainer.fit(module, datamodule=get_datamodule(args.data, seed=seed, batch_size=args.batch_size))
    return timer.times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--data", default="mnist5k32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (a fresh model each)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps at the start of each run")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args()
    arms = ["plain", *(a for a in args.arms if a != "plain")]
    times: dict[str, list[list[float]]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        for arm in arms:
            times[arm].append(step_times(arm, args, round_))
    plain = statistics.median(t for run in times["plain"] for t in run)
    rows = []
    for arm in arms:
        runs = times[arm]
        ratio = statistics.median(t for run in runs for t in run) / plain
        per_round = [statistics.median(r) / statistics.median(p) for r, p in zip(runs, times["plain"], strict=True)]
        rows.append([arm, f"{1000 * statistics.median(t for run in runs for t in run):.1f}", f"{ratio:.2f}",
                     f"{min(per_round):.2f}–{max(per_round):.2f}"])  # fmt: skip
    save("qat_step_cost", {"args": {**vars(args), "out": str(args.out)}, "step_seconds": times}, args.out)
    header = ["arm", "median step ms", "step time / plain", "per-round range"]
    print(
        f"\n{args.model} on {args.data}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds x {args.steps} steps (after {args.warmup} untimed)\n"
    )
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
