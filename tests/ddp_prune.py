"""Run by tests/callbacks/test_pruning.py: MagnitudePruning under DDP with 2 CPU processes (gloo).

Every rank records its masks after every mask update and saves them to OUT/rank<r>.pt.
Usage: python tests/ddp_prune.py OUT
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_compress import MagnitudePruning
from tests.helpers import TinyModule, loaders


class MaskRecorder(pl.Callback):
    def __init__(self, pruning: MagnitudePruning) -> None:
        self.pruning = pruning
        self.seen = -1
        self.history: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.pruning.last_update_step != self.seen:
            self.seen = self.pruning.last_update_step
            self.history[self.seen] = {n: m.weight_mask.clone() for n, m in self.pruning.modules.items()}

    def on_fit_end(self, trainer, pl_module):
        out = Path(sys.argv[1])
        torch.save(
            {"history": self.history, "weights": {k: v.clone() for k, v in pl_module.state_dict().items()}},
            out / f"rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    pruning = MagnitudePruning(final_sparsity=0.8, end_epoch=2, update_frequency=1)
    train, val = loaders(n=128, batch_size=8)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=3,
        callbacks=[pruning, MaskRecorder(pruning)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(TinyModule(), train, val)
