"""Conv1d (signals) and Conv3d (volumes, video) through every technique and the export, as Conv2d is."""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    CompressionExport,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
    restore,
)
from tests.helpers import Classifier, trainer

SHAPES = {1: (2, 64), 3: (2, 6, 8, 8)}  # channels + signal length / depth, height, width


class Signals(Classifier):
    """A user's module with N-d convolutions, BatchNorm and a classifier."""

    lr = 1e-2

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.features = nn.Sequential(
            conv(2, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(),
            conv(16, 32, 3, padding=1, bias=False), norm(32), nn.ReLU(),
            conv(32, 32, 3, padding=1, groups=32, bias=False), norm(32), nn.ReLU(),  # depthwise
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3))
        self.example_input_array = torch.zeros(2, *SHAPES[dims])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(2).mean(2))


def data(dims: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, *SHAPES[dims], generator=g)
    y = (x[:, 0].flatten(1).mean(1) > 0).long() + (x[:, 1].flatten(1).mean(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=48)


@pytest.mark.parametrize("dims", [1, 3])
def test_nd_convolutions_prune_quantise_export_and_restore(dims, tmp_path):
    pl.seed_everything(0, verbose=False)
    module = Signals(dims)
    callbacks = [
        MagnitudePruning(0.5, pattern="channel", end_epoch=1),
        QuantizationAwareTraining(start_epoch=1),
        CompressionExport(tmp_path, plots=False, val_batches=1),
    ]
    trainer(callbacks=callbacks, max_epochs=2).fit(module, *data(dims))
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["files"]) == {"checkpoint", "onnx", "onnx_int8"}
    assert all(check["passed"] for check in report["verification"].values()), report["verification"]
    assert report["structure"]["physical"], report["structure"]  # the depthwise N-d conv included
    quantised = {row["name"] for row in report["layers"] if row["weight_bits"] == 8}
    assert {"features.0", "features.3", "features.6", "head.0", "head.2"} <= quantised
    x = torch.randn(4, *SHAPES[dims])
    fresh = restore(Signals(dims), tmp_path / "model.ckpt").eval()
    assert torch.allclose(fresh(x), module.eval()(x), atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_low_rank_leaves_nd_convolutions_alone_and_says_why(dims, tmp_path):
    # Regression: a named Conv1d was reported as "rank None is not below its smallest dimension".
    pl.seed_everything(0, verbose=False)
    module = Signals(dims)
    low_rank = LowRankFactorization(epoch=1, ratio=0.5, include=["features.*", "head.0"])
    export = CompressionExport(tmp_path, plots=False, val_batches=1)
    trainer(callbacks=[low_rank, export], max_epochs=2).fit(module, *data(dims))
    kind = f"Conv{dims}d"
    assert low_rank.skipped["features.3"] == f"a {kind}: low-rank factorises Linear and Conv2d layers only"
    assert set(low_rank.factorized) == {"head.0"} and export.report["verification"]["onnx"]["passed"]
