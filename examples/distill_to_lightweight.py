"""From a large teacher checkpoint to a lightweight student, by names and a path only.

1. Train a large teacher (``cnn_wide`` by default) and save an ordinary Lightning checkpoint.
2. Train a lightweight student (``cnn_tiny``, ``mobilenet_v3_small`` or ``shufflenet_v2_x0_5``)
   with ``KnowledgeDistillation(teacher=<that checkpoint>)``: the teacher is rebuilt from the file
   (``weights_only=True``), frozen, and never part of the student's checkpoint.

Run: ``.venv/bin/python examples/distill_to_lightweight.py --student cnn_tiny --epochs 5``
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from lightning_compress import ClassificationModule, KnowledgeDistillation, get_datamodule
from lightning_compress.deploy.measure import count_parameters


def train(
    module: pl.LightningModule, data: pl.LightningDataModule, epochs: int, callbacks: list[pl.Callback]
) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--teacher", default="cnn_wide")
    parser.add_argument("--student", default="cnn_tiny")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    data = get_datamodule(args.data)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "teacher.ckpt"
        teacher = ClassificationModule(args.teacher, data.num_classes, data.in_channels)
        train(teacher, data, args.teacher_epochs, []).save_checkpoint(checkpoint)

        student = ClassificationModule(args.student, data.num_classes, data.in_channels)
        kd = KnowledgeDistillation(teacher=checkpoint, temperature=4.0, alpha=0.9)
        trainer = train(student, data, args.epochs, [kd])
    kd_loss = float(trainer.callback_metrics["kd/loss"])  # before validate() resets the metrics
    figures = {
        "teacher_params": float(count_parameters(teacher)),
        "student_params": float(count_parameters(student)),
        "teacher_acc": float(pl.Trainer(logger=False).validate(teacher, data, verbose=False)[0]["val/acc"]),
        "student_acc": float(trainer.validate(student, data, verbose=False)[0]["val/acc"]),
        "kd_loss": kd_loss,
    }
    print({k: round(v, 4) for k, v in figures.items()})
    return figures


if __name__ == "__main__":
    main()
