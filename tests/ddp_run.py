"""Run by the DDP tests: MagnitudePruning (Taylor importance) + QuantizationAwareTraining + KnowledgeDistillation
(with a feature adapter) + LowRankFactorization (at epoch 1, mid pruning ramp) + CompressionExport under DDP,
2 CPU processes (gloo).

Every rank records its masks after every mask update, its observer ranges after every step once
QAT is on, and at the end its weights, the KD adapter's weights and what DDP syncs, and saves them
to OUT/rank<r>.pt. Usage: python tests/ddp_run.py OUT

``python tests/ddp_run.py OUT learned`` runs a residual model (quantised sums) with MagnitudePruning,
QuantizationAwareTraining(scales="learned") and KnowledgeDistillation(teacher="self", relational feature loss)
instead, recording the learned step sizes after every step and the self-teacher's copy.
"""

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_compress import (
    CompressionExport,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.core.quantization import (
    learned_scales,
    observer_ranges,
    quantized_layers,
    quantized_sums,
    scale_kinds,
    weight_bits,
)
from tests.helpers import TinyModule, loaders


class Recorder(pl.Callback):
    def __init__(
        self, pruning: MagnitudePruning, kd: KnowledgeDistillation, lowrank: LowRankFactorization, export: Any
    ) -> None:
        self.pruning = pruning
        self.kd = kd
        self.lowrank = lowrank
        self.export = export
        self.seen = -1
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.taylor: dict[str, Any] = {}  # the last non-empty Taylor window (it is emptied at every update)
        self.ranges: dict[int, dict[str, tuple[float, float]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scores = self.pruning.state_dict()["scores"]
        if scores["steps"]:
            self.taylor = scores
        if self.pruning.last_update_step != self.seen:
            self.seen = self.pruning.last_update_step
            self.masks[self.seen] = {n: m.weight_mask.clone() for n, m in self.pruning.modules.items()}
        if trainer.current_epoch >= 1:
            self.ranges[trainer.global_step] = observer_ranges(pl_module)

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        synced = {id(p) for p in trainer.strategy.model.parameters()}  # what DDP's gradient sync covers
        payload = {
            "history": self.masks,
            "ranges": self.ranges,
            "weights": state,
            "adapter": {k: v.clone() for k, v in self.kd.adapters["net.fc1"].state_dict().items()},
            "ddp_params": len(synced),
            "student_params": len(list(pl_module.parameters())),
            "teacher_in_ddp": any(id(p) in synced for p in self.kd.teacher.parameters()),
            "kd_loss": float(trainer.callback_metrics["kd/loss"]),
            "bypassed": [
                f"{name}.{attr}"
                for name, layer in quantized_layers(pl_module).items()
                for attr in ("input_quant", "output_quant")
                if getattr(layer, attr).bypass
            ],
            "factorized": {name: list(f["ranks"]) for name, f in self.lowrank.factorized.items()},
            "exported": sorted(self.export.report.get("files", {})),
            "weight_bits": weight_bits(pl_module),
            "taylor": self.taylor,
        }
        torch.save(payload, Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")


class LearnedRecorder(pl.Callback):
    """The learned step sizes after every step, and at the end the weights and what DDP syncs."""

    def __init__(self, kd: KnowledgeDistillation) -> None:
        self.kd = kd
        self.scales: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales[trainer.global_step] = {n: p.detach().clone() for n, p in learned_scales(pl_module).items()}

    def on_fit_end(self, trainer, pl_module):
        synced = {id(p) for p in trainer.strategy.model.parameters() if p.requires_grad}
        ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
        payload = {
            "scales": self.scales,
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "learned_in_ddp": sorted(n for n, p in learned_scales(pl_module).items() if n not in ignored),
            "kinds": {name: scale_kinds(layer) for name, layer in quantized_layers(pl_module).items()},
            "sums": sorted(quantized_sums(pl_module)),
            "synced": len(synced),
            "teacher": {k: v.clone() for k, v in self.kd.teacher.state_dict().items()},
            "teacher_in_ddp": any(id(p) in synced for p in self.kd.teacher.parameters()),
            "copied_at": self.kd.copied_at,
            "kd_loss": float(trainer.callback_metrics["kd/loss"]),
            "feature_loss": float(trainer.callback_metrics["kd/feature_loss"]),
        }
        torch.save(payload, Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")


def learned() -> None:
    """The residual model with pruning and learned-scale QAT from epoch 1 under DDP, distilled from itself."""
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=1, end_epoch=2, update_frequency=1)
    qat = QuantizationAwareTraining(start_epoch=1, scales="learned", calibration_batches=2)
    kd = KnowledgeDistillation("self", alpha=0.5, features={"net.blocks.1": "net.blocks.1"}, feature_loss="rkd")
    train, val = loaders(n=128, batch_size=8)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, callbacks=[pruning, qat, kd, LearnedRecorder(kd)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(TinyModule(residual=True, optimizer="adam", lr=0.01), train, val)


if __name__ == "__main__" and sys.argv[2:] == ["learned"]:
    pl.seed_everything(0, verbose=False)
    learned()
elif __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    # per-layer settings too: a sparsity of its own, a rank of its own, a narrower width
    pruning = MagnitudePruning(final_sparsity=0.8, end_epoch=2, update_frequency=1, layer_sparsity={"net.conv1": 0.5},
                               criterion="taylor")  # fmt: skip
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, layer_bits={"net.fc2": 4}, calibration_batches=2)
    kd = KnowledgeDistillation(TinyModule(bn=True), alpha=0.5, features={"net.fc1": "net.fc2"})
    lowrank = LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1", "net.conv2"], ranks={"net.fc1": 6})
    export = CompressionExport(Path(sys.argv[1]) / "export", plots=False)
    train, val = loaders(n=128, batch_size=8)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=3,
        callbacks=[pruning, qat, kd, lowrank, export, Recorder(pruning, kd, lowrank, export)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(TinyModule(bn=True), train, val)
