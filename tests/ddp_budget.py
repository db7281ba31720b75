"""Run by the BudgetPlanner DDP test: the planner + channel pruning + QAT under DDP, 2 CPU processes (gloo).

Each rank saves the plan it was handed, its masks and weights at the end, to OUT/rank<r>.pt.
Usage: python tests/ddp_budget.py OUT
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_compress import BudgetPlanner, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.core.quantization import quantized_layers, weight_quantizer
from tests.helpers import TinyModule, loaders


class Recorder(pl.Callback):
    def __init__(self, planner: BudgetPlanner, pruning: MagnitudePruning) -> None:
        self.planner, self.pruning = planner, pruning

    def on_fit_end(self, trainer, pl_module):
        payload = {
            "plan": self.planner.plan,
            "layer_sparsity": dict(self.pruning.layer_sparsity or {}),
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "int8": sorted(n for n, m in quantized_layers(pl_module).items() if bool(weight_quantizer(m).enabled)),
        }
        torch.save(payload, Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    planner = BudgetPlanner("bytes=0.6", epoch=1, runs=2)
    pruning = MagnitudePruning(pattern="channel", start_epoch=1, end_epoch=2)
    qat = QuantizationAwareTraining(start_epoch=2)
    train, val = loaders(n=128, batch_size=8)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=3,
        callbacks=[planner, pruning, qat, Recorder(planner, pruning)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(TinyModule(bn=True), train, val)
