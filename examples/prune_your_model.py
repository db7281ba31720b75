"""Prune your own LightningModule with MagnitudePruning: nothing in the module changes.

Run: ``.venv/bin/python examples/prune_your_model.py --epochs 8 --sparsity 0.9``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress import MagnitudePruning, fold_masks, get_datamodule, summarize


class DigitNet(pl.LightningModule):
    """A LightningModule as you would write it: nothing here knows about pruning."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    data = get_datamodule("digits", batch_size=32)
    model = DigitNet()
    pruning = MagnitudePruning(final_sparsity=args.sparsity, start_epoch=0, end_epoch=max(1, args.epochs // 2))
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[pruning], logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    accuracy = float(trainer.validate(model, datamodule=data, verbose=False)[0]["val_acc"])

    fold_masks(model)  # a plain state dict: loads into DigitNet() as it is
    DigitNet().load_state_dict(model.state_dict())
    figures = {**summarize(model, data.example_input()), "val_acc": accuracy}
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})
    return figures


if __name__ == "__main__":
    main()
