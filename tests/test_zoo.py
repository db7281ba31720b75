"""The torchvision zoo in small configurations of torchvision's own classes: channel pruning + QAT +
export (fp32 and int8 verified by ONNX Runtime) and low-rank + pruning + export, then ``restore``.

Each family once; the regressions each one caught are named beside it (#14).
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    CompressionExport,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
    restore,
)
from tests.helpers import trainer


def build(family: str) -> nn.Module:
    from torchvision.models import (
        convnext,
        densenet,
        efficientnet,
        mnasnet,
        mobilenetv2,
        mobilenetv3,
        regnet,
        resnet,
        shufflenetv2,
        squeezenet,
        swin_transformer,
        vision_transformer,
    )
    from torchvision.models.googlenet import GoogLeNet

    k = 4
    if family == "resnet":
        return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=k)
    if family == "resnext":  # grouped convs
        return resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8, num_classes=k)
    if family == "densenet":  # concatenations: a wrong physical removal used to pass fp32 and fail int8
        return densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=k)
    if family == "googlenet":
        return GoogLeNet(num_classes=k, aux_logits=False, init_weights=True)
    if family == "squeezenet":
        return squeezenet.SqueezeNet("1_1", num_classes=k)
    if family == "mobilenet_v2":
        return mobilenetv2.MobileNetV2(num_classes=k, width_mult=0.25)
    if family == "mobilenet_v3":  # hardswish, squeeze-excitation
        setting, last = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
        return mobilenetv3.MobileNetV3(setting, last, num_classes=k)
    if family == "mnasnet":
        return mnasnet.MNASNet(0.25, num_classes=k)
    if family == "shufflenet":  # channel shuffle: removal used to crash, now keeps the masks
        return shufflenetv2.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=k)
    if family == "efficientnet":  # SiLU, squeeze-excitation, stochastic depth
        setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
        return efficientnet.EfficientNet(setting, 0.2, last_channel=last, num_classes=k)
    if family == "regnet":  # grouped convs + SE: removal used to crash ("expected weight divisible by 2")
        params = regnet.BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
        return regnet.RegNet(params, num_classes=k)
    if family == "convnext":  # LayerNorm over channels, layer scale: int8 used to fail verification
        stages = [convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)]
        return convnext.ConvNeXt(stages, num_classes=k)
    if family == "vit":  # attention: channel pruning used to cut the residual stream (reshape crash)
        return vision_transformer.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=k)
    if family == "swin":  # the coupling trace used to exhaust memory; attention reads qkv.weight directly
        return swin_transformer.SwinTransformer([4, 4], 16, [1, 1], [1, 2], [4, 4], num_classes=k)
    raise KeyError(family)


FAMILIES = [
    "resnet", "resnext", "densenet", "googlenet", "squeezenet", "mobilenet_v2", "mobilenet_v3", "mnasnet",
    "shufflenet", "efficientnet", "regnet", "convnext", "vit", "swin",
]  # fmt: skip


class Zoo(pl.LightningModule):
    """What a user writes around a torchvision model."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build(family)
        self.example_input_array = torch.zeros(2, 3, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), 1e-3)


def data() -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 4, (32,), generator=g))
    return DataLoader(images, batch_size=8), DataLoader(images, batch_size=16)


def compress(family: str, callbacks: list[pl.Callback], out: Any) -> tuple[Zoo, dict[str, Any]]:
    pl.seed_everything(0, verbose=False)
    module = Zoo(family)
    export = CompressionExport(out, plots=False, val_batches=1)
    trainer(callbacks=[*callbacks, export], max_epochs=2, limit_train_batches=2).fit(module, *data())
    return module, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_pruning_qat_and_export_verify_on_every_family(family, tmp_path):
    callbacks = [MagnitudePruning(0.5, pattern="channel", end_epoch=1), QuantizationAwareTraining(start_epoch=1)]
    module, report = compress(family, callbacks, tmp_path / "out")
    assert set(report["files"]) == {"checkpoint", "onnx", "onnx_int8"}
    assert all(check["passed"] for check in report["verification"].values()), report["verification"]
    assert report["structure"]["physical"] or report["structure"]["reason"]  # removed, or why not
    fresh = restore(Zoo(family), tmp_path / "out" / "model.ckpt").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(fresh(x), module.eval()(x), atol=1e-5)


@pytest.mark.parametrize("family", ["resnet", "mobilenet_v2", "convnext", "vit", "swin"])
def test_low_rank_and_pruning_export_verify(family, tmp_path):
    callbacks = [LowRankFactorization(epoch=1), MagnitudePruning(0.5, end_epoch=1)]
    _, report = compress(family, callbacks, tmp_path / "out")
    assert all(check["passed"] for check in report["verification"].values())
